"""Gated grouped linear ops (issue 23): the first layer of gated experts (SwiGLU, GeGLU, ReGLU,
GPT-OSS's clamped SwiGLU), h = a(x W_gate^T + b_gate) * b(x W_up^T + b_up) per expert, with
W_gate and W_up the gate and up rows of one w1 [E, 2H, in].

Op table (custom ops in the `cumo` namespace, each with a fake and autograd; `interleaved` says
w1's row layout, see `grouped_linear_glu`):

- cumo::grouped_linear_glu: x [M,in] grouped, w1 [E,2H,in], b1 [E,2H]?, offsets, activation,
  interleaved, save_pre -> h [M,H], pre [M,2H] (or [0] when save_pre is False): the gate and up
  columns computed together; the pre-activation is what the backward needs (saved, not
  recomputed: see benchmarks/NOTES.md, "Gated experts").
- cumo::grouped_linear_glu_gather: the same reading x [T,in] in token order through sort_idx // k
  (the fused composition of a backend with `FUSED_MOE = True`); both outputs differentiable.
- cumo::grouped_linear_glu_combine: h [T*k,H], pre [T*k,2H], w2, b2?, sort_idx, offsets, weights
  [T,k] -> out [T,out], y_slot: fc2 with the weighted combine, as a function of pre (h is the
  forward's glu(pre)); its backward returns grad_pre, the gated derivative applied in the epilogue
  of the kernel producing grad_h (fused backends), so grad_h never reaches memory.
- cumo::expert_mlp_glu: x_sorted, w1, b1?, w2, b2?, offsets -> y_sorted [M,out]: both gated expert
  layers for inference (no autograd); the CPU torch path, block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from .._activations import GLU_ACTIVATIONS
from ._common import (
    check_device,
    check_float,
    check_index,
    check_offsets_values,
    check_shape,
    guard_autograd,
    inference_only,
    needs_grad,
    refuse_double_backward,
    validation_wanted,
)

GLU_LAYOUTS: tuple[str, ...] = ("concat", "interleaved")


def check_glu_activation(activation: object) -> None:
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(
            f"activation: unknown {activation!r} for gated experts (glu); accepted: {', '.join(GLU_ACTIVATIONS)}"
        )


def check_w1_glu(w1: Tensor, num_experts: int | None, d_in: int) -> int:
    """w1 [E, 2H, in] of a gated layer: returns H. Any strides (never copied)."""
    check_shape("w1", w1, (num_experts, None, d_in), f"E, 2*hidden (gate and up rows), in={d_in}")
    if w1.shape[1] % 2:
        raise ValueError(
            f"w1: a gated (glu) w1 holds each expert's gate and up rows, an even number 2*hidden; "
            f"got {w1.shape[1]} rows"
        )
    return w1.shape[1] // 2


def _pre_fake(x: Tensor, m: int, n2: int, save_pre: bool) -> Tensor:
    return x.new_empty(m, n2) if save_pre else x.new_empty(0)


# ---------------------------------------------------------------------------- grouped_linear_glu


@torch.library.custom_op("cumo::grouped_linear_glu", mutates_args=())
def _grouped_linear_glu(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    offsets: Tensor,
    activation: str,
    interleaved: bool,
    save_pre: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_glu")
    return tuple(fn(x, w1, b1, offsets, activation, interleaved, save_pre))


@_grouped_linear_glu.register_fake
def _(x, w1, b1, offsets, activation, interleaved, save_pre, backend):
    m, n2 = x.shape[0], w1.shape[1]
    return x.new_empty(m, n2 // 2), _pre_fake(x, m, n2, save_pre)


@torch.library.custom_op("cumo::grouped_linear_glu_backward", mutates_args=())
def _grouped_linear_glu_backward(
    grad_h: Tensor,
    x: Tensor,
    w1: Tensor,
    offsets: Tensor,
    pre: Tensor,
    activation: str,
    interleaved: bool,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_glu_backward")
    gx, gw, gb = fn(grad_h, x, w1, offsets, pre, activation, interleaved, has_bias)
    return gx, gw, (gb if gb is not None else w1.new_empty(0))


@_grouped_linear_glu_backward.register_fake
def _(grad_h, x, w1, offsets, pre, activation, interleaved, has_bias, backend):
    gb = w1.new_empty(w1.shape[:2]) if has_bias else w1.new_empty(0)
    return torch.empty_like(x), torch.empty_like(w1), gb


def _no_pre(op: str) -> RuntimeError:
    return RuntimeError(
        f"cumo::{op} ran with save_pre=False, so it kept no pre-activation for a backward; call it with "
        "save_pre=True when gradients are needed"
    )


def _glu_setup(ctx, inputs, output):
    x, w1, b1, offsets, activation, interleaved, save_pre, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, offsets, output[1])
    ctx.activation, ctx.interleaved, ctx.backend = activation, interleaved, backend
    ctx.has_bias, ctx.save_pre = b1 is not None, save_pre
    ctx.mark_non_differentiable(output[1])


def _glu_bwd(ctx, g_h, g_pre):
    x, w1, offsets, pre = ctx.saved_tensors
    if g_h is None:
        return None, None, None, None, None, None, None, None
    if not ctx.save_pre:
        raise _no_pre("grouped_linear_glu")
    gx, gw, gb = _grouped_linear_glu_backward(
        g_h.contiguous(), x, w1, offsets, pre, ctx.activation, ctx.interleaved, ctx.has_bias, ctx.backend
    )
    return gx, gw, (gb if ctx.has_bias else None), None, None, None, None, None


_grouped_linear_glu.register_autograd(_glu_bwd, setup_context=_glu_setup)
guard_autograd(_grouped_linear_glu)
refuse_double_backward(_grouped_linear_glu_backward, "grouped_linear_glu")


# --------------------------------------------------------------------- grouped_linear_glu_gather


@torch.library.custom_op("cumo::grouped_linear_glu_gather", mutates_args=())
def _grouped_linear_glu_gather(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    sort_idx: Tensor,
    offsets: Tensor,
    top_k: int,
    activation: str,
    interleaved: bool,
    save_pre: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_glu_gather")
    return tuple(fn(x, w1, b1, sort_idx, offsets, top_k, activation, interleaved, save_pre))


@_grouped_linear_glu_gather.register_fake
def _(x, w1, b1, sort_idx, offsets, top_k, activation, interleaved, save_pre, backend):
    m, n2 = sort_idx.shape[0], w1.shape[1]
    return x.new_empty(m, n2 // 2), _pre_fake(x, m, n2, save_pre)


@torch.library.custom_op("cumo::grouped_linear_glu_gather_backward", mutates_args=())
def _grouped_linear_glu_gather_backward(
    grad_h: Tensor,
    grad_pre: Tensor,
    x: Tensor,
    w1: Tensor,
    sort_idx: Tensor,
    offsets: Tensor,
    pre: Tensor,
    top_k: int,
    activation: str,
    interleaved: bool,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_glu_gather_backward")
    gx, gw, gb = fn(grad_h, grad_pre, x, w1, sort_idx, offsets, pre, top_k, activation, interleaved, has_bias)
    return gx, gw, (gb if gb is not None else w1.new_empty(0))


@_grouped_linear_glu_gather_backward.register_fake
def _(grad_h, grad_pre, x, w1, sort_idx, offsets, pre, top_k, activation, interleaved, has_bias, backend):
    gb = w1.new_empty(w1.shape[:2]) if has_bias else w1.new_empty(0)
    return torch.empty_like(x), torch.empty_like(w1), gb


def _gather_setup(ctx, inputs, output):
    x, w1, b1, sort_idx, offsets, top_k, activation, interleaved, save_pre, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, sort_idx, offsets, output[1])
    ctx.top_k, ctx.activation, ctx.interleaved, ctx.backend = top_k, activation, interleaved, backend
    ctx.has_bias, ctx.save_pre = b1 is not None, save_pre


def _gather_bwd(ctx, g_h, g_pre):
    """Both outputs are differentiable: pre is the pre-activation itself, and its gradient arrives
    from cumo::grouped_linear_glu_combine (the gated derivative applied there); h's from any other
    consumer, through the gated derivative here."""
    x, w1, sort_idx, offsets, pre = ctx.saved_tensors
    if g_h is None and g_pre is None:
        return (None,) * 10
    if not ctx.save_pre:
        raise _no_pre("grouped_linear_glu_gather")
    empty = x.new_empty(0)
    gx, gw, gb = _grouped_linear_glu_gather_backward(
        empty if g_h is None else g_h.contiguous(),
        empty if g_pre is None else g_pre.contiguous(),
        x,
        w1,
        sort_idx,
        offsets,
        pre,
        ctx.top_k,
        ctx.activation,
        ctx.interleaved,
        ctx.has_bias,
        ctx.backend,
    )
    return gx, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None, None


_grouped_linear_glu_gather.register_autograd(_gather_bwd, setup_context=_gather_setup)
guard_autograd(_grouped_linear_glu_gather)
refuse_double_backward(_grouped_linear_glu_gather_backward, "grouped_linear_glu_gather")


# --------------------------------------------------------------------- grouped_linear_glu_combine


@torch.library.custom_op("cumo::grouped_linear_glu_combine", mutates_args=())
def _grouped_linear_glu_combine(
    h: Tensor,
    pre: Tensor,
    w2: Tensor,
    b2: Tensor | None,
    sort_idx: Tensor,
    offsets: Tensor,
    weights: Tensor,
    activation: str,
    interleaved: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """fc2 + the weighted combine of gated experts, as a function of pre (h = glu(pre) is the
    forward's copy of it, as cumo::grouped_linear_glu_gather returned both): the gradient goes to
    pre (the gated derivative in the epilogue of the kernel producing grad_h), none to h."""
    fn = dispatch.op(backend, "grouped_linear_glu_combine")
    return tuple(fn(h, pre, w2, b2, sort_idx, offsets, weights, activation, interleaved))


@_grouped_linear_glu_combine.register_fake
def _(h, pre, w2, b2, sort_idx, offsets, weights, activation, interleaved, backend):
    n = w2.shape[1]
    return h.new_empty(weights.shape[0], n), h.new_empty(h.shape[0], n)


@torch.library.custom_op("cumo::grouped_linear_glu_combine_backward", mutates_args=())
def _grouped_linear_glu_combine_backward(
    grad_out: Tensor,
    h: Tensor,
    pre: Tensor,
    w2: Tensor,
    sort_idx: Tensor,
    offsets: Tensor,
    weights: Tensor,
    y_slot: Tensor,
    activation: str,
    interleaved: bool,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_glu_combine_backward")
    gp, gw, gb, gwts = fn(grad_out, h, pre, w2, sort_idx, offsets, weights, y_slot, activation, interleaved, has_bias)
    return gp, gw, (gb if gb is not None else w2.new_empty(0)), gwts


@_grouped_linear_glu_combine_backward.register_fake
def _(grad_out, h, pre, w2, sort_idx, offsets, weights, y_slot, activation, interleaved, has_bias, backend):
    gb = w2.new_empty(w2.shape[:2]) if has_bias else w2.new_empty(0)
    return torch.empty_like(pre), torch.empty_like(w2), gb, torch.empty_like(weights)


def _combine_setup(ctx, inputs, output):
    h, pre, w2, b2, sort_idx, offsets, weights, activation, interleaved, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, pre, w2, sort_idx, offsets, weights, output[1])
    ctx.activation, ctx.interleaved, ctx.backend, ctx.has_bias = activation, interleaved, backend, b2 is not None
    ctx.mark_non_differentiable(output[1])


def _combine_bwd(ctx, g_out, g_slot):
    h, pre, w2, sort_idx, offsets, weights, y_slot = ctx.saved_tensors
    if g_out is None:
        return (None,) * 10
    gp, gw, gb, gwts = _grouped_linear_glu_combine_backward(
        g_out.contiguous(),
        h,
        pre,
        w2,
        sort_idx,
        offsets,
        weights,
        y_slot,
        ctx.activation,
        ctx.interleaved,
        ctx.has_bias,
        ctx.backend,
    )
    return None, gp, gw, (gb if ctx.has_bias else None), None, None, gwts, None, None, None


_grouped_linear_glu_combine.register_autograd(_combine_bwd, setup_context=_combine_setup)
guard_autograd(_grouped_linear_glu_combine)
refuse_double_backward(_grouped_linear_glu_combine_backward, "grouped_linear_glu_combine")


# -------------------------------------------------------------------------------- expert_mlp_glu


@torch.library.custom_op("cumo::expert_mlp_glu", mutates_args=())
def _expert_mlp_glu(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    offsets: Tensor,
    activation: str,
    interleaved: bool,
    backend: str,
) -> Tensor:
    """Inference only (no autograd formula): x [M, in] grouped rows -> [M, out]."""
    return dispatch.op(backend, "expert_mlp_glu")(x, w1, b1, w2, b2, offsets, activation, interleaved)


@_expert_mlp_glu.register_fake
def _(x, w1, b1, w2, b2, offsets, activation, interleaved, backend):
    return x.new_empty(x.shape[0], w2.shape[1])


inference_only(_expert_mlp_glu, "cumo::grouped_linear_glu, then cumo::grouped_linear")


# ------------------------------------------------------------------------------------ public op


def grouped_linear_glu(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    offsets: Tensor,
    activation: str = "silu",
    *,
    layout: str = "concat",
    backend: str | None = None,
    validate: bool | None = None,
) -> Tensor:
    """The fused gated first GEMM of gated experts on rows grouped by expert:
    h = act(x W_gate[e]^T + b_gate[e]) * (x W_up[e]^T + b_up[e]) on expert e's rows.

    Args:
        x: [M, in] grouped rows (from `permute`).
        w1: [E, 2*H, in], each expert's gate rows and up rows, in `layout`:
            "concat": the H gate rows, then the H up rows (transformers' `gate_up_proj` of
            Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3: pass it as it is);
            "interleaved": gate and up rows alternating, g0, u0, g1, u1, ... (GPT-OSS).
            Any strides: a weight stored transposed, [E, in, 2*H] (GPT-OSS's `gate_up_proj`), is
            passed as `w.transpose(1, 2)` and read in place, never copied.
        b1: [E, 2*H] or None, in w1's row layout (any strides).
        offsets: [E+1] int64 row offsets (as `grouped_linear`'s; rows offsets[E]:M are zeros).
        activation: the gate's activation, one of `GLU_ACTIVATIONS`: "silu" (SwiGLU), "gelu" or
            "gelu_tanh" (GeGLU), "relu" (ReGLU), "quick_gelu", "relu2", or "gpt_oss_swiglu"
            (GPT-OSS: gate clamped above at 7, up into [-7, 7], h = g sigmoid(1.702 g) (u + 1)).
        validate: check offsets' values (see `grouped_linear`).

    Returns:
        h [M, H] x.dtype (computed in float32 from the pre-activations rounded to x.dtype, rounded
        once). Gradients reach x, w1 and b1 (the pre-activations [M, 2H] are kept for the
        backward while autograd records).
    """
    check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [M, in], got {list(x.shape)}")
    check_float("w1", w1, x.dtype)
    hidden = check_w1_glu(w1, None, x.shape[1])
    e = w1.shape[0]
    if b1 is not None:
        check_float("b1", b1, x.dtype)
        check_shape("b1", b1, (e, 2 * hidden), f"E={e}, 2*hidden={2 * hidden}")
        check_device("b1", b1, x.device)
    check_index("offsets", offsets, 1)
    if offsets.numel() != e + 1:
        raise ValueError(f"offsets: expected {e + 1} entries (E + 1), got {offsets.numel()}")
    check_glu_activation(activation)
    if layout not in GLU_LAYOUTS:
        raise ValueError(f"layout: unknown {layout!r}; accepted: {', '.join(GLU_LAYOUTS)}")
    for name_, t in (("w1", w1), ("offsets", offsets)):
        check_device(name_, t, x.device)
    if validation_wanted(validate, x.device):
        check_offsets_values(offsets, x.shape[0])
    name = dispatch.choose(backend, x.device, x.dtype, e, op="grouped_linear_glu")
    save_pre = needs_grad(x, w1, b1)  # inference keeps no pre-activation
    return _grouped_linear_glu(
        x.contiguous(), w1, b1, offsets.contiguous(), activation, layout == "interleaved", save_pre, name
    )[0]
