"""Permutation ops: `cumo::permute` (group rows by expert, offsets on the device),
`cumo::unpermute` (weighted combine back to token order), with their backward ops, and
`cumo::sort_experts` (the sort order alone, for backends with the fused composition)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from ._common import (
    check_device,
    check_expert_ids_values,
    check_float,
    check_index,
    check_sort_idx_values,
    grad_or_zeros,
    guard_autograd,
    refuse_double_backward,
    validation_wanted,
)


@torch.library.custom_op("cumo::permute", mutates_args=())
def _permute(x: Tensor, expert_ids: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.implementation(backend).permute(x, expert_ids, num_experts)


@_permute.register_fake
def _(x, expert_ids, num_experts, backend):
    tk = expert_ids.numel()
    return (
        x.new_empty(tk, x.shape[1]),
        x.new_empty(tk, dtype=torch.int64),
        x.new_empty(num_experts + 1, dtype=torch.int64),
    )


@torch.library.custom_op("cumo::permute_backward", mutates_args=())
def _permute_backward(grad_sorted: Tensor, sort_idx: Tensor, top_k: int, backend: str) -> Tensor:
    return dispatch.implementation(backend).permute_backward(grad_sorted, sort_idx, top_k)


@_permute_backward.register_fake
def _(grad_sorted, sort_idx, top_k, backend):
    return grad_sorted.new_empty(grad_sorted.shape[0] // top_k, grad_sorted.shape[1])


def _permute_setup(ctx, inputs, output):
    _, expert_ids, _, backend = inputs
    x_sorted, sort_idx, offsets = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(sort_idx)
    ctx.top_k, ctx.backend = expert_ids.shape[1], backend
    ctx.mark_non_differentiable(sort_idx, offsets)


def _permute_bwd(ctx, g_sorted, g_idx, g_offsets):
    (sort_idx,) = ctx.saved_tensors
    if g_sorted is None:
        return None, None, None, None
    return _permute_backward(g_sorted.contiguous(), sort_idx, ctx.top_k, ctx.backend), None, None, None


_permute.register_autograd(_permute_bwd, setup_context=_permute_setup)
guard_autograd(_permute)
refuse_double_backward(_permute_backward, "permute")


def permute(
    x: Tensor,
    expert_ids: Tensor,
    num_experts: int,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Group token rows by expert, on the device (no host sync).

    Args:
        x: [T, H] token rows.
        expert_ids: [T, k] int64: 0..E-1 routes the slot (t, j) to that expert; an id >= E
            drops it (the sentinel of expert parallelism: the expert lives elsewhere). Negative
            ids are an error.
        num_experts: E.
        validate: check expert_ids' values (None: on CPU tensors; True: also on CUDA, at the
            cost of one host sync; False: never). Unchecked, a negative id is dropped.

    Returns:
        x_sorted [T*k, H] (x_sorted[i] = x[sort_idx[i] // k]), sort_idx [T*k] int64 (the flat
        slot t*k+j of each grouped row; stable; the dropped slots last), offsets [E+1] int64
        (rows of expert e are offsets[e]:offsets[e+1]; rows offsets[E]:T*k are the dropped
        slots', which `grouped_linear` maps to zeros). Gradient reaches x.
    """
    check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [T, H], got {list(x.shape)}")
    check_index("expert_ids", expert_ids, 2)
    check_device("expert_ids", expert_ids, x.device)
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids: expected {x.shape[0]} rows (one per token of x), got {expert_ids.shape[0]}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if validation_wanted(validate, x.device):
        check_expert_ids_values(expert_ids, num_experts)
    name = dispatch.choose(backend, x.device, x.dtype, num_experts, op="permute")
    return _permute(x.contiguous(), expert_ids.contiguous(), num_experts, name)


