"""Grouped linear ops (the grouped GEMM family): `cumo::grouped_linear`, one per-expert linear
layer over rows grouped by expert, with optional bias and activation fused, and its backward op;
`cumo::expert_mlp`, both expert layers in one op for inference (no autograd); and, for backends
with the fused composition, `cumo::grouped_linear_gather` (the first GEMM reading x through the
sort order) and `cumo::grouped_linear_combine` (the second GEMM with the weighted combine)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ._common import (
    check_activation,
    check_device,
    check_float,
    check_index,
    check_offsets_values,
    check_shape,
    guard_autograd,
    inference_only,
    refuse_double_backward,
    validation_wanted,
)


@torch.library.custom_op("cumo::grouped_linear", mutates_args=())
def _grouped_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    return dispatch.implementation(backend).grouped_linear(x, weight, bias, offsets, activation)


@_grouped_linear.register_fake
def _(x, weight, bias, offsets, activation, backend):
    y = x.new_empty(x.shape[0], weight.shape[1])
    pre = x.new_empty(0) if activation == "none" else x.new_empty(x.shape[0], weight.shape[1])
    return y, pre


@torch.library.custom_op("cumo::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    pre: Tensor,
    activation: str,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = dispatch.implementation(backend)
    gx, gw, gb = impl.grouped_linear_backward(grad_y, x, weight, offsets, pre, activation, has_bias)
    return gx, gw, (gb if gb is not None else weight.new_empty(0))


@_grouped_linear_backward.register_fake
def _(grad_y, x, weight, offsets, pre, activation, has_bias, backend):
    gb = weight.new_empty(weight.shape[:2]) if has_bias else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), gb


def _setup(ctx, inputs, output):
    x, weight, bias, offsets, activation, backend = inputs
    _, pre = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, offsets, pre)
    ctx.activation, ctx.backend, ctx.has_bias = activation, backend, bias is not None
    ctx.mark_non_differentiable(pre)


def _bwd(ctx, g_y, g_pre):
    x, weight, offsets, pre = ctx.saved_tensors
    g = torch.zeros(x.shape[0], weight.shape[1], dtype=x.dtype, device=x.device) if g_y is None else g_y.contiguous()
    gx, gw, gb = _grouped_linear_backward(g, x, weight, offsets, pre, ctx.activation, ctx.has_bias, ctx.backend)
    return gx, gw, (gb if ctx.has_bias else None), None, None, None


_grouped_linear.register_autograd(_bwd, setup_context=_setup)
guard_autograd(_grouped_linear)
refuse_double_backward(_grouped_linear_backward, "grouped_linear")


@torch.library.custom_op("cumo::expert_mlp", mutates_args=())
def _expert_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    offsets: Tensor,
    activation: str,
    backend: str,
) -> Tensor:
    """Inference only (no autograd formula: `moe_mlp` uses it only when no gradient is needed):
    x [M, in] grouped rows -> [M, out], act(x W1_e^T + b1_e) W2_e^T + b2_e per expert's rows."""
    return dispatch.op(backend, "expert_mlp")(x, w1, b1, w2, b2, offsets, activation)


@_expert_mlp.register_fake
def _(x, w1, b1, w2, b2, offsets, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[1])


inference_only(_expert_mlp, "cumo::grouped_linear for each expert layer")


def grouped_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    activation: str = "none",
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> Tensor:
    """Per-expert linear layer on rows grouped by expert (the grouped GEMM).

    Args:
        x: [M, K] grouped rows (from `permute`).
        weight: [E, N, K], nn.Linear layout per expert.
        bias: [E, N] or None.
        offsets: [E+1] int64 row offsets (rows offsets[e]:offsets[e+1] use expert e), with
            offsets[0] = 0, non-decreasing, offsets[E] <= M: rows offsets[E]:M belong to no
            expert (the dropped slots `permute` puts last) and are zero in y and in x's gradient.
        activation: "none", "quick_gelu", "gelu", "gelu_tanh", "silu", "relu" or "relu2" (relu(x)^2).
        validate: check offsets' values (None: on CPU tensors, where it is free; True: also on
            CUDA, at the cost of one host sync; False: never). See `cumo_kernels.ops` ("Index
            inputs").

    Returns:
        y [M, N] x.dtype: act(x @ weight[e]^T + bias[e]) on each expert's rows. Gradients reach
        x, weight and bias; the activation's derivative uses the saved pre-activation.
    """
    check_float("x", x)
    check_float("weight", weight, x.dtype)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [M, K], got {list(x.shape)}")
    check_shape("weight", weight, (None, None, x.shape[1]), "E, N, K with K = x.shape[1]")
    e, n, _ = weight.shape
    if bias is not None:
        check_float("bias", bias, x.dtype)
        check_shape("bias", bias, (e, n), "E, N")
        check_device("bias", bias, x.device)
    check_index("offsets", offsets, 1)
    if offsets.numel() != e + 1:
        raise ValueError(f"offsets: expected {e + 1} entries (E + 1), got {offsets.numel()}")
    check_activation(activation, allow_none=True)
    for name_, t in (("weight", weight), ("offsets", offsets)):
        check_device(name_, t, x.device)
    if validation_wanted(validate, x.device):
        check_offsets_values(offsets, x.shape[0])
    name = dispatch.choose(backend, x.device, x.dtype, e, op="grouped_linear")
    b = None if bias is None else bias.contiguous()
    return _grouped_linear(x.contiguous(), weight.contiguous(), b, offsets.contiguous(), activation, name)[0]


