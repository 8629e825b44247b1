"""`moe_mlp`: the whole MoE MLP block, on one backend chosen at entry, as that backend's
composition of the cumo ops (the contract, and each op's shapes: cumo_kernels.backend).

- "unfused" (the torch and cuda backends): the router logits `F.linear(x, gate_weight)` (an
  ordinary autograd op) -> cumo::route -> cumo::permute -> cumo::grouped_linear (fc1, fc2) ->
  cumo::unpermute; with the feature "expert_mlp" (the torch backend), inference on CPU tensors
  runs both expert layers as one cumo::expert_mlp.
- "fused" (the triton backend): cumo::route_x (router GEMM + routing) -> cumo::sort_experts ->
  cumo::grouped_linear_gather (fc1 reading x through the sort order) ->
  cumo::grouped_linear_combine (fc2 + weighted combine).
Both end in cumo::aux_losses. Each op is a `torch.library` custom op in the `cumo` namespace with
a fake and autograd (backward ops are custom ops too, named `<op>_backward`), given the chosen
backend's name. Between the ops the routing travels as one `Routing` record.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch, tuning
from ._common import check_activation, check_device, check_float, check_shape, check_top_k, needs_grad
from .grouped_linear import _expert_mlp, _grouped_linear, _grouped_linear_combine, _grouped_linear_gather
from .grouped_linear_glu import (
    GLU_LAYOUTS,
    _expert_mlp_glu,
    _grouped_linear_glu,
    _grouped_linear_glu_combine,
    _grouped_linear_glu_gather,
    check_glu_activation,
    check_w1_glu,
)
from .permute import _permute, _sort_experts, _unpermute
from .routing import Routing, _aux_losses, _route, _route_x

# What torch.autocast casts (its "eligible" tensors): float32, float16 and bfloat16, never float64.
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(tensors: list[Tensor | None], device_type: str) -> list[Tensor | None]:
    """Under torch.autocast the block behaves like the nn.Linear layers it replaces: floating
    inputs are cast to the autocast dtype, except float64 ones, which autocast leaves alone.

    Not `torch.library.register_autocast` on each op (DESIGN.md asks for it): that casts to a
    dtype fixed when the op is registered, while `torch.autocast(device, dtype=...)` picks float16
    or bfloat16 per region; and casting at the layer's entry keeps the layer's own checks (one
    dtype for x and every weight) and CuMo's float32 statistics as they are. benchmarks/NOTES.md,
    issue 20."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors]
    return tensors


def _needs_grad(*tensors: Tensor | None) -> bool:
    return needs_grad(*tensors)


def _connected_zero(tensors: tuple[Tensor | None, ...], dtype: torch.dtype) -> Tensor:
    """A scalar 0 in `dtype` whose graph reaches every tensor given (an empty input's output and
    losses): each parameter then gets a zero gradient, not None, as a dense MLP's do for an empty
    batch (under DDP a rank whose parameters get no gradient hangs its peers). Sums of empty
    slices: exactly 0 whatever the values (no 0 * inf = NaN), their gradients zeros."""
    parts = [t.narrow(0, 0, 0).sum().to(dtype) for t in tensors if t is not None]
    return torch.stack(parts).sum()


def _out(y: Tensor, shape: torch.Size) -> Tensor:
    """y [T, out] given x's leading shape: not a view (FSDP2 warns on view outputs, and an in-place
    op on a view needs autograd's view tracking). `_unsafe_view` is the reshape aten's own matmul
    uses for an intermediate nobody else holds: y is no input and no tensor saved for backward."""
    return y if y.shape == shape else torch.ops.aten._unsafe_view(y, shape)


def _workload(x: Tensor, hidden: int, d_out: int, e: int, top_k: int, tensors: tuple) -> tuning.Workload | None:
    """The layer call's shape and pass, for auto's measured order on a GPU (cumo_kernels.tuning);
    None on CPU tensors and under torch.compile (whose traced shapes may be symbolic: the static
    order then stands)."""
    if x.device.type != "cuda" or torch.compiler.is_compiling():
        return None
    return tuning.Workload(
        tokens=math.prod(x.shape[:-1]),
        d_in=x.shape[-1],
        hidden=hidden,
        d_out=d_out,
        experts=e,
        top_k=top_k,
        dtype=str(x.dtype).removeprefix("torch."),
        pass_="fwd+bwd" if _needs_grad(*tensors) else "fwd",
    )


