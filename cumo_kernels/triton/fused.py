"""Triton launchers of the fused ops (the GEMM-shaped ones; `route_x` is in routing.py)."""

from __future__ import annotations

import torch

from . import grouped_gemm
from .permutation import slot_sum, sort_experts

__all__ = [
    "grouped_linear_combine",
    "grouped_linear_combine_backward",
    "grouped_linear_gather",
    "grouped_linear_gather_backward",
    "sort_experts",
]


def grouped_linear_gather(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    activation: str = "none",
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: the grouped GEMM reading x's rows through sort_idx // k (gather-on-load)."""
    return grouped_gemm.forward(
        x,
        weight,
        bias,
        offsets,
        activation,
        sort_idx=sort_idx.contiguous(),
        top_k=top_k,
        gather=True,
        save_pre=save_pre,
    )


def grouped_linear_gather_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    top_k: int,
    activation: str,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dX (written in slot order), dW + db (x gathered on load), then the sum over each token's
    k slots (skipped for k = 1): three launches, two for k = 1."""
    dx_slot, dw, db, _ = grouped_gemm.backward(
        grad_y,
        x,
        weight,
        offsets,
        pre,
        activation,
        has_bias,
        sort_idx=sort_idx.contiguous(),
        top_k=top_k,
        gather_x=True,
        scatter_dx=True,
    )
    gx = dx_slot if top_k == 1 else slot_sum(dx_slot, x.shape[0], top_k)
    return gx, dw, db


def grouped_linear_combine(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM stores its rows in slot order (the scatter half of the combine, in the epilogue);
    a second launch takes the weighted sum over each token's k contiguous rows."""
    t, k = weights.shape
    y_slot, _ = grouped_gemm.forward(h, weight, bias, offsets, "none", sort_idx=sort_idx.contiguous(), scatter=True)
    return slot_sum(y_slot, t, k, weights=weights.contiguous()), y_slot


def grouped_linear_combine_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    y_slot: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Two launches: dX (grad_out gathered and scaled by the routing weight on load; the first
    column block also forms the routing weights' gradient) and dW + db."""
    gh, gw, gb, gwts = grouped_gemm.backward(
        grad_out,
        h,
        weight,
        offsets,
        h.new_empty(0),
        "none",
        has_bias,
        sort_idx=sort_idx.contiguous(),
        top_k=weights.shape[1],
        routing_weights=weights,
        y_slot=y_slot,
    )
    return gh, gw, gb, gwts