# ------------------------------------------------------------------- grouped_linear_gather


@torch.library.custom_op("cumo::grouped_linear_gather", mutates_args=())
def _grouped_linear_gather(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    sort_idx: Tensor,
    offsets: Tensor,
    top_k: int,
    activation: str,
    save_pre: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_gather")
    return tuple(fn(x, weight, bias, sort_idx, offsets, top_k, activation, save_pre))


@_grouped_linear_gather.register_fake
def _(x, weight, bias, sort_idx, offsets, top_k, activation, save_pre, backend):
    m, n = sort_idx.shape[0], weight.shape[1]
    return x.new_empty(m, n), (x.new_empty(0) if activation == "none" or not save_pre else x.new_empty(m, n))


@torch.library.custom_op("cumo::grouped_linear_gather_backward", mutates_args=())
def _grouped_linear_gather_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    sort_idx: Tensor,
    offsets: Tensor,
    pre: Tensor,
    top_k: int,
    activation: str,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_gather_backward")
    gx, gw, gb = fn(grad_y, x, weight, sort_idx, offsets, pre, top_k, activation, has_bias)
    return gx, gw, (gb if gb is not None else weight.new_empty(0))


@_grouped_linear_gather_backward.register_fake
def _(grad_y, x, weight, sort_idx, offsets, pre, top_k, activation, has_bias, backend):
    gb = weight.new_empty(weight.shape[:2]) if has_bias else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), gb


def _gather_setup(ctx, inputs, output):
    x, weight, bias, sort_idx, offsets, top_k, activation, save_pre, backend = inputs
    _, pre = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, sort_idx, offsets, pre)
    ctx.top_k, ctx.activation, ctx.backend, ctx.has_bias = top_k, activation, backend, bias is not None
    ctx.save_pre = save_pre
    ctx.mark_non_differentiable(pre)


def _gather_bwd(ctx, g_y, g_pre):
    x, weight, sort_idx, offsets, pre = ctx.saved_tensors
    if ctx.activation != "none" and not ctx.save_pre:
        raise RuntimeError(
            "cumo::grouped_linear_gather ran with save_pre=False, so it kept no pre-activation for a "
            "backward; call it with save_pre=True when gradients are needed"
        )
    g = g_y.contiguous() if g_y is not None else x.new_zeros(sort_idx.shape[0], weight.shape[1])
    gx, gw, gb = _grouped_linear_gather_backward(
        g, x, weight, sort_idx, offsets, pre, ctx.top_k, ctx.activation, ctx.has_bias, ctx.backend
    )
    return gx, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None


_grouped_linear_gather.register_autograd(_gather_bwd, setup_context=_gather_setup)
guard_autograd(_grouped_linear_gather)
refuse_double_backward(_grouped_linear_gather_backward, "grouped_linear_gather")


# ------------------------------------------------------------------ grouped_linear_combine


@torch.library.custom_op("cumo::grouped_linear_combine", mutates_args=())
def _grouped_linear_combine(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    sort_idx: Tensor,
    offsets: Tensor,
    weights: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return tuple(dispatch.op(backend, "grouped_linear_combine")(h, weight, bias, sort_idx, offsets, weights))


@_grouped_linear_combine.register_fake
def _(h, weight, bias, sort_idx, offsets, weights, backend):
    n = weight.shape[1]
    return h.new_empty(weights.shape[0], n), h.new_empty(h.shape[0], n)


@torch.library.custom_op("cumo::grouped_linear_combine_backward", mutates_args=())
def _grouped_linear_combine_backward(
    grad_out: Tensor,
    h: Tensor,
    weight: Tensor,
    sort_idx: Tensor,
    offsets: Tensor,
    weights: Tensor,
    y_slot: Tensor,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = dispatch.op(backend, "grouped_linear_combine_backward")
    gh, gw, gb, gwts = fn(grad_out, h, weight, sort_idx, offsets, weights, y_slot, has_bias)
    return gh, gw, (gb if gb is not None else weight.new_empty(0)), gwts


@_grouped_linear_combine_backward.register_fake
def _(grad_out, h, weight, sort_idx, offsets, weights, y_slot, has_bias, backend):
    gb = weight.new_empty(weight.shape[:2]) if has_bias else weight.new_empty(0)
    return torch.empty_like(h), torch.empty_like(weight), gb, torch.empty_like(weights)


def _combine_setup(ctx, inputs, output):
    h, weight, bias, sort_idx, offsets, weights, backend = inputs
    _, y_slot = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, sort_idx, offsets, weights, y_slot)
    ctx.backend, ctx.has_bias = backend, bias is not None
    ctx.mark_non_differentiable(y_slot)


def _combine_bwd(ctx, g_out, g_slot):
    h, weight, sort_idx, offsets, weights, y_slot = ctx.saved_tensors
    if g_out is None:
        return None, None, None, None, None, None, None
    gh, gw, gb, gwts = _grouped_linear_combine_backward(
        g_out.contiguous(), h, weight, sort_idx, offsets, weights, y_slot, ctx.has_bias, ctx.backend
    )
    return gh, gw, (gb if ctx.has_bias else None), None, None, gwts, None


_grouped_linear_combine.register_autograd(_combine_bwd, setup_context=_combine_setup)
guard_autograd(_grouped_linear_combine)
refuse_double_backward(_grouped_linear_combine_backward, "grouped_linear_combine")