def _weights(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> tuple:
    """The expert weights as the ops take them (contiguous; no copy when they already are)."""
    return (
        w1.contiguous(),
        None if b1 is None else b1.contiguous(),
        w2.contiguous(),
        None if b2 is None else b2.contiguous(),
    )


def _unfused(
    x2: Tensor, gate_weight: Tensor, weights: tuple, top_k: int, activation: str, samples: int, backend: str
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The unfused composition: (y [T, out], (prob_sums, first_counts, z_sums)).

    x2 [T, in] (T > 0); `weights` = _weights(w1, b1, w2, b2); the rest as `moe_mlp`'s, checked by it.
    """
    w1, b1, w2, b2 = weights
    logits = F.linear(x2, gate_weight)
    probs, expert_ids, prob_sums, first_counts, z_sums = _route(logits, top_k, samples, backend)
    x_sorted, sort_idx, offsets = _permute(x2.contiguous(), expert_ids, gate_weight.shape[0], backend)
    routing = Routing(probs, expert_ids, sort_idx, offsets, top_k, gate_weight.shape[0])
    if (
        x2.device.type == "cpu"
        and dispatch.has_feature(backend, "expert_mlp")
        and not needs_grad(x2, gate_weight, w1, b1, w2, b2)
    ):
        # Inference on the CPU: both expert layers in one op, block by block, so the [T*k, hidden]
        # activations never go to memory (that, not the GEMMs, was what separated this path from
        # CuMo's loop in the forward).
        y_sorted = _expert_mlp(x_sorted, w1, b1, w2, b2, routing.offsets, activation, backend)
    else:
        h = _grouped_linear(x_sorted, w1, b1, routing.offsets, activation, backend)[0]
        y_sorted = _grouped_linear(h, w2, b2, routing.offsets, "none", backend)[0]
    return _unpermute(y_sorted, routing.sort_idx, routing.weights, backend), (prob_sums, first_counts, z_sums)


def _fused(
    x2: Tensor, gate_weight: Tensor, weights: tuple, top_k: int, activation: str, samples: int, backend: str
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The fused composition: (y [T, out], (prob_sums, first_counts, z_sums)); arguments as
    `_unfused`'s."""
    w1, b1, w2, b2 = weights
    e = gate_weight.shape[0]
    probs, expert_ids, prob_sums, first_counts, z_sums, _ = _route_x(
        x2, gate_weight.contiguous(), top_k, samples, backend
    )
    sort_idx, offsets = _sort_experts(expert_ids, e, backend)
    routing = Routing(probs, expert_ids, sort_idx, offsets, top_k, e)
    # The pre-activation is kept only when a backward through fc1 can follow (not in inference).
    save_pre = needs_grad(x2, w1, b1)
    h, _ = _grouped_linear_gather(
        x2, w1, b1, routing.sort_idx, routing.offsets, routing.top_k, activation, save_pre, backend
    )
    y, _ = _grouped_linear_combine(h, w2, b2, routing.sort_idx, routing.offsets, routing.weights, backend)
    return y, (prob_sums, first_counts, z_sums)


_COMPOSITIONS = {"unfused": _unfused, "fused": _fused}


def moe_mlp(
    x: Tensor,
    gate_weight: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    top_k: int,
    activation: str = "quick_gelu",
    glu: bool | str = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CuMo's sparse top-k MoE MLP block (CUMO.md, "Routing and the auxiliary losses"), with plain
    experts fc2(act(fc1 x)) or gated ones fc2(act(x W_gate^T + b_gate) * (x W_up^T + b_up)).

    Args:
        x: [T, in] (one sample) or [B, N, in] (balance statistics per sample along dim 0).
        gate_weight: [E, in], the bias-free router.
        w1: [E, hidden, in]; b1: [E, hidden] or None (fc1 of each expert). With `glu`:
            w1 [E, 2*hidden, in] holding each expert's gate rows and up rows, b1 [E, 2*hidden] or
            None in the same row layout; any strides (a weight stored transposed, [E, in,
            2*hidden], is passed as `w.transpose(1, 2)` and read in place, never copied).
        w2: [E, out, hidden]; b2: [E, out] or None (fc2 of each expert).
        top_k: experts per token, 1 <= top_k <= E.
        activation: "quick_gelu" (CLIP), "gelu" (erf; the connector), "gelu_tanh", "silu", "relu",
            "relu2" (relu(x)^2); with `glu` the gate's activation ("silu": SwiGLU, "gelu" /
            "gelu_tanh": GeGLU, ...) or "gpt_oss_swiglu" (GPT-OSS's clamped SwiGLU).
        glu: False (plain experts), True or "concat" (gated; w1's gate rows then its up rows, as
            transformers' `gate_up_proj`), or "interleaved" (gated; gate and up rows alternating,
            g0, u0, g1, u1, ..., as GPT-OSS stores them).
        backend: None (then $CUMO_KERNELS_BACKEND, else "auto"), "auto", "torch", "triton", "cuda".

    Returns:
        y: x's leading shape with `out` features, x.dtype;
        balance_loss: float32 scalar, mean_{b,e}(P[b,e] * f[b,e]) * E^2;
        z_loss: scalar in x.dtype, mean over tokens of logsumexp(logits)^2.
        An empty input (T = 0) gives an empty y and zero losses.
    """
    if torch.jit.is_tracing():
        raise RuntimeError(
            "cumo_kernels.moe_mlp: torch.jit.trace is not supported: a trace freezes the Python values the "
            "layer decides by per call (the tokens per sample of the balance loss, the empty-input case, "
            "inference or training ops, the backend); use torch.compile or torch.export, which trace it"
        )
    check_float("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected shape [T, in] or [B, N, in], got {list(x.shape)}")
    dispatch.resolve_name(backend)
    x, gate_weight, w1, b1, w2, b2 = _autocast([x, gate_weight, w1, b1, w2, b2], x.device.type)
    d_in = x.shape[-1]
    check_float("gate_weight", gate_weight, x.dtype)
    if gate_weight.dim() != 2:
        raise ValueError(f"gate_weight: expected shape [E, in], got {list(gate_weight.shape)}")
    e = gate_weight.shape[0]
    if (
        gate_weight.shape[1] != d_in
        and isinstance(w1, Tensor)
        and w1.dim() == 3
        and w1.shape[2] == gate_weight.shape[1]
    ):
        # The weights agree on their input width and x does not: x is the one at fault (MoEMLP's
        # input of the wrong width used to blame gate_weight).
        raise ValueError(
            f"x: expected [..., {gate_weight.shape[1]}] (in = the width gate_weight and w1 take), got {list(x.shape)}"
        )
    check_shape("gate_weight", gate_weight, (e, d_in), f"E, in with in = x.shape[-1] = {d_in}")
    check_float("w1", w1, x.dtype)
    layout = glu_layout(glu)
    if layout is None:
        check_shape("w1", w1, (e, None, d_in), f"E={e} experts, hidden, in={d_in}")
        hidden = w1.shape[1]
    else:
        hidden = check_w1_glu(w1, e, d_in)
    check_float("w2", w2, x.dtype)
    check_shape("w2", w2, (e, None, hidden), f"E={e} experts, out, hidden={hidden}")
    d_out = w2.shape[1]
    for name, b, n in (("b1", b1, w1.shape[1]), ("b2", b2, d_out)):
        if b is not None:
            check_float(name, b, x.dtype)
            check_shape(name, b, (e, n), f"E={e}, {n}")
    for name, t in (("gate_weight", gate_weight), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None:
            check_device(name, t, x.device)
    check_top_k(top_k, e)
    if layout is None:
        check_activation(activation)
    else:
        check_glu_activation(activation)
    # One backend for the whole call, chosen here from every candidate's reasons.
    # (Gated calls take auto's static order: no GPU run has measured one; tuning.Workload is the
    # plain layer's.)
    tensors = (x, gate_weight, w1, b1, w2, b2)
    workload = _workload(x, hidden, d_out, e, top_k, tensors) if layout is None else None
    name = dispatch.choose(backend, x.device, x.dtype, e, workload=workload)

    lead = x.shape[:-1]
    samples = x.shape[0] if x.dim() == 3 else 1
    x2 = x.reshape(-1, d_in)
    t = x2.shape[0]
    if t == 0:
        # Nothing to route: an empty output and zero losses, connected to x and every parameter,
        # so that each gets a zero gradient.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        zero = _connected_zero((x, gate_weight, w1, b1, w2, b2), acc)
        y = x.new_zeros(*lead, d_out) + zero.to(x.dtype)
        return y, zero, zero.to(x.dtype) + 0

    if layout is not None:
        # gated experts: w1 and b1 as the caller holds them (read through their strides)
        weights = (w1, b1, w2.contiguous(), None if b2 is None else b2.contiguous())
        y, stats = _GLU_COMPOSITIONS[dispatch.composition(name)](
            x2, gate_weight, weights, top_k, activation, layout == "interleaved", samples, name
        )
    else:
        y, stats = _COMPOSITIONS[dispatch.composition(name)](
            x2, gate_weight, _weights(w1, b1, w2, b2), top_k, activation, samples, name
        )
    balance, z = _aux_losses(*stats, t // samples)
    return _out(y, (*lead, d_out)), balance, z.to(x.dtype)


def glu_layout(glu: object) -> str | None:
    """`moe_mlp`'s glu argument as a layout: None (plain experts), "concat" or "interleaved"."""
    if glu is False:
        return None
    if glu is True:
        return "concat"
    if isinstance(glu, str) and glu in GLU_LAYOUTS:
        return glu
    raise ValueError(f"glu: expected False, True, 'concat' or 'interleaved', got {glu!r}")


def _unfused_glu(
    x2: Tensor,
    gate_weight: Tensor,
    weights: tuple,
    top_k: int,
    activation: str,
    interleaved: bool,
    samples: int,
    backend: str,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The unfused composition of gated experts: as `_unfused`, the first layer cumo::grouped_linear_glu
    (inference on CPU tensors with the feature "expert_mlp": cumo::expert_mlp_glu, both layers block
    by block, no [T*k, 2*hidden] or [T*k, hidden] tensor)."""
    w1, b1, w2, b2 = weights
    e = gate_weight.shape[0]
    logits = F.linear(x2, gate_weight)
    probs, expert_ids, prob_sums, first_counts, z_sums = _route(logits, top_k, samples, backend)
    x_sorted, sort_idx, offsets = _permute(x2.contiguous(), expert_ids, e, backend)
    routing = Routing(probs, expert_ids, sort_idx, offsets, top_k, e)
    if (
        x2.device.type == "cpu"
        and dispatch.has_feature(backend, "expert_mlp")
        and not needs_grad(x2, gate_weight, w1, b1, w2, b2)
    ):
        y_sorted = _expert_mlp_glu(x_sorted, w1, b1, w2, b2, routing.offsets, activation, interleaved, backend)
    else:
        save_pre = needs_grad(x2, w1, b1)  # the pre-activation only where a backward through fc1 follows
        h, _ = _grouped_linear_glu(x_sorted, w1, b1, routing.offsets, activation, interleaved, save_pre, backend)
        y_sorted = _grouped_linear(h, w2, b2, routing.offsets, "none", backend)[0]
    return _unpermute(y_sorted, routing.sort_idx, routing.weights, backend), (prob_sums, first_counts, z_sums)


def _fused_glu(
    x2: Tensor,
    gate_weight: Tensor,
    weights: tuple,
    top_k: int,
    activation: str,
    interleaved: bool,
    samples: int,
    backend: str,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The fused composition of gated experts: routing from x, cumo::grouped_linear_glu_gather (the
    gate and up tiles together, x gathered on load), then fc2 with the combine: in training
    cumo::grouped_linear_glu_combine, whose backward applies the gated derivative in the epilogue
    of the kernel producing grad_h and hands grad_pre to fc1."""
    w1, b1, w2, b2 = weights
    e = gate_weight.shape[0]
    probs, expert_ids, prob_sums, first_counts, z_sums, _ = _route_x(
        x2, gate_weight.contiguous(), top_k, samples, backend
    )
    sort_idx, offsets = _sort_experts(expert_ids, e, backend)
    r = Routing(probs, expert_ids, sort_idx, offsets, top_k, e)
    save_pre = needs_grad(x2, w1, b1)
    h, pre = _grouped_linear_glu_gather(
        x2, w1, b1, r.sort_idx, r.offsets, r.top_k, activation, interleaved, save_pre, backend
    )
    if save_pre:
        y, _ = _grouped_linear_glu_combine(
            h, pre, w2, b2, r.sort_idx, r.offsets, r.weights, activation, interleaved, backend
        )
    else:
        y, _ = _grouped_linear_combine(h, w2, b2, r.sort_idx, r.offsets, r.weights, backend)
    return y, (prob_sums, first_counts, z_sums)


_GLU_COMPOSITIONS = {"unfused": _unfused_glu, "fused": _fused_glu}
