"""cumo_kernels.hf: the transformers experts backend "cumo".

Each family of tests/hf_families.py is built as a tiny random model twice from one config and one
state dict, run with transformers' "eager" experts and with "cumo"; logits and every parameter's
gradient must match the float64 reference (the same model, eager, in float64) within the fp32
policy (1e-5 relative), and the cumo run must have executed cumo:: ops (observed at the dispatcher).
Families a transformers release lacks are skipped, naming the release.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import cumo_kernels.hf as hf  # noqa: E402
from cumo_kernels.testing import TOLERANCES, assert_close_rel, rel_err  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import FAMILIES, tiny_config  # noqa: E402

F32 = torch.float32
VERSION = transformers.__version__


class CumoOps(TorchDispatchMode):
    """Records the cumo:: ops that reach the dispatcher, with their string arguments (the
    activation where an op has one, then the backend, always last)."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: set[tuple[str, tuple[str, ...]]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cumo":
            self.ran.add((func.name(), tuple(a for a in args if isinstance(a, str))))
        return func(*args, **(kwargs or {}))

    def names(self) -> set[str]:
        return {n for n, _ in self.ran}

    def backends(self) -> set[str]:
        return {strs[-1] for _, strs in self.ran}


def _config(family: str, **overrides):
    cfg = tiny_config(family, **overrides)
    if cfg is None:
        pytest.skip(f"transformers {VERSION} has no {FAMILIES[family][0]}")
    return cfg


def _models(family: str, *impls: str, seed: int = 0, **overrides):
    """One model per implementation in `impls`, built from one config and one state dict."""
    from transformers import AutoModelForCausalLM

    cfg = _config(family, **overrides)
    torch.manual_seed(seed)
    first = AutoModelForCausalLM.from_config(cfg)
    state = first.state_dict()
    models = []
    for impl in impls:
        m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))  # a config of its own: the implementation
        m.load_state_dict(state)
        m.set_experts_implementation(impl)
        models.append(m.train())
    return models


def _batch(vocab: int, seed: int = 1, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _run(model, ids: torch.Tensor, probe: torch.Tensor | None = None):
    """Logits and {name: grad} of sum(logits * probe)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    if probe is None:
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=F32)
    (logits * probe.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, probe


def _experts_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")]


# ------------------------------------------------------------------------------ registration


def test_import_cumo_kernels_does_not_import_transformers():
    code = "import sys, cumo_kernels; assert 'transformers' not in sys.modules, 'imported'; print('lean')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr


def test_register_is_idempotent_and_names_cumo():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    assert ALL_EXPERTS_FUNCTIONS["cumo"] is hf.experts_forward  # registered on import
    assert hf.register() == "cumo" and hf.register() == "cumo"
    assert ExpertsInterface._global_mapping["cumo"] is hf.experts_forward


def test_model_takes_cumo_by_config_and_by_setter():
    from transformers import AutoModelForCausalLM

    cfg = _config("olmoe")
    cfg._experts_implementation = "cumo"
    m = AutoModelForCausalLM.from_config(cfg)
    assert m.config._experts_implementation == "cumo"
    with CumoOps() as rec:
        m(_batch(cfg.vocab_size))
    assert "cumo::permute" in rec.names()


# ------------------------------------------------------------------------------ every family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_eager(family):
    """Logits and every parameter's gradient, "cumo" in float32 against the float64 eager model."""
    eager, cumo, ref = _models(family, "eager", "cumo", "eager")
    ref = ref.double()
    ids = _batch(eager.config.vocab_size)
    logits64, grads64, probe = _run(ref, ids)
    with CumoOps() as seen_eager:
        logits_e, grads_e, _ = _run(eager, ids, probe)
    with CumoOps() as seen:
        logits_c, grads_c, _ = _run(cumo, ids, probe)
    assert not seen_eager.ran, "the eager run reached cumo ops: the test cannot tell the two apart"
    for op in ("permute", "grouped_linear", "unpermute"):
        assert f"cumo::{op}" in seen.names() and f"cumo::{op}_backward" in seen.names(), seen.ran
    # the gated first layer runs fused where cumo has the model's gate (every gated family here)
    fused = {hf.fused_gate(m) is not None for m in _experts_modules(cumo)}
    assert fused == {getattr(_experts_modules(cumo)[0], "has_gate", True)}, family
    for op in ("cumo::grouped_linear_glu", "cumo::grouped_linear_glu_backward"):
        assert (op in seen.names()) == (True in fused), (family, op, seen.ran)
    layers = len(_experts_modules(cumo))
    assert layers >= 2
    tol = TOLERANCES[F32]
    assert_close_rel(logits_c, logits64, F32, f"{family} logits")
    assert rel_err(logits_e, logits64) <= tol  # the policy holds for transformers' own fp32 eager
    for name, g64 in grads64.items():
        g = grads_c[name]
        assert (g is None) == (g64 is None), f"{family} {name}: gradient presence differs from eager"
        if g64 is not None:
            assert_close_rel(g, g64, F32, f"{family} grad {name}")


def test_family_table_covers_the_issue():
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "nemotron_h"} <= set(FAMILIES)


