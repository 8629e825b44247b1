"""Torch twins of the fused ops (same signatures as the backend functions): routing from x,
the sort order alone, the first GEMM gathering its rows through the sort order, and the second
GEMM with the weighted combine. Compositions of the base reference functions; the torch backend's
`moe_mlp` keeps its own composition (these exist for the fused custom ops' parity and opcheck
tests, and as the fallback of a backend module that lacks a fused function)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gemm import grouped_linear, grouped_linear_backward
from .permute import expert_keys, offsets_of_keys, permute_backward, unpermute_backward
from .routing import route, route_backward


def route_x(
    x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, num_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route(F.linear(x, gate_weight), top_k, num_samples)` plus the logits [T, E] (x.dtype).

    x [T, in], gate_weight [E, in] -> (weights [T, k], expert_ids [T, k] int64, prob_sums [B, E],
    first_counts [B, E], z_sums [B], logits [T, E]).
    """
    logits = F.linear(x, gate_weight)
    return (*route(logits, top_k, num_samples), logits)


def route_x_backward(
    grad_weights: torch.Tensor,
    grad_prob_sums: torch.Tensor,
    grad_z_sums: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [T, in], grad_gate [E, in]) through the logits (rounded to x.dtype)."""
    dl = route_backward(grad_weights, grad_prob_sums, grad_z_sums, logits, expert_ids)
    return dl @ gate_weight, dl.t() @ x


def sort_experts(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`permute`'s (sort_idx [T*k], offsets [E+1]) without the permuted rows (ids >= E: dropped)."""
    keys = expert_keys(expert_ids, num_experts)
    return torch.argsort(keys, stable=True), offsets_of_keys(keys, num_experts)


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
    """`grouped_linear(x[sort_idx // top_k], ...)`: x [T, K] in token order -> (y [T*k, N], pre);
    pre is empty ([0]) when activation is "none" or save_pre is False (no backward to serve)."""
    xs = x.index_select(0, torch.div(sort_idx, top_k, rounding_mode="floor"))
    y, pre = grouped_linear(xs, weight, bias, offsets, activation)
    return y, (pre if save_pre else x.new_empty(0))


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
    """(grad_x [T, K] in token order, grad_weight, grad_bias or None)."""
    xs = x.index_select(0, torch.div(sort_idx, top_k, rounding_mode="floor"))
    gxs, gw, gb = grouped_linear_backward(grad_y, xs, weight, offsets, pre, activation, has_bias)
    return permute_backward(gxs, sort_idx, top_k), gw, gb


def grouped_linear_combine(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second GEMM with the weighted combine.

    h [T*k, K] grouped rows, weight [E, N, K], bias [E, N] or None, weights [T, k] ->
    (out [T, N] = sum_j weights[t, j] * y[row of slot t*k+j], y_slot [T*k, N]: the GEMM's rows
    in slot order t*k+j, kept for the backward).
    """
    t, k = weights.shape
    y_sorted, _ = grouped_linear(h, weight, bias, offsets, "none")
    y_slot = torch.empty_like(y_sorted)
    y_slot[sort_idx] = y_sorted
    out = y_slot.new_empty(t, y_slot.shape[1])  # not a view (see unpermute)
    torch.bmm(weights.to(y_slot.dtype).unsqueeze(1), y_slot.view(t, k, -1), out=out.view(t, 1, -1))
    return out, y_slot


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
    """(grad_h [T*k, K], grad_weight, grad_bias or None, grad_weights [T, k])."""
    y_sorted = y_slot.index_select(0, sort_idx)
    gys, gwts = unpermute_backward(grad_out, y_sorted, sort_idx, weights)
    gh, gw, gb = grouped_linear_backward(gys, h, weight, offsets, h.new_empty(0), "none", has_bias)
    return gh, gw, gb, gwts
