"""Grouping token rows by expert and the weighted combine back to token order, in torch.

Expert ids 0..E-1 route a slot; an id >= E marks a dropped slot (an expert-parallel sentinel: the
expert lives elsewhere). Dropped slots sort after every expert's rows, in slot order, and
offsets[E] counts the routed slots only, so rows offsets[E]:T*k belong to no expert (the grouped
GEMM writes zeros there). A negative id is refused by the public ops where they validate; here it
counts as dropped too, so that no id indexes out of bounds.
"""

from __future__ import annotations

import torch


def expert_keys(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T*k] int64 sort keys of the slots: the expert id, or E for an id outside 0..E-1."""
    keys = expert_ids.reshape(-1).clamp(max=num_experts)  # a new tensor
    return keys.masked_fill_(keys < 0, num_experts)


def offsets_of_keys(keys: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E + 1] int64 row offsets from the slots' sort keys, on their device (no sync: a
    scatter-add of ones, not `bincount`, whose output size is data-dependent on CUDA). Dropped
    slots (key E) are not counted: offsets[E] is the number of routed slots."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=keys.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts[:num_experts], dim=0, out=offsets[1:])
    return offsets


def inverse_permutation(sort_idx: torch.Tensor) -> torch.Tensor:
    """inv with inv[sort_idx[i]] = i: the grouped row that holds each flat slot t*k+j."""
    inv = torch.empty_like(sort_idx)
    inv[sort_idx] = torch.arange(sort_idx.numel(), device=sort_idx.device)
    return inv


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the rows of x by expert.

    Args:
        x: [T, H] token rows.
        expert_ids: [T, k] int64 expert of each (token, choice) slot; >= E: dropped.
        num_experts: E.

    Returns:
        x_sorted: [T*k, H], x_sorted[i] = x[sort_idx[i] // k].
        sort_idx: [T*k] int64 flat slot t*k+j of each grouped row; stable, so within an expert
            rows keep slot order; dropped slots last.
        offsets: [E + 1] int64; rows offsets[e]:offsets[e+1] belong to expert e, rows
            offsets[E]:T*k are the dropped slots'.
    """
    k = expert_ids.shape[1]
    keys = expert_keys(expert_ids, num_experts)
    sort_idx = torch.argsort(keys, stable=True)
    offsets = offsets_of_keys(keys, num_experts)
    x_sorted = x.index_select(0, torch.div(sort_idx, k, rounding_mode="floor"))
    return x_sorted, sort_idx, offsets


def permute_backward(grad_sorted: torch.Tensor, sort_idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gradient of `permute` for x: [T, H], the sum over each token's k grouped rows.

    A gather through the inverse permutation and a sum over k: deterministic, no atomics.
    """
    tk, h = grad_sorted.shape
    inv = inverse_permutation(sort_idx)
    return grad_sorted.index_select(0, inv).view(tk // top_k, top_k, h).sum(dim=1)


def unpermute(y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine of grouped rows back to token order.

    y_sorted [T*k, N], sort_idx [T*k] (from `permute`), weights [T, k] -> out [T, N],
    out[t] = sum_j weights[t, j] * y_sorted[row holding slot t*k+j], accumulated in float32
    (one batched product, T x (1 x k) @ (k x N)).
    """
    t, k = weights.shape
    n = y_sorted.shape[1]
    gathered = y_sorted.index_select(0, inverse_permutation(sort_idx)).view(t, k, n)
    w = weights.to(y_sorted.dtype).unsqueeze(1)
    # Into a [T, N] tensor of its own: an op's output must not be a view (autograd then refuses
    # in-place ops on it, "a view created inside a custom Function").
    out = y_sorted.new_empty(t, n)
    torch.bmm(w, gathered, out=out.view(t, 1, n))
    return out


def unpermute_backward(
    grad_out: torch.Tensor, y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `unpermute`: (grad_y_sorted [T*k, N] in y_sorted.dtype, grad_weights [T, k]
    in weights.dtype)."""
    t, k = weights.shape
    n = y_sorted.shape[1]
    token = torch.div(sort_idx, k, rounding_mode="floor")
    w_rows = weights.reshape(-1).index_select(0, sort_idx).to(grad_out.dtype)
    grad_y = grad_out.index_select(0, token) * w_rows.unsqueeze(1)
    gathered = y_sorted.index_select(0, inverse_permutation(sort_idx)).view(t, k, n)
    grad_w = y_sorted.new_empty(t, k)
    torch.bmm(gathered, grad_out.to(y_sorted.dtype).unsqueeze(2), out=grad_w.view(t, k, 1))
    return grad_y.to(y_sorted.dtype), grad_w.to(weights.dtype)


def sort_experts(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`permute`'s (sort_idx [T*k], offsets [E+1]) without the permuted rows (ids >= E: dropped)."""
    keys = expert_keys(expert_ids, num_experts)
    return torch.argsort(keys, stable=True), offsets_of_keys(keys, num_experts)
