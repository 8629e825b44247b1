"""Routing (softmax, top-k, renormalisation, per-sample statistics) and the aux losses, in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the softmax and the statistics: float32 (CuMo), float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sorted_choices(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `probs` [T, E] along E, descending, equal scores: lower expert index first.

    A stable descending sort keeps equal scores in index order, which is the package's tie
    rule (CUMO.md); `torch.topk` promises no order among ties. The ids are a permutation of
    0..E-1 for every token, NaN or not, so they are always in range.
    """
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[:, :top_k].contiguous(), ids[:, :top_k].contiguous()


def route(
    logits: torch.Tensor, top_k: int, num_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens from router logits, with CuMo's rounding points.

    Args:
        logits: [T, E] router logits (x @ gate^T) in the activation dtype; T = B * N, sample b
            owns rows [b*N, (b+1)*N).
        top_k: experts per token, 1 <= top_k <= E.
        num_samples: B, the number of samples the balance statistics are taken over.

    Returns:
        weights: [T, k] logits.dtype, the top-k probabilities renormalised to sum to 1: their
            sum is rounded to logits.dtype, then the quotients (CuMo's w / w.sum() in that dtype).
        expert_ids: [T, k] int64, descending probability, ties to the lower index.
        prob_sums: [B, E] float32, per-sample sum over tokens of the probabilities rounded to
            logits.dtype.
        first_counts: [B, E] float32, per-sample number of tokens whose first choice is e.
        z_sums: [B] float32, per-sample sum over tokens of logsumexp(logits)^2 (float32).
    """
    T, E = logits.shape
    dtype = logits.dtype
    acc = stats_dtype(dtype)
    lf = logits.to(acc)
    probs = torch.softmax(lf, dim=-1).to(dtype)
    selected, expert_ids = _sorted_choices(probs, top_k)
    # CuMo's w / w.sum() in the activation dtype: torch sums in float32 and rounds the sum to
    # `dtype`, then divides in float32 and rounds the quotient (both rounding points of CuMo).
    weights = selected / selected.sum(dim=-1, keepdim=True)
    n = T // num_samples if num_samples else 0
    prob_sums = probs.to(acc).view(num_samples, n, E).sum(dim=1)
    first = torch.zeros(T, E, dtype=acc, device=logits.device)
    first.scatter_(1, expert_ids[:, :1], 1.0)
    first_counts = first.view(num_samples, n, E).sum(dim=1)
    lse = torch.logsumexp(lf, dim=-1)
    z_sums = (lse * lse).view(num_samples, n).sum(dim=1)
    return weights, expert_ids, prob_sums, first_counts, z_sums


def route_backward(
    grad_weights: torch.Tensor,
    grad_prob_sums: torch.Tensor,
    grad_z_sums: torch.Tensor,
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """Gradient of `route` with respect to logits [T, E], in logits.dtype.

    grad_weights [T, k], grad_prob_sums [B, E], grad_z_sums [B] (float32 or any float dtype).
    The rounding of the probabilities to the activation dtype passes gradients unchanged, as
    the casts in CuMo's own autograd graph do; the choice of experts carries no gradient. The
    renormalisation w = sel / s is differentiated where CuMo's autograd differentiates it: at the
    probabilities rounded to the activation dtype and at their sum rounded to it (the tensors its
    graph saves), in float32 arithmetic; the softmax's backward uses the float32 probabilities
    (the softmax output that graph saves). For k = 1, s == sel: w is exactly 1, its gradient 0.
    """
    T, E = logits.shape
    B = grad_prob_sums.shape[0]
    n = T // B if B else 0
    acc = stats_dtype(logits.dtype)
    lf = logits.to(acc)
    p = torch.softmax(lf, dim=-1)
    lse = torch.logsumexp(lf, dim=-1)
    sel = p.to(logits.dtype).to(acc).gather(1, expert_ids)
    s = sel.sum(dim=-1, keepdim=True).to(logits.dtype).to(acc)
    gw = grad_weights.to(acc)
    w = sel / s
    g_sel = (gw - (gw * w).sum(dim=-1, keepdim=True)) / s
    dprobs = torch.zeros(T, E, dtype=acc, device=logits.device)
    dprobs.scatter_(1, expert_ids, g_sel)
    dprobs = (dprobs.view(B, n, E) + grad_prob_sums.to(acc).view(B, 1, E)).view(T, E)
    dlogits = p * (dprobs - (dprobs * p).sum(dim=-1, keepdim=True))
    gz = grad_z_sums.to(acc).view(B, 1).expand(B, n).reshape(T)
    dlogits = dlogits + (2.0 * lse * gz).unsqueeze(1) * p
    return dlogits.to(logits.dtype)


def aux_losses(
    prob_sums: torch.Tensor, first_counts: torch.Tensor, z_sums: torch.Tensor, tokens_per_sample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CuMo's balance loss and router z-loss from the per-sample statistics of `route`.

    prob_sums [B, E], first_counts [B, E], z_sums [B] (float32); N = tokens_per_sample.
    Returns (balance, z), float32 scalars (float64 for float64 statistics):
    balance = mean_{b,e}((prob_sums / N) * (first_counts / N)) * E^2, z = sum(z_sums) / (B * N);
    both 0 for B = 0 (no samples: as moe_mlp's losses of an empty input, not a mean over nothing).
    """
    B, E = prob_sums.shape
    n = float(tokens_per_sample)
    acc = stats_dtype(prob_sums.dtype)
    count = max(B * E, 1)
    balance = ((prob_sums.to(acc) / n) * (first_counts.to(acc) / n)).sum() / count * (E * E)
    z = z_sums.to(acc).sum() / (max(B, 1) * n)
    return balance, z


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
