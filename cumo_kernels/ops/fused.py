"""Fused ops for backends that provide them (a backend module with `FUSED_MOE = True`; today the
triton backend). Each is a `torch.library` custom op in the `cumo` namespace with a fake and
autograd, and a torch twin of the same name in `cumo_kernels.reference` (used by the torch
backend and by a backend module that lacks the function).

- cumo::route_x: x [T,in], gate [E,in] -> route's five outputs + logits [T,E] (x.dtype, saved for
  the backward): the router GEMM fused with the routing, x read once.
- cumo::sort_experts: expert_ids [T,k] -> sort_idx [T*k], offsets [E+1] (no permuted copy of x).
- cumo::grouped_linear_gather: x [T,K] in token order, weight [E,N,K], bias, sort_idx, offsets,
  top_k, activation, save_pre -> y [T*k,N] grouped, pre (or [0] when save_pre is False): the
  first GEMM reading x's rows through sort_idx // k.
- cumo::grouped_linear_combine: h [T*k,K] grouped, weight [E,N,K], bias, sort_idx, offsets,
  weights [T,k] -> out [T,N] (the weighted combine), y_slot [T*k,N] (the GEMM's rows in slot
  order t*k+j, saved for the routing weights' gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ._common import guard_autograd, needs_grad, refuse_double_backward
from ._common import impl_or_twin as _impl


@torch.compiler.assume_constant_result
def backend_is_fused(backend: str) -> bool:
    """Whether backend module `backend` asks for the fused composition (`FUSED_MOE = True`); a
    constant to torch.compile, which cannot trace the import of a backend module."""
    return bool(getattr(dispatch.implementation(backend), "FUSED_MOE", False))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------- route_x


@torch.library.custom_op("cumo::route_x", mutates_args=())
def _route_x(
    x: Tensor, gate_weight: Tensor, top_k: int, num_samples: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_impl(backend, "route_x")(x, gate_weight, top_k, num_samples))


@_route_x.register_fake
def _(x, gate_weight, top_k, num_samples, backend):
    t, e = x.shape[0], gate_weight.shape[0]
    acc = _acc(x.dtype)
    return (
        x.new_empty(t, top_k),
        x.new_empty(t, top_k, dtype=torch.int64),
        x.new_empty(num_samples, e, dtype=acc),
        x.new_empty(num_samples, e, dtype=acc),
        x.new_empty(num_samples, dtype=acc),
        x.new_empty(t, e),
    )


@torch.library.custom_op("cumo::route_x_backward", mutates_args=())
def _route_x_backward(
    grad_weights: Tensor,
    grad_prob_sums: Tensor,
    grad_z_sums: Tensor,
    x: Tensor,
    gate_weight: Tensor,
    logits: Tensor,
    expert_ids: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fn = _impl(backend, "route_x_backward")
    return tuple(fn(grad_weights, grad_prob_sums, grad_z_sums, x, gate_weight, logits, expert_ids))


@_route_x_backward.register_fake
def _(grad_weights, grad_prob_sums, grad_z_sums, x, gate_weight, logits, expert_ids, backend):
    return torch.empty_like(x), torch.empty_like(gate_weight)


def _route_x_setup(ctx, inputs, output):
    x, gate_weight, _, num_samples, backend = inputs
    _, expert_ids, _, first_counts, _, logits = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, gate_weight, logits, expert_ids)
    ctx.backend, ctx.num_samples = backend, num_samples
    ctx.mark_non_differentiable(expert_ids, first_counts, logits)


def _route_x_bwd(ctx, g_weights, g_ids, g_prob_sums, g_counts, g_z_sums, g_logits):
    x, gate_weight, logits, expert_ids = ctx.saved_tensors
    n, e = ctx.num_samples, gate_weight.shape[0]
    acc = _acc(x.dtype)
    gw = g_weights.contiguous() if g_weights is not None else x.new_zeros(expert_ids.shape)
    gp = g_prob_sums.contiguous() if g_prob_sums is not None else x.new_zeros(n, e, dtype=acc)
    gz = g_z_sums.contiguous() if g_z_sums is not None else x.new_zeros(n, dtype=acc)
    dx, dg = _route_x_backward(gw, gp, gz, x, gate_weight, logits, expert_ids, ctx.backend)
    return dx, dg, None, None, None


_route_x.register_autograd(_route_x_bwd, setup_context=_route_x_setup)
guard_autograd(_route_x)
refuse_double_backward(_route_x_backward, "route_x")


# -------------------------------------------------------------------------------- sort_experts


@torch.library.custom_op("cumo::sort_experts", mutates_args=())
def _sort_experts(expert_ids: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_impl(backend, "sort_experts")(expert_ids, num_experts))


@_sort_experts.register_fake
def _(expert_ids, num_experts, backend):
    return (
        expert_ids.new_empty(expert_ids.numel(), dtype=torch.int64),
        expert_ids.new_empty(num_experts + 1, dtype=torch.int64),
    )


guard_autograd(_sort_experts)


# ----------------------------------------------------------------------- grouped_linear_gather


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
    fn = _impl(backend, "grouped_linear_gather")
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
    fn = _impl(backend, "grouped_linear_gather_backward")
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


# ---------------------------------------------------------------------- grouped_linear_combine


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
    return tuple(_impl(backend, "grouped_linear_combine")(h, weight, bias, sort_idx, offsets, weights))


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
    fn = _impl(backend, "grouped_linear_combine_backward")
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


# ------------------------------------------------------------------------------ the composition


def fused_moe(
    x2: Tensor,
    gate_weight: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    top_k: int,
    activation: str,
    samples: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The MoE block through the fused ops: (y [T, out], prob_sums, first_counts, z_sums).

    x2 [T, in] (T > 0); the other arguments as `moe_mlp`'s, checked by it.
    """
    e = gate_weight.shape[0]
    weights, expert_ids, prob_sums, first_counts, z_sums, _ = _route_x(
        x2, gate_weight.contiguous(), top_k, samples, backend
    )
    sort_idx, offsets = _sort_experts(expert_ids, e, backend)
    b1c = None if b1 is None else b1.contiguous()
    b2c = None if b2 is None else b2.contiguous()
    # The pre-activation is kept only when a backward through fc1 can follow (not in inference).
    save_pre = needs_grad(x2, w1, b1)
    h, _ = _grouped_linear_gather(x2, w1.contiguous(), b1c, sort_idx, offsets, top_k, activation, save_pre, backend)
    y, _ = _grouped_linear_combine(h, w2.contiguous(), b2c, sort_idx, offsets, weights, backend)
    return y, prob_sums, first_counts, z_sums