# ------------------------------------------------------------------------------ every layout flag


class _Experts(torch.nn.Module):
    """An experts module as `@use_experts_implementation` leaves it, with the flags given (the
    function under test reads only these attributes)."""

    def __init__(self, e, h, i, *, gated, concatenated, transposed, bias, act, norm, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n1 = 2 * i if gated else i

        def param(*shape):
            return torch.nn.Parameter((torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype))

        first = "gate_up_proj" if gated else "up_proj"
        setattr(self, first, param(e, h, n1) if transposed else param(e, n1, h))
        self.down_proj = param(e, i, h) if transposed else param(e, h, i)
        if bias:
            setattr(self, first + "_bias", param(e, n1))
            self.down_proj_bias = param(e, h)
        self.num_experts, self.intermediate = e, i
        self.has_gate, self.has_bias, self.is_transposed = gated, bias, transposed
        self.is_concatenated, self.has_post_expert_norm = concatenated, norm is not None
        self.act_fn = act
        if norm is not None:
            self.post_expert_norm = norm.to(dtype)

    def _apply_gate(self, gate_up):
        if self.is_concatenated:
            gate, up = gate_up.chunk(2, dim=-1)
        else:  # interleaved columns, with GPT-OSS's clamped SwiGLU
            gate, up = gate_up[..., ::2].clamp(max=7.0), gate_up[..., 1::2].clamp(-7.0, 7.0)
            return (up + 1) * (gate * torch.sigmoid(1.702 * gate))
        return self.act_fn(gate) * up


def _oracle(mod: _Experts, x, ids, w):
    """The experts' definition, slot by slot, in the tensors' own dtype (float64 for the reference):
    sum_j w[t, j] * down(gate(x_t)) over the slots whose id is a local expert (ids >= E dropped)."""
    params = dict(mod.named_parameters())
    first = "gate_up_proj" if mod.has_gate else "up_proj"
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, w.dtype))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= mod.num_experts:
                continue
            w1, w2 = params[first][e], params["down_proj"][e]
            if mod.is_transposed:
                w1, w2 = w1.t(), w2.t()
            pre = w1 @ x[t] + (params[first + "_bias"][e] if mod.has_bias else 0)
            h = mod._apply_gate(pre) if mod.has_gate else mod.act_fn(pre)
            y = w2 @ h + (params["down_proj_bias"][e] if mod.has_bias else 0)
            if mod.has_post_expert_norm:
                y = mod.post_expert_norm(y[None])[0]
            out[t] = out[t] + w[t, j] * y
    return out.to(x.dtype)


class _RMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, y):
        return self.weight * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)


