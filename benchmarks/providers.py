"""The implementations compared: cumo_kernels' backends, CuMo's loop, sorted dispatch +
grouped_mm, the dense ceiling, transformers' experts implementations, and peer libraries when
importable.

Gated shapes (`shape.glu`, issue 23) run through all of them: w1 is [E, 2*hidden, in] in the
concatenated layout (each expert's gate rows, then its up rows: transformers' `gate_up_proj`), b1
[E, 2*hidden] (or None with `shape.bias` False, as b2), and each expert computes
fc2(act(gate) * up) with the shape's activation (`gated_act`: "silu" is SwiGLU, "gpt_oss_swiglu"
GPT-OSS's clamped form).

Each provider turns one set of inputs into a callable for a pass:
- "fwd": the forward under torch.no_grad() (inference; no autograd bookkeeping for anyone);
- "fwd+bwd": the forward with autograd, then torch.autograd.grad of (y, balance, z) against
  random dy (and 1 for the losses) into x and every parameter (no .grad accumulation).
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .shapes import Shape

PASSES = ("fwd", "fwd+bwd")


def _quick_gelu(v: Tensor) -> Tensor:
    return v * torch.sigmoid(1.702 * v)


ACT: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def gated_act(pre: Tensor, activation: str) -> Tensor:
    """h [..., H] of gated pre-activations pre [..., 2H] (gate columns, then up columns):
    act(gate) * up, or GPT-OSS's clamped SwiGLU for "gpt_oss_swiglu" (gate clamped above at 7, up
    to [-7, 7], h = gate * sigmoid(1.702 gate) * (up + 1)), written here as the models write it."""
    gate, up = pre.chunk(2, dim=-1)
    if activation == "gpt_oss_swiglu":
        gate = gate.clamp(max=7.0)
        return gate * torch.sigmoid(1.702 * gate) * (up.clamp(-7.0, 7.0) + 1.0)
    return ACT[activation](gate) * up


def expert_act(shape: Shape) -> Callable[[Tensor], Tensor]:
    """The shape's activation applied to fc1's output: plain, or gated (fc1's output has 2H columns)."""
    if shape.glu:
        return lambda pre: gated_act(pre, shape.activation)
    return ACT[shape.activation]


@dataclass
class Inputs:
    """Random inputs of one shape (never zeros): x [B, N, in], the gate, both expert layers, dy.
    w1 is [E, hidden, in], or [E, 2*hidden, in] for a gated shape; b1 and b2 are None for a shape
    without biases."""

    x: Tensor
    gate: Tensor
    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    dy: Tensor

    def params(self) -> list[Tensor]:
        """x and every parameter (the tensors fwd+bwd differentiates into); absent biases left out."""
        return [t for t in (self.x, self.gate, self.w1, self.b1, self.w2, self.b2) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.params(), self.dy))


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)
    e, d_in, hid, d_out = shape.experts, shape.d_in, shape.hidden, shape.d_out

    def rnd(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    if shape.hf_family:  # the hf-* providers build the family's block themselves: x and dy only
        none = torch.empty(0, device=device, dtype=dtype)
        x = rnd(shape.samples, shape.tokens_per_sample, d_in)
        return Inputs(x, none, none, none, none, none, rnd(shape.samples, shape.tokens_per_sample, d_out))

    rows1 = 2 * hid if shape.glu else hid  # gated: each expert's gate rows, then its up rows
    x = rnd(shape.samples, shape.tokens_per_sample, d_in)
    gate = rnd(e, d_in, scale=d_in**-0.5)
    w1 = rnd(e, rows1, d_in, scale=d_in**-0.5)
    b1 = rnd(e, rows1, scale=0.1) if shape.bias else None
    w2 = rnd(e, d_out, hid, scale=hid**-0.5)
    b2 = rnd(e, d_out, scale=0.1) if shape.bias else None
    return Inputs(x, gate, w1, b1, w2, b2, dy=rnd(shape.samples, shape.tokens_per_sample, d_out))


# --------------------------------------------------------------------------------------------
# The routing both baselines share (CuMo's MLPMoE.forward, batched over samples).


def cumo_routing(x: Tensor, gate: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CuMo's router on x [B, N, in]: (weights [B,N,k] renormalised, experts [B,N,k], balance, z)."""
    e = gate.shape[0]
    logits = F.linear(x, gate)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    probs = F.softmax(logits, dim=-1, dtype=torch.float).to(x.dtype)
    density_proxy = probs.mean(dim=-2)  # [B, E] per sample
    weights, experts = torch.topk(probs, top_k, dim=-1)
    first = F.one_hot(experts[..., 0], e).float()
    density = first.mean(dim=-2)  # [B, E]
    balance = (density_proxy.float() * density).mean() * float(e * e)
    weights = weights / weights.sum(dim=-1, keepdim=True).to(x.dtype)
    return weights, experts, balance, z


def _bias(b: Tensor | None, i: int) -> Tensor | None:
    return None if b is None else b[i]


def loop_forward(inp: Inputs, shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
    """CuMo's loop formulation: per sample, per expert, torch.where over that sample's tokens
    (gated shapes: the same loop over gated experts)."""
    x, act = inp.x, expert_act(shape)
    weights, experts, balance, z = cumo_routing(x, inp.gate, shape.top_k)
    results = torch.zeros(x.shape[0], x.shape[1], shape.d_out, device=x.device, dtype=x.dtype)
    for b in range(x.shape[0]):
        for i in range(shape.experts):
            token_idx, nth_expert = torch.where(experts[b] == i)
            h = act(F.linear(x[b][token_idx], inp.w1[i], _bias(inp.b1, i)))
            y = F.linear(h, inp.w2[i], _bias(inp.b2, i))
            results[b][token_idx] += weights[b][token_idx, nth_expert, None] * y
    return results, balance, z


def grouped_mm_forward(inp: Inputs, shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted dispatch: argsort of the expert ids, gather, two torch.nn.functional.grouped_mm, weighted
    scatter-add (gated shapes: the first grouped_mm gives the [T*k, 2*hidden] pre-activations)."""
    x, act, k = inp.x, expert_act(shape), shape.top_k
    weights, experts, balance, z = cumo_routing(x, inp.gate, k)
    x2 = x.reshape(-1, shape.d_in)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    ids = flat[order]
    # Counts by scatter-add, not bincount (whose data-dependent output size syncs with the host on CUDA).
    counts = torch.zeros(shape.experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = F.grouped_mm(x2[tok], inp.w1.transpose(1, 2), offs=offs)
    if inp.b1 is not None:
        h = h + inp.b1[ids]
    y = F.grouped_mm(act(h), inp.w2.transpose(1, 2), offs=offs)
    if inp.b2 is not None:
        y = y + inp.b2[ids]
    y = y * weights.reshape(-1)[order, None]
    out = torch.zeros(x2.shape[0], shape.d_out, device=x.device, dtype=x.dtype).index_add_(0, tok, y)
    return out.view(*x.shape[:-1], shape.d_out), balance, z


# --------------------------------------------------------------------------------------------


@dataclass
class Provider:
    name: str
    # (shape, inputs) -> (y, balance, z) with autograd; None for dense (its own callables)
    forward: Callable[[Inputs, Shape], tuple[Tensor, Tensor, Tensor]] | None
    refusal: Callable[[Shape, torch.device, torch.dtype], str | None] = lambda s, d, t: None
    is_dense: bool = False
    # (shape, inputs, pass) -> the timed callable, for providers that own their parameters (hf-*)
    call: Callable[[Shape, Inputs, str], Callable[[], object]] | None = None

    def refuses(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this provider cannot run `shape` here, or None. A transformers family's block
        (shape.hf_family) is run by the hf-* providers only; they also run the gated shapes whose
        model has an experts class in transformers (HF_EXPERTS), and nothing else."""
        hf = self.name.startswith("hf-")
        if shape.hf_family is not None and not hf:
            return "a transformers family's block: the hf-* providers run it"
        if hf and shape.hf_family is None and _base_name(shape.name) not in HF_EXPERTS:
            return "hf-* providers run the transformers families' blocks and the gated shapes of HF_EXPERTS"
        return self.refusal(shape, device, dtype)


def _grads_of(outs: tuple[Tensor, Tensor, Tensor], inp: Inputs) -> list[Tensor | None]:
    y, bal, z = outs
    one_b, one_z = torch.ones_like(bal), torch.ones_like(z)
    return list(torch.autograd.grad([y, bal, z], inp.params(), [inp.dy, one_b, one_z], allow_unused=True))


def make_call(provider: Provider, shape: Shape, inp: Inputs, pass_: str) -> Callable[[], object]:
    """The zero-argument callable that the timer runs for one (provider, shape, pass)."""
    if provider.call is not None:
        return provider.call(shape, inp, pass_)
    if provider.is_dense:
        return _dense_call(shape, inp, pass_, activation=provider.name == "dense-mlp")
    fwd = provider.forward
    assert fwd is not None
    if pass_ == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return fwd(inp, shape)

        return run_fwd
    for t in inp.params():
        t.requires_grad_(True)

    def run_fwd_bwd() -> object:
        return _grads_of(fwd(inp, shape), inp)

    return run_fwd_bwd


def _dense_call(shape: Shape, inp: Inputs, pass_: str, activation: bool = False) -> Callable[[], object]:
    """Dense GEMMs of the same FLOPs: x[T*k, in] @ W1^T, then @ W2^T (torch.mm; backward via
    autograd: the four gradient GEMMs). `dense` is the pure-GEMM ceiling; `dense-mlp`
    (activation=True) puts the shape's unfused activation between the two products.

    Gated shapes: W1^T is [in, 2*hidden]. `dense-mlp` applies the gated activation ([T*k, 2H] ->
    [T*k, H]), backward by autograd. `dense` stays GEMMs only, written out: forward x @ W1^T
    ([T*k, 2H]) and its first H columns (a strided view, no copy) @ W2^T; backward dH = dy @ W2
    ([T*k, H]), dW2 = H^T @ dy, then dW1 = x^T @ dpre and dx = dpre @ W1 with dpre [T*k, 2H] a
    preallocated random buffer (the gated derivative that would fill it is elementwise, not GEMM):
    the six GEMMs of the gated layer's training step, 3x the forward FLOPs."""
    g = torch.Generator(device="cpu").manual_seed(1)
    m = shape.tokens * shape.top_k
    dev, dt = inp.x.device, inp.x.dtype
    hid = shape.hidden
    rows1 = 2 * hid if shape.glu else hid

    def rnd(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device=dev, dtype=dt)

    xd = rnd(m, shape.d_in)
    w1 = rnd(shape.d_in, rows1, scale=shape.d_in**-0.5)  # W1^T
    w2 = rnd(hid, shape.d_out, scale=hid**-0.5)  # W2^T
    dy = rnd(m, shape.d_out)
    act = expert_act(shape) if activation else None
    if shape.glu and act is None:
        return _dense_glu_gemms(xd, w1, w2, dy, hid, pass_, rnd)

    def fwd() -> Tensor:
        h = torch.mm(xd, w1)
        return torch.mm(h if act is None else act(h), w2)

    if pass_ == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return fwd()

        return run_fwd
    for t in (xd, w1, w2):
        t.requires_grad_(True)

    def run_fwd_bwd() -> object:
        return torch.autograd.grad(fwd(), [xd, w1, w2], dy)

    return run_fwd_bwd


def _dense_glu_gemms(
    xd: Tensor, w1: Tensor, w2: Tensor, dy: Tensor, hid: int, pass_: str, rnd: Callable[..., Tensor]
) -> Callable[[], object]:
    """The gated layer's GEMMs alone (see _dense_call): 2 in the forward, 4 more in the backward."""
    if pass_ == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return torch.mm(torch.mm(xd, w1)[:, :hid], w2)

        return run_fwd
    dpre = rnd(xd.shape[0], w1.shape[1])

    def run_fwd_bwd() -> object:
        with torch.no_grad():
            h = torch.mm(xd, w1)[:, :hid]
            y = torch.mm(h, w2)
            dh = torch.mm(dy, w2.t())
            dw2 = torch.mm(h.t(), dy)
            dw1 = torch.mm(xd.t(), dpre)
            dx = torch.mm(dpre, w1.t())
            return y, dh, dw2, dw1, dx

    return run_fwd_bwd


# --------------------------------------------------------------------------------------------
# cumo_kernels


def _cumo_backends(device: torch.device) -> tuple[list[str], str | None]:
    """cumo_kernels.available_backends(device), or ([], why cumo_kernels cannot be imported)."""
    try:
        import cumo_kernels
    except Exception as exc:  # the benchmark still runs its baselines
        return [], f"cumo_kernels does not import: {type(exc).__name__}: {exc}"
    try:
        return list(cumo_kernels.available_backends(device)), None
    except TypeError:  # an older signature without the device argument
        return list(cumo_kernels.available_backends()), None


def _cumo_provider(backend: str) -> Provider:
    def forward(inp: Inputs, shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
        import cumo_kernels

        return cumo_kernels.moe_mlp(
            inp.x,
            inp.gate,
            inp.w1,
            inp.b1,
            inp.w2,
            inp.b2,
            top_k=shape.top_k,
            activation=shape.activation,
            glu=shape.glu,
            backend=backend,
        )

    return Provider(f"cumo-{backend}", forward)


def _grouped_mm_refusal(shape: Shape, device: torch.device, dtype: torch.dtype) -> str | None:
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (needs torch >= 2.9)"
    return None


# --------------------------------------------------------------------------------------------
# transformers' experts implementations on one MoE block of a family (shape.hf_family): the
# model's router and its experts class, whose forward dispatches on config._experts_implementation.
# The three hf-* providers share one block per inputs (its weights exist once).

HF_IMPLEMENTATIONS = ("cumo", "grouped_mm", "eager")
# Per inputs (keyed by id, with a weak reference that tells a dead inputs' reused id apart).
_HF_BLOCKS: dict[int, tuple[weakref.ref, torch.nn.Module, object]] = {}


def _cached(cache: dict, inp: Inputs) -> tuple | None:
    """cache's entry for `inp` (its values after the weak reference), or None."""
    hit = cache.get(id(inp))
    return hit[1:] if hit is not None and hit[0]() is inp else None


def _hf_block(shape: Shape, inp: Inputs) -> tuple[torch.nn.Module, object]:
    """The family's MoE block (router + experts) at the shape's sizes, random weights (seeded;
    router std in**-0.5, so tokens spread over the experts), on x's device and dtype."""
    hit = _cached(_HF_BLOCKS, inp)
    if hit is None:
        _HF_BLOCKS.clear()
        import transformers

        import cumo_kernels.hf  # noqa: F401  (registers "cumo")

        sizes = dict(hidden_size=shape.d_in, num_experts=shape.experts, num_experts_per_tok=shape.top_k)
        if shape.hf_family == "olmoe":
            from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

            config = transformers.OlmoeConfig(intermediate_size=shape.hidden, **sizes)
        elif shape.hf_family == "qwen3_moe":
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

            config = transformers.Qwen3MoeConfig(moe_intermediate_size=shape.hidden, norm_topk_prob=True, **sizes)
        else:
            raise ValueError(f"no transformers block for family {shape.hf_family!r}")
        block = Block(config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in block.named_parameters():
                fan_in = shape.d_in if name.endswith(("gate.weight", "gate_up_proj")) else shape.hidden
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
        hit = (block.to(device=inp.x.device, dtype=inp.x.dtype), config)
        _HF_BLOCKS[id(inp)] = (weakref.ref(inp), *hit)
    return hit


# Gated shapes whose model has an experts class in transformers: (module, class, config class).
# The hf-* providers run that class on the shape's own weights (no copy, except GPT-OSS's, below),
# given CuMo's routing (`cumo_routing`, inside the timed call: every provider times the whole block).
HF_EXPERTS: dict[str, tuple[str, str, str]] = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts", "MixtralConfig"),
    "qwen3-moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeConfig"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeExperts", "OlmoeConfig"),
    "gpt-oss": ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts", "GptOssConfig"),
}
_HF_EXPERTS: dict[int, tuple[weakref.ref, torch.nn.Module, dict[str, Tensor]]] = {}


def _base_name(name: str) -> str:
    """A named shape's name without the suffixes of its scaled variants ("olmoe@quick" -> "olmoe")."""
    return name.split("@", 1)[0]


def _hf_experts(shape: Shape, inp: Inputs) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """transformers' experts module of a gated shape's model (built on the meta device: it owns no
    memory) and the tensors it is called with (torch.func.functional_call). Mixtral's, Qwen3-MoE's
    and OLMoE's store gate_up_proj [E, 2H, in] and down_proj [E, out, H], the layout of inp.w1 and
    inp.w2: the very tensors. GPT-OSS's store gate and up columns interleaved and both matrices
    transposed (gate_up_proj [E, in, 2H], down_proj [E, H, out]) with biases: copies of inp's
    weights in that layout, made once here, the same numbers."""
    hit = _cached(_HF_EXPERTS, inp)
    if hit is None:
        _HF_EXPERTS.clear()
        import transformers

        import cumo_kernels.hf  # noqa: F401  (registers the "cumo" experts implementation)

        mod_name, cls_name, cfg_name = HF_EXPERTS[_base_name(shape.name)]
        cls = getattr(importlib.import_module(mod_name), cls_name)
        cfg = getattr(transformers, cfg_name)(
            hidden_size=shape.d_in,
            intermediate_size=shape.hidden,
            moe_intermediate_size=shape.hidden,
            num_experts=shape.experts,
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            hidden_act="silu",
        )
        with torch.device("meta"):
            experts = cls(cfg)
        if cls_name == "GptOssExperts":
            e, h = shape.experts, shape.hidden
            gate, up = inp.w1[:, :h], inp.w1[:, h:]
            w1 = torch.stack((gate, up), dim=2).reshape(e, 2 * h, shape.d_in)  # g0, u0, g1, u1, ...
            tensors = {
                "gate_up_proj": w1.transpose(1, 2).contiguous(),  # [E, in, 2H]
                "down_proj": inp.w2.transpose(1, 2).contiguous(),  # [E, H, out]
            }
            if inp.b1 is not None and inp.b2 is not None:
                b1 = torch.stack((inp.b1[:, :h], inp.b1[:, h:]), dim=2).reshape(e, 2 * h)
                tensors.update(gate_up_proj_bias=b1.contiguous(), down_proj_bias=inp.b2.detach().clone())
            tensors = {k: v.detach() for k, v in tensors.items()}
        else:
            tensors = {"gate_up_proj": inp.w1, "down_proj": inp.w2}
        missing = {n for n, _ in experts.named_parameters()} - set(tensors)
        if missing:
            raise ValueError(f"{cls_name} at shape {shape.name}: no tensors for {sorted(missing)}")
        hit = (experts, tensors)
        _HF_EXPERTS[id(inp)] = (weakref.ref(inp), *hit)
    return hit


def _hf_experts_call(shape: Shape, inp: Inputs, pass_: str, implementation: str) -> Callable[[], object]:
    """transformers' experts class of a gated shape with `implementation`, after CuMo's router:
    (y, balance, z) of the whole block, as every other provider computes it."""
    experts, tensors = _hf_experts(shape, inp)
    k = shape.top_k

    def forward() -> tuple[Tensor, Tensor, Tensor]:
        experts.config._experts_implementation = implementation  # read by the experts at each call
        weights, ids, balance, z = cumo_routing(inp.x, inp.gate, k)
        x2 = inp.x.reshape(-1, shape.d_in)
        y = torch.func.functional_call(experts, tensors, (x2, ids.reshape(-1, k), weights.reshape(-1, k)))
        return y.view(*inp.x.shape[:-1], shape.d_out), balance, z

    if pass_ == "fwd":

        def run_fwd() -> object:
            with torch.no_grad():
                return forward()

        return run_fwd
    wrt = [inp.x, inp.gate, *tensors.values()]
    for t in wrt:
        t.requires_grad_(True)

    def run_fwd_bwd() -> object:
        y, bal, z = forward()
        return torch.autograd.grad([y, bal, z], wrt, [inp.dy, torch.ones_like(bal), torch.ones_like(z)])

    return run_fwd_bwd


def _hf_provider(implementation: str) -> Provider:
    def refusal(shape: Shape, device: torch.device, dtype: torch.dtype) -> str | None:
        if not _importable("transformers"):
            return "transformers is not importable"
        return None

    def call(shape: Shape, inp: Inputs, pass_: str) -> Callable[[], object]:
        if shape.hf_family is None:  # a gated shape of HF_EXPERTS: the experts class, CuMo's router
            return _hf_experts_call(shape, inp, pass_, implementation)
        block, config = _hf_block(shape, inp)
        params = list(block.parameters())

        def forward() -> Tensor:
            config._experts_implementation = implementation  # read by the experts at each call
            return block(inp.x)

        if pass_ == "fwd":

            def run_fwd() -> object:
                with torch.no_grad():
                    return (forward(),)

            return run_fwd
        x = inp.x.detach().requires_grad_(True)

        def run_fwd_bwd() -> object:
            config._experts_implementation = implementation
            return torch.autograd.grad(block(x), [x, *params], inp.dy)

        return run_fwd_bwd

    return Provider(f"hf-{implementation}", None, refusal, call=call)


# --------------------------------------------------------------------------------------------
# Peer libraries: only when importable, never failing otherwise.


def _scattermoe_provider() -> Provider:
    def refusal(shape: Shape, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return "scattermoe runs on CUDA only"
        if shape.glu:
            return "the scattermoe adapter builds plain experts (scattermoe's gated MLP is not wired here)"
        if shape.d_out != shape.d_in:
            return "scattermoe's MLP maps in -> hidden -> in (out must equal in)"
        return None

    cache: dict[int, tuple] = {}

    def forward(inp: Inputs, shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
        from scattermoe.mlp import MLP  # type: ignore[import-not-found]

        hit = _cached(cache, inp)
        if hit is None:
            mlp = MLP(shape.d_in, shape.hidden, shape.experts, shape.top_k, activation=ACT[shape.activation])
            hit = (mlp.to(device=inp.x.device, dtype=inp.x.dtype),)
            cache.clear()
            cache[id(inp)] = (weakref.ref(inp), *hit)
        mlp = hit[0]
        weights, experts, balance, z = cumo_routing(inp.x, inp.gate, shape.top_k)
        x2 = inp.x.reshape(-1, shape.d_in)
        y = mlp(x2, weights.reshape(-1, shape.top_k), experts.reshape(-1, shape.top_k))  # type: ignore[operator]
        return y.view_as(inp.x), balance, z

    return Provider("scattermoe", forward, refusal)


def _megablocks_provider() -> Provider:
    def refusal(shape: Shape, device: torch.device, dtype: torch.dtype) -> str | None:
        return "megablocks is importable, but no adapter is written (it routes with its own Megatron-style layer)"

    return Provider("megablocks", None, refusal)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------

ALL_NAMES = (
    "cumo-cuda",
    "cumo-triton",
    "cumo-torch",
    "cumo-auto",
    "cumo-loop",
    "grouped_mm",
    "dense",
    "dense-mlp",
    "scattermoe",
    "megablocks",
    *(f"hf-{i}" for i in HF_IMPLEMENTATIONS),
)


def providers_for(device: torch.device, wanted: list[str] | None) -> tuple[list[Provider], list[tuple[str, str]]]:
    """The providers to run on `device` (in ALL_NAMES order) and (name, reason) of those left out."""
    out: list[Provider] = []
    left: list[tuple[str, str]] = []
    explicit = wanted is not None
    names = list(ALL_NAMES) if wanted is None else wanted
    unknown = [n for n in names if n not in ALL_NAMES]
    if unknown:
        raise ValueError(f"--providers: unknown {', '.join(unknown)}; known: {', '.join(ALL_NAMES)}")
    backends, why_not = _cumo_backends(device)
    for name in ALL_NAMES:
        if name not in names:
            continue
        if name.startswith("cumo-") and name != "cumo-loop":
            backend = name.removeprefix("cumo-")
            if why_not is not None:
                left.append((name, why_not))
            elif backend == "auto" or backend in backends:
                if backend == "triton" and device.type == "cpu" and not explicit:
                    left.append((name, "triton on CPU is the interpreter (timings meaningless); ask with --providers"))
                else:
                    out.append(_cumo_provider(backend))
            else:
                left.append((name, f"cumo_kernels.available_backends({device.type!r}) = {backends} lacks {backend!r}"))
        elif name == "cumo-loop":
            out.append(Provider(name, loop_forward))
        elif name == "grouped_mm":
            out.append(Provider(name, grouped_mm_forward, _grouped_mm_refusal))
        elif name in ("dense", "dense-mlp"):
            out.append(Provider(name, None, is_dense=True))
        elif name == "scattermoe":
            if _importable("scattermoe"):
                out.append(_scattermoe_provider())
            elif explicit:
                left.append((name, "scattermoe is not importable"))
        elif name == "megablocks":
            if _importable("megablocks"):
                out.append(_megablocks_provider())
            elif explicit:
                left.append((name, "megablocks is not importable"))
        elif name.startswith("hf-"):
            if explicit:
                out.append(_hf_provider(name.removeprefix("hf-")))
            else:  # they run only the transformers shapes: no refusal lines on every other shape
                left.append(
                    (name, "runs olmoe-layer, qwen3-moe-layer and the gated shapes only; name it in --providers")
                )
    return out, left
