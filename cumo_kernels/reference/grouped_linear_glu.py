"""Gated grouped linear layer (issue 23), in torch: the first layer of a gated expert,
h = a(x W_gate^T + b_gate) * b(x W_up^T + b_up) on rows grouped by expert, W_gate and W_up being
the gate and up rows of one w1 [E, 2H, in].

w1's rows are in one of two layouts, `interleaved` False (concatenated: each expert's H gate rows,
then its H up rows; transformers' `gate_up_proj`) or True (gate and up rows alternating, as GPT-OSS
stores them); w1 may have any strides (a weight stored transposed, [E, in, 2H], is passed as
`w.transpose(1, 2)`): it is read as it is, never copied. The pre-activation [M, 2H] has its
columns in w1's row order, so the backward is the plain linear backward on grad_pre.

On the CPU (the per-expert strategy) every step runs block by block behind the expert's GEMM: one
GEMM of N = 2H per block of rows (the gate and up columns of those rows together), the gated
activation on that block while it is in the cache; inference keeps no pre-activation at all, and
`expert_mlp_glu` no [M, H] hidden tensor either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _activations
from .grouped_linear import (
    _CHUNK_ELEMS,
    _by_rows,
    _linear_into,
    _linear_pre,
    _row_block,
    _row_blocks,
    gemm_strategy,
    grouped_linear,
    grouped_linear_backward,
    grouped_linear_combine,
    grouped_linear_combine_backward,
    host_bounds,
)


def _glu(pre: torch.Tensor, activation: str, interleaved: bool) -> torch.Tensor:
    return _activations.glu_apply(*_activations.glu_halves(pre, interleaved), activation)


# The gate's activation written into a given tensor (aten's out= kernels: the same kernels, so the same
# values as `_activations.apply`), for float32 and float64, where `apply` computes in the input's dtype.
_ACT_OUT = {
    "silu": lambda g, out: torch._C._nn.silu(g, out=out),
    "gelu": lambda g, out: torch._C._nn.gelu(g, out=out),
    "gelu_tanh": lambda g, out: torch._C._nn.gelu(g, approximate="tanh", out=out),
    "relu": lambda g, out: torch.clamp_min(g, 0, out=out),
}


def _glu_into(out: torch.Tensor, pre: torch.Tensor, activation: str, interleaved: bool, scratch: torch.Tensor):
    """out [r, H] = _glu(pre [r, 2H]), bit for bit; for float32/float64 and the common activations
    through `scratch` [r, H] (reused from block to block): a fresh [r, H] temporary per block costs
    the CPU more than the activation itself (page faults of each new allocation)."""
    gate, up = _activations.glu_halves(pre, interleaved)
    act = _ACT_OUT.get(activation)
    if act is None or pre.dtype not in (torch.float32, torch.float64):
        out.copy_(_glu(pre, activation, interleaved))
        return
    act(gate, scratch)
    torch.mul(scratch, up, out=out)


def _glu_grad_into(out: torch.Tensor, grad_h: torch.Tensor, pre: torch.Tensor, activation: str, interleaved: bool):
    """out [r, 2H] (w1's row order) = the gradient of the pre-activation, rounded to out's dtype."""
    gg, gu = _activations.glu_derivative(grad_h, *_activations.glu_halves(pre, interleaved), activation)
    og, ou = _activations.glu_halves(out, interleaved)
    og.copy_(gg)
    ou.copy_(gu)


def grouped_linear_glu(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str,
    interleaved: bool = False,
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated grouped linear layer.

    Args:
        x: [M, in] grouped rows (from `permute`).
        w1: [E, 2H, in], any strides; rows in the concatenated or (`interleaved`) interleaved layout.
        b1: [E, 2H] or None, in w1's row layout.
        offsets: [E + 1] int64 row offsets (rows offsets[E]:M belong to no expert: zeros).
        activation: one of `GLU_ACTIVATIONS`.
        save_pre: keep the pre-activation for a backward.

    Returns:
        h: [M, H] x.dtype, a(gate) * b(up) computed in float32 from the pre-activation rounded to
            x.dtype, rounded once.
        pre: [M, 2H] (columns in w1's row order, rounded to x.dtype) when save_pre, else [0].
    """
    m = x.shape[0]
    num_experts, n2, _ = w1.shape
    strategy = gemm_strategy(x, w1)
    if strategy != "per_expert":
        pre = _linear_pre(x, w1, b1, offsets, strategy)
        h = _by_rows(lambda p: _glu(p, activation, interleaved), _CHUNK_ELEMS // max(1, n2), pre)
        return h, (pre if save_pre else x.new_empty(0))
    h = x.new_empty(m, n2 // 2)
    pre = x.new_empty(m, n2) if save_pre else None
    bounds = host_bounds(offsets, m)
    if bounds[-1] < m:  # dropped rows: act(0) * 0 = 0 for every gated activation
        h[bounds[-1] :].zero_()
        if pre is not None:
            pre[bounds[-1] :].zero_()
    rows = min(m, _row_block(n2, x.dtype))
    block = None if pre is not None else x.new_empty(rows, n2)
    scratch = x.new_empty(rows, n2 // 2)
    for e, r0, r1 in _row_blocks(bounds, num_experts, _row_block(n2, x.dtype)):
        p = pre[r0:r1] if pre is not None else block[: r1 - r0]
        _linear_into(x[r0:r1], w1[e], None if b1 is None else b1[e], p)
        _glu_into(h[r0:r1], p, activation, interleaved, scratch[: r1 - r0])
    return h, (pre if pre is not None else x.new_empty(0))


def grouped_linear_glu_backward(
    grad_h: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    interleaved: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_x [M, in], grad_w1 [E, 2H, in], grad_b1 [E, 2H] or None): the gated derivative
    (block by block on the CPU, row chunks elsewhere), then the linear layer's backward."""
    m, n2 = x.shape[0], w1.shape[1]
    strategy = gemm_strategy(x, w1)
    gpre = x.new_empty(m, n2)
    if strategy == "per_expert":
        bounds = host_bounds(offsets, m)
        if bounds[-1] < m:
            gpre[bounds[-1] :].zero_()
        for _, r0, r1 in _row_blocks(bounds, w1.shape[0], _row_block(n2, x.dtype)):
            _glu_grad_into(gpre[r0:r1], grad_h[r0:r1], pre[r0:r1], activation, interleaved)
    else:
        rows = max(1, _CHUNK_ELEMS // max(1, n2))
        for r0 in range(0, m, rows):
            _glu_grad_into(gpre[r0 : r0 + rows], grad_h[r0 : r0 + rows], pre[r0 : r0 + rows], activation, interleaved)
    return grouped_linear_backward(gpre, x, w1, offsets, x.new_empty(0), "none", has_bias)


def expert_mlp_glu(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str,
    interleaved: bool = False,
) -> torch.Tensor:
    """Both gated expert layers for inference: x [M, in] grouped -> [M, out]. On the CPU block by
    block (neither the [M, 2H] pre-activation nor the [M, H] hidden tensor exists); elsewhere
    `grouped_linear_glu` without a saved pre-activation, then `grouped_linear`."""
    if gemm_strategy(x, w1) != "per_expert":
        h = grouped_linear_glu(x, w1, b1, offsets, activation, interleaved, save_pre=False)[0]
        return grouped_linear(h, w2, b2, offsets, "none")[0]
    m = x.shape[0]
    y = x.new_empty(m, w2.shape[1])
    bounds = host_bounds(offsets, m)
    if bounds[-1] < m:  # dropped rows
        y[bounds[-1] :].zero_()
    for e, r0, r1 in _row_blocks(bounds, w1.shape[0], _row_block(w1.shape[1], x.dtype)):
        p = F.linear(x[r0:r1], w1[e], None if b1 is None else b1[e])
        _linear_into(_glu(p, activation, interleaved), w2[e], None if b2 is None else b2[e], y[r0:r1])
    return y


def grouped_linear_glu_gather(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    activation: str,
    interleaved: bool = False,
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_linear_glu(x[sort_idx // top_k], ...)`: x [T, in] in token order -> (h [T*k, H], pre)."""
    xs = x.index_select(0, torch.div(sort_idx, top_k, rounding_mode="floor"))
    return grouped_linear_glu(xs, w1, b1, offsets, activation, interleaved, save_pre)


def grouped_linear_glu_gather_backward(
    grad_h: torch.Tensor,
    grad_pre: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    top_k: int,
    activation: str,
    interleaved: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_x [T, in] in token order, grad_w1, grad_b1 or None) from grad_h [T*k, H] (through the
    gated derivative) and grad_pre [T*k, 2H] (as it is), either an empty [0] when absent."""
    from .permute import permute_backward

    m, n2 = pre.shape
    gpre = grad_pre if grad_pre.numel() else x.new_zeros(m, n2)
    if grad_h.numel():
        g = x.new_empty(m, n2)
        _glu_grad_into(g, grad_h, pre, activation, interleaved)
        gpre = g + gpre if grad_pre.numel() else g
    xs = x.index_select(0, torch.div(sort_idx, top_k, rounding_mode="floor"))
    gxs, gw, gb = grouped_linear_backward(gpre, xs, w1, offsets, x.new_empty(0), "none", has_bias)
    return permute_backward(gxs, sort_idx, top_k), gw, gb


def grouped_linear_glu_combine(
    h: torch.Tensor,
    pre: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    activation: str,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fc2 with the weighted combine (`grouped_linear_combine`) over h [T*k, H], which is
    glu(pre) as `grouped_linear_glu_gather` returned them: (out [T, out], y_slot [T*k, out]).
    As a function it is of pre (its gradient goes to pre, none to h): h is the forward's copy of
    glu(pre), so that the backward can hand grad_pre straight to the first layer."""
    return grouped_linear_combine(h, w2, b2, sort_idx, offsets, weights)


def grouped_linear_glu_combine_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    pre: torch.Tensor,
    w2: torch.Tensor,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    y_slot: torch.Tensor,
    activation: str,
    interleaved: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(grad_pre [T*k, 2H], grad_w2, grad_b2 or None, grad_weights [T, k])."""
    gh, gw, gb, gwts = grouped_linear_combine_backward(grad_out, h, w2, sort_idx, offsets, weights, y_slot, has_bias)
    gpre = h.new_empty(pre.shape)
    _glu_grad_into(gpre, gh, pre, activation, interleaved)
    return gpre, gw, gb, gwts


__all__ = [
    "expert_mlp_glu",
    "grouped_linear_glu",
    "grouped_linear_glu_backward",
    "grouped_linear_glu_combine",
    "grouped_linear_glu_combine_backward",
    "grouped_linear_glu_gather",
    "grouped_linear_glu_gather_backward",
]