def _layout(name, dtype=torch.float64):
    act = transformers.activations.ACT2FN
    e, h, i = 5, 12, 10
    kinds = {
        "concat": dict(gated=True, concatenated=True, transposed=False, bias=False, act=act["silu"], norm=None),
        "concat_transposed_bias": dict(
            gated=True, concatenated=True, transposed=True, bias=True, act=act["gelu"], norm=None
        ),
        "interleaved_transposed_bias": dict(
            gated=True, concatenated=False, transposed=True, bias=True, act=None, norm=None
        ),
        "plain_relu2": dict(gated=False, concatenated=True, transposed=False, bias=False, act=act["relu2"], norm=None),
        "plain_silu_bias": dict(
            gated=False, concatenated=True, transposed=False, bias=True, act=act["silu"], norm=None
        ),
        "post_rmsnorm": dict(
            gated=True, concatenated=True, transposed=False, bias=False, act=act["silu"], norm=_RMSNorm(h)
        ),
        "post_layernorm": dict(
            gated=True, concatenated=True, transposed=False, bias=True, act=act["silu"], norm=torch.nn.LayerNorm(h)
        ),
    }
    return _Experts(e, h, i, dtype=dtype, **kinds[name])


LAYOUTS = [
    "concat",
    "concat_transposed_bias",
    "interleaved_transposed_bias",
    "plain_relu2",
    "plain_silu_bias",
    "post_rmsnorm",
    "post_layernorm",
]