@torch.library.custom_op("cumo::unpermute", mutates_args=())
def _unpermute(y_sorted: Tensor, sort_idx: Tensor, weights: Tensor, backend: str) -> Tensor:
    return dispatch.implementation(backend).unpermute(y_sorted, sort_idx, weights)


@_unpermute.register_fake
def _(y_sorted, sort_idx, weights, backend):
    return y_sorted.new_empty(weights.shape[0], y_sorted.shape[1])


@torch.library.custom_op("cumo::unpermute_backward", mutates_args=())
def _unpermute_backward(
    grad_out: Tensor, y_sorted: Tensor, sort_idx: Tensor, weights: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return dispatch.implementation(backend).unpermute_backward(grad_out, y_sorted, sort_idx, weights)


@_unpermute_backward.register_fake
def _(grad_out, y_sorted, sort_idx, weights, backend):
    return torch.empty_like(y_sorted), torch.empty_like(weights)


def _unpermute_setup(ctx, inputs, output):
    y_sorted, sort_idx, weights, backend = inputs
    ctx.save_for_backward(y_sorted, sort_idx, weights)
    ctx.backend = backend


def _unpermute_bwd(ctx, g_out):
    y_sorted, sort_idx, weights = ctx.saved_tensors
    g = grad_or_zeros(g_out, y_sorted.new_empty(weights.shape[0], y_sorted.shape[1]))
    gy, gw = _unpermute_backward(g, y_sorted, sort_idx, weights, ctx.backend)
    return gy, None, gw, None


_unpermute.register_autograd(_unpermute_bwd, setup_context=_unpermute_setup)
guard_autograd(_unpermute)
refuse_double_backward(_unpermute_backward, "unpermute")


def unpermute(
    y_sorted: Tensor,
    sort_idx: Tensor,
    weights: Tensor,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> Tensor:
    """Weighted combine of grouped rows back to token order.

    y_sorted [T*k, N], sort_idx [T*k] int64 (from `permute`: a permutation of 0..T*k-1),
    weights [T, k] -> out [T, N] in y_sorted.dtype,
    out[t] = sum_j weights[t, j] * y_sorted[row of slot t*k+j]. A dropped slot's row is zero
    (from `grouped_linear`), so it adds nothing for a finite weight.
    Gradients reach y_sorted and weights. validate: check that sort_idx is a permutation (None:
    on CPU tensors; True: also on CUDA, at the cost of one host sync; False: never).
    """
    check_float("y_sorted", y_sorted)
    check_float("weights", weights, y_sorted.dtype)
    check_index("sort_idx", sort_idx, 1)
    if (
        y_sorted.dim() != 2
        or weights.dim() != 2
        or sort_idx.numel() != y_sorted.shape[0]
        or weights.numel() != y_sorted.shape[0]
    ):
        raise ValueError(
            "y_sorted, sort_idx, weights: expected [T*k, N], [T*k], [T, k], got "
            f"{list(y_sorted.shape)}, {list(sort_idx.shape)}, {list(weights.shape)}"
        )
    for name_, t in (("sort_idx", sort_idx), ("weights", weights)):
        check_device(name_, t, y_sorted.device)
    if validation_wanted(validate, y_sorted.device):
        check_sort_idx_values(sort_idx)
    name = dispatch.choose(backend, y_sorted.device, y_sorted.dtype, op="unpermute")
    return _unpermute(y_sorted.contiguous(), sort_idx.contiguous(), weights.contiguous(), name)


# ------------------------------------------------------------------------------ sort_experts


@torch.library.custom_op("cumo::sort_experts", mutates_args=())
def _sort_experts(expert_ids: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(dispatch.op(backend, "sort_experts")(expert_ids, num_experts))


@_sort_experts.register_fake
def _(expert_ids, num_experts, backend):
    return (
        expert_ids.new_empty(expert_ids.numel(), dtype=torch.int64),
        expert_ids.new_empty(num_experts + 1, dtype=torch.int64),
    )


guard_autograd(_sort_experts)