def _routing(t=9, k=3, e=5, seed=3):
    """ids over experts 0..e-2 (expert e-1 gets no token) plus sentinel slots (ids e and e+3)
    carrying nonzero weights, which must count for nothing."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])
    ids[1, 0], ids[4, 2], ids[7, 1] = e, e + 3, e
    w = torch.rand(t, k, generator=g) + 0.1
    return ids, w


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_the_definition(layout):
    """Every flag (gated or not, concatenated or interleaved, transposed, biases, the post-expert
    norm), sentinel ids dropped, an expert without tokens: output and every gradient against the
    float64 definition, fp32 policy."""
    ref = _layout(layout)
    mod = _layout(layout, F32)
    ids, w = _routing()
    x64 = torch.randn(ids.shape[0], 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x64.requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    y64 = _oracle(ref, x64, ids, w64)
    probe = torch.randn(y64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (y64 * probe).sum().backward()

    x = x64.detach().float().requires_grad_(True)
    wf = w.requires_grad_(True)
    with CumoOps() as seen:
        y = hf.experts_forward(mod, x, ids, wf)
        (y * probe.float()).sum().backward()
    assert {"cumo::permute", "cumo::grouped_linear", "cumo::unpermute"} <= seen.names()
    assert y.dtype == F32 and wf.grad.dtype == F32
    assert_close_rel(y, y64, F32, f"{layout} out")
    assert_close_rel(x.grad, x64.grad, F32, f"{layout} grad hidden_states")
    assert_close_rel(wf.grad, w64.grad, F32, f"{layout} grad top_k_weights")
    sentinel = ids >= 5
    assert (wf.grad[sentinel] == 0).all(), "a sentinel slot got a routing-weight gradient"
    for (name, p), (_, p64) in zip(mod.named_parameters(), ref.named_parameters()):
        assert_close_rel(p.grad, p64.grad, F32, f"{layout} grad {name}")
    first = "gate_up_proj" if mod.has_gate else "up_proj"
    assert (getattr(mod, first).grad[4] == 0).all(), "the expert without tokens got a gradient"


def test_activation_fused_only_where_it_is_the_same_function():
    act = transformers.activations.ACT2FN
    assert hf.activation_name(act["silu"]) == "silu"
    assert hf.activation_name(act["swish"]) == "silu"
    assert hf.activation_name(act["gelu"]) == "gelu"
    assert hf.activation_name(act["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert hf.activation_name(act["quick_gelu"]) == "quick_gelu"
    assert hf.activation_name(act["relu"]) == "relu"
    for other in ("relu2", "gelu_new", "gelu_python", "gelu_python_tanh", "mish", "tanh"):
        assert hf.activation_name(act[other]) is None, other
    # Non-gated experts: a known activation runs in grouped_linear's epilogue, another one as the model's own.
    for layout, fused in (("plain_silu_bias", "silu"), ("plain_relu2", "none")):
        mod = _layout(layout, F32)
        ids, w = _routing()
        with CumoOps() as seen:
            with torch.no_grad():
                hf.experts_forward(mod, torch.randn(ids.shape[0], 12), ids, w)
        first_layer = {strs[0] for n, strs in seen.ran if n == "cumo::grouped_linear"} - {"none"}
        assert first_layer == ({fused} if fused != "none" else set()), seen.ran


# ------------------------------------------------------------------------------ dtypes


def test_float32_routing_weights_with_bfloat16_experts():
    """Mixtral and DeepSeek-V3 pass float32 routing weights to bfloat16 experts: the weights are
    not rounded to bfloat16 (the combine runs in float32 and rounds once, to the experts' dtype),
    and their gradient comes back in float32."""
    bf16 = torch.bfloat16
    ref = _layout("concat")
    mod = _layout("concat", bf16)
    ids, w = _routing()
    x64 = torch.randn(ids.shape[0], 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x64.to(bf16).requires_grad_(True)
    wf = w.clone().requires_grad_(True)
    y = hf.experts_forward(mod, x, ids, wf)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    assert y.dtype == bf16 and wf.grad.dtype == F32
    x64r = x.detach().double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    for p, p64 in zip(mod.parameters(), ref.parameters()):
        p64.data.copy_(p.data.double())
    y64 = _oracle(ref, x64r, ids, w64)
    (y64 * torch.linspace(-1, 1, y64.numel(), dtype=torch.float64).view(y64.shape)).sum().backward()
    # The same definition evaluated in bfloat16 by torch (as transformers' eager loop runs): the baseline.
    with torch.no_grad():
        base = _oracle(mod, x.detach(), ids, w)
    assert_close_rel(y, y64, bf16, "bf16 out", baseline=base)
    assert_close_rel(wf.grad, w64.grad, bf16, "grad of the float32 routing weights")
    assert (wf.grad[ids >= 5] == 0).all()


def test_int32_ids_and_leading_shape():
    mod = _layout("concat", F32)
    ids, w = _routing()
    x = torch.randn(ids.shape[0], 12)
    a = hf.experts_forward(mod, x, ids, w)
    b = hf.experts_forward(mod, x.view(3, 3, 12), ids.int().view(3, 3, -1), w.view(3, 3, -1))
    assert b.shape == (3, 3, 12) and torch.equal(a, b.view_as(a))


def test_no_tokens():
    mod = _layout("concat_transposed_bias", F32)
    x = torch.zeros(0, 12, requires_grad=True)
    y = hf.experts_forward(mod, x, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    y.sum().backward()
    assert y.shape == (0, 12) and x.grad.shape == (0, 12)
    assert all(p.grad is not None and (p.grad == 0).all() for p in mod.parameters())


# ------------------------------------------------------------------------------ backends


def test_backend_from_the_environment(monkeypatch, device, backend):
    """CUMO_KERNELS_BACKEND chooses the backend of every cumo op of the experts (in the Triton
    interpreter suite this runs the triton backend); the model still matches eager."""
    monkeypatch.setenv("CUMO_KERNELS_BACKEND", backend)
    eager, cumo = _models("olmoe", "eager", "cumo")
    eager, cumo = eager.to(device), cumo.to(device)
    ids = _batch(cumo.config.vocab_size, shape=(1, 6)).to(device)  # few tokens: the interpreter is slow
    le, ge, probe = _run(eager, ids)
    with CumoOps() as seen:
        lc, gc, _ = _run(cumo, ids, probe)
    assert seen.backends() == {backend}, seen.ran
    assert_close_rel(lc, le.double(), F32, f"{backend} logits")
    for name in (
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.gate.weight",
        "model.embed_tokens.weight",
    ):
        assert_close_rel(gc[name], ge[name].double(), F32, f"{backend} grad {name}")


def test_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("CUMO_KERNELS_BACKEND", "fast")
    mod = _layout("concat", F32)
    ids, w = _routing()
    with pytest.raises(ValueError, match="CUMO_KERNELS_BACKEND: unknown backend 'fast'"):
        hf.experts_forward(mod, torch.randn(ids.shape[0], 12), ids, w)


# ------------------------------------------------------------------------------ torch.compile, autocast


def _layer_inputs(model, tokens=7, seed=6):
    h = model.config.hidden_size
    x = torch.randn(1, tokens, h, generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(tokens)[None]
    return x, model.model.rotary_emb(x, pos)


def _layer_step(layer, x, pe, fn=None):
    """Output and gradients (of the input and of `layer`'s parameters) of `fn` (default: `layer`
    itself; a compiled `layer`)."""
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = (layer if fn is None else fn)(xi, position_embeddings=pe, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()
    return out.detach(), {"hidden_states": xi.grad} | {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_compile_decoder_layer_fullgraph(family):
    """torch.compile(fullgraph=True) of a whole decoder layer (attention, router, experts) with
    "cumo": no graph break, forward and every gradient equal to the layer run eagerly. Dynamo's
    full graph through AOTAutograd (the ops' fakes and autograd formulas); inductor's C++ build of
    a layer's forward and backward would cost CI 40-140 s per layer on its 2 cores, so inductor
    compiles the inference case below, and tests/test_compile.py the layer's ops fwd+bwd."""
    torch._dynamo.reset()
    (cumo,) = _models(family, "cumo")
    layer = cumo.model.layers[0]
    x, pe = _layer_inputs(cumo)
    ye, ge = _layer_step(layer, x, pe)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yc, gc = _layer_step(layer, x, pe, torch.compile(layer, fullgraph=True, backend="aot_eager"))
    ran = {e.key for e in prof.key_averages()}  # (a dispatch mode cannot watch compiled code)
    assert {"cumo::permute", "cumo::grouped_linear", "cumo::unpermute", "cumo::grouped_linear_backward"} <= ran
    assert_close_rel(yc, ye.double(), F32, f"{family} compiled layer")
    for name, g in ge.items():
        assert_close_rel(gc[name], g.double(), F32, f"{family} compiled grad {name}")


@pytest.mark.slow
def test_compile_moe_block_inductor():
    """Inductor (torch.compile's default) on the MoE block (router, experts, the glue of
    cumo_kernels.hf), forward and backward: the whole decoder layer's C++ build would cost CI
    40-140 s on its 2 cores."""
    torch._dynamo.reset()
    (cumo,) = _models("qwen3_moe", "cumo")
    block = cumo.model.layers[1].mlp
    x, _ = _layer_inputs(cumo)

    def step(fn):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        fn(xi).pow(2).mean().backward()
        return xi.grad, {n: p.grad for n, p in block.named_parameters()}

    ge, pe = step(block)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gc, pc = step(torch.compile(block, fullgraph=True))
    assert {"cumo::permute", "cumo::grouped_linear", "cumo::grouped_linear_backward"} <= {
        e.key for e in prof.key_averages()
    }
    assert_close_rel(gc, ge.double(), F32, "inductor MoE block grad x")
    for name, g in pe.items():
        assert_close_rel(pc[name], g.double(), F32, f"inductor MoE block grad {name}")


@pytest.mark.slow
def test_compile_decoder_layer_fullgraph_under_autocast():
    """The same under torch.autocast(cpu, bfloat16) (dynamo's full graph and AOTAutograd): the
    experts' GEMMs take bfloat16 operands as nn.Linear's do; compiled and eager cumo agree, and
    cumo agrees with transformers' eager experts under the same autocast, within the bfloat16
    policy."""
    torch._dynamo.reset()
    eager, cumo = _models("qwen3_moe", "eager", "cumo")
    x, pe = _layer_inputs(cumo)
    bf16 = torch.bfloat16
    with torch.autocast("cpu", dtype=bf16):
        ref_y, ref_g = _layer_step(eager.model.layers[0], x, pe)
        ye, ge = _layer_step(cumo.model.layers[0], x, pe)
        layer = cumo.model.layers[0]
        yc, gc = _layer_step(layer, x, pe, torch.compile(layer, fullgraph=True, backend="aot_eager"))
    with torch.no_grad():
        y64 = eager.double().model.layers[0](x.double(), position_embeddings=tuple(p.double() for p in pe))
        y64 = y64[0] if isinstance(y64, tuple) else y64
    assert ye.dtype == ref_y.dtype
    assert_close_rel(ye, y64, bf16, "autocast cumo layer", baseline=ref_y)
    assert_close_rel(yc, ye.double(), bf16, "autocast compiled layer")
    for name in ("hidden_states", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"):
        assert_close_rel(gc[name], ge[name].double(), bf16, f"autocast compiled grad {name}")
        assert_close_rel(ge[name], ref_g[name].double(), bf16, f"autocast grad {name} against eager experts")


# ------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h"])
def test_generate_greedy_tokens_equal_eager(family):
    eager, cumo = _models(family, "eager", "cumo")
    ids = _batch(cumo.config.vocab_size, shape=(2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        te = eager.eval().generate(ids, **kwargs)
        with CumoOps() as seen:
            tc = cumo.eval().generate(ids, **kwargs)
    assert "cumo::permute" in seen.names()
    assert te.shape[1] == ids.shape[1] + 6 and torch.equal(tc, te)


# ------------------------------------------------------------------------------ expert parallelism


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_expert_parallel_two_processes_equal_one(tmp_path):
    """transformers' own expert parallelism (2 processes, gloo; DistributedConfig as each release
    documents it) with "cumo": logits and every gradient equal to one process. Qwen3-MoE runs the
    sentinel path (every rank sees the whole batch; the other rank's slots arrive as ids >=
    num_experts, weight 0), GPT-OSS (biases sharded with the experts) transformers' all-to-all
    token exchange where the release has one."""
    import importlib.util

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip(f"transformers {VERSION} loads a model with a distributed_config only with accelerate installed")
    from transformers.distributed.configuration_utils import DistributedConfig

    modern = "ep_size" in getattr(DistributedConfig, "__dataclass_fields__", {})
    jobs, refs = [], {}
    for family, implementation in (("qwen3_moe", "all_reduce"), ("gpt_oss", "all_to_all")):
        (model,) = _models(family, "cumo")
        path = tmp_path / family
        model.save_pretrained(path)
        ids = _batch(model.config.vocab_size)
        logits, grads, probe = _run(model, ids)
        torch.save({"input_ids": ids, "probe": probe}, path / "batch.pt")
        job = f"{path}:{implementation}"
        jobs.append(job)
        refs[job] = (family, implementation, logits, grads, _experts_modules(model)[0].num_experts)
    port = _free_port()
    root = str(Path(__file__).parent.parent)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        env |= dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(Path(__file__).parent / "hf_ep_worker.py"), str(tmp_path / f"rank{rank}.pt"), *jobs]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(textwrap.shorten(x, 4000) for x in logs)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for job, (family, implementation, logits, grads, experts) in refs.items():
            r = results[job]
            what = f"{family} rank {rank} ({implementation if modern else 'enable_expert_parallel'})"
            assert {"permute", "grouped_linear", "unpermute"} <= {o.split("::")[1] for o in r["ops"]}, what
            assert set(r["local_experts"]) == {experts // 2}, what
            if implementation == "all_reduce" or not modern:
                assert r["slots"]["sentinel"] > 0, f"{what}: no sentinel slot reached the experts"
            assert_close_rel(r["logits"], logits.double(), F32, f"{what} logits")
            for name, g in grads.items():
                assert_close_rel(r["grads"][name], g.double(), F32, f"{what} grad {name}")


# ------------------------------------------------------------------------------ the benchmark providers


def test_benchmark_cli_runs_the_hf_providers(tmp_path):
    """`python -m benchmarks --shapes olmoe-layer --providers hf-cumo,hf-grouped_mm,hf-eager`, at
    the --quick scale: every provider times the family's MoE block, the ratios to transformers'
    grouped_mm and eager are recorded, the other providers refuse the shape with the reason."""
    import json

    from benchmarks import schema
    from benchmarks.cli import main as bench_main

    out = tmp_path / "r.json"
    args = ["--quick", "--device", "cpu", "--shapes", "olmoe-layer", "--passes", "fwd", "--reps", "1"]
    args += ["--providers", "hf-cumo,hf-grouped_mm,hf-eager,cumo-torch", "--no-ceilings", "--out", str(out)]
    assert bench_main(args) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["complete"] is True
    rows = {r["provider"]: r for r in doc["results"]}
    assert set(rows) == {"hf-cumo", "hf-grouped_mm", "hf-eager"}
    assert rows["hf-cumo"]["speedup_vs_hf-grouped_mm"] > 0 and rows["hf-cumo"]["speedup_vs_hf-eager"] > 0
    assert [s["provider"] for s in doc["skipped"]] == ["cumo-torch"]
