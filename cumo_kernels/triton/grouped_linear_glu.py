"""Triton kernels of the gated first GEMM (issue 23): h = a(x W_gate^T + b_gate) * b(x W_up^T + b_up).

Forward (`_glu_fwd_kernel`, one launch): a program owns BM grouped rows by BN hidden columns j and
computes the gate tile (w1 rows of j's gate) and the up tile (rows of j's up) together, from the
same A tiles, in two float32 accumulators; the epilogue adds the biases, rounds both to the output
dtype (the pre-activation's rounding point, as the torch backend's), applies the gated activation
in float32 and writes h once. The [M, 2H] pre-activation reaches memory only when a backward will
need it (save_pre): it is saved, not recomputed (benchmarks/NOTES.md, "Gated experts", counts
the two), its columns in w1's row order. w1 and b1 are read through their strides: the
concatenated and interleaved layouts and a transposed weight are the same kernel.

Backward: the gated derivative turns grad_h [M, H] into grad_pre [M, 2H] (in w1's row order), and
the rest is the linear layer's backward on it (dX, dW + db of the grouped GEMM, weights through
their strides). In moe_mlp's fused composition that derivative is the epilogue of the kernel that
produces grad_h, fc2's dX (`grouped_linear_glu_combine_backward`): grad_h never reaches memory.
Standing alone (`grouped_linear_glu_backward`) it is one elementwise launch (`_glu_grad_kernel`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._activations import ACTIVATION_CODES
from ._common import (
    autotuned,
    check_dtype,
    dot_precision,
    glu_cols,
    glu_fwd,
    glu_grad,
    launch,
    on_tensor_device,
)
from .grouped_linear import (
    _FIXED,
    _FWD_KEY,
    GROUP,
    _bucket,
    _configs,
    _row_tile,
    _tile_of,
    grouped_linear_combine,
    launch_grouped_linear_backward,
    row_tiles,
    smem_fwd,
)
from .permute import slot_sum

_GLU_KEY = _FWD_KEY + ["INTERLEAVED"]


@triton.jit
def _glu_fwd_kernel(
    a_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    pre_ptr,
    offsets_ptr,
    idx_ptr,
    M,
    N,
    K,
    E,
    top_k,
    M_BUCKET,
    s_we,
    s_wn,
    s_wk,
    s_be,
    s_bn,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    STORE_PRE: tl.constexpr,
    PREC: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    GROUP_M: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """h [M, N] (N = H) and, with STORE_PRE, pre [M, 2N]; w1 [E, 2N, K] through strides."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, E, N, BM, BN, GROUP_M)
    e_sel, row0, rows, rmask, slot, arow, cols, cmask, e_safe, live = _row_tile(
        offsets_ptr, idx_ptr, E, M, N, top_k, pid_m, pid_n, GATHER, SCATTER, BM, BN
    )
    g_rows, u_rows = glu_cols(cols, N, INTERLEAVED)
    w_base = w_ptr + e_safe.to(tl.int64) * s_we
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(live, K, 0)
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(a_ptr + arow[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(w_base + g_rows[None, :] * s_wn + ks[:, None] * s_wk, mask=wmask, other=0.0)
        wu = tl.load(w_base + u_rows[None, :] * s_wn + ks[:, None] * s_wk, mask=wmask, other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
    if HAS_BIAS:
        b_base = b_ptr + e_safe * s_be
        bg = tl.load(b_base + g_rows * s_bn, mask=cmask, other=0.0).to(tl.float32)
        bu = tl.load(b_base + u_rows * s_bn, mask=cmask, other=0.0).to(tl.float32)
        acc_g += tl.where(live, bg, 0.0)[None, :]  # a dropped rows' tile stores zeros
        acc_u += tl.where(live, bu, 0.0)[None, :]
    out_mask = rmask[:, None] & cmask[None, :]
    pg = acc_g.to(h_ptr.dtype.element_ty)
    pu = acc_u.to(h_ptr.dtype.element_ty)
    if STORE_PRE:
        tl.store(pre_ptr + rows[:, None] * (2 * N) + g_rows[None, :], pg, mask=out_mask)
        tl.store(pre_ptr + rows[:, None] * (2 * N) + u_rows[None, :], pu, mask=out_mask)
    h = glu_fwd(pg.to(tl.float32), pu.to(tl.float32), ACT)
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _glu_grad_kernel(
    gh_ptr, pre_ptr, out_ptr, NUMEL, N, ACT: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr
):
    """out [M, 2N] (w1's row order) = the gated derivative of grad_h [M, N] at pre [M, 2N]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    r = offs // N
    j = offs % N
    gcol, ucol = glu_cols(j, N, INTERLEAVED)
    gh = tl.load(gh_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(pre_ptr + r * (2 * N) + gcol, mask=m, other=0.0).to(tl.float32)
    u = tl.load(pre_ptr + r * (2 * N) + ucol, mask=m, other=0.0).to(tl.float32)
    dg, du = glu_grad(gh, g, u, ACT)
    tl.store(out_ptr + r * (2 * N) + gcol, dg.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(out_ptr + r * (2 * N) + ucol, du.to(out_ptr.dtype.element_ty), mask=m)


def smem_glu_fwd(meta: dict, elt: int) -> int:
    """Two weight tiles (gate and up) per stage beside A's: A BM x BK, W 2 x BN x BK."""
    return smem_fwd({**meta, "BN": 2 * meta["BN"]}, elt)


def glu_fwd_configs() -> list:
    """The autotune configs of the gated forward: BN <= 64 and BK <= 32, the gate and up weight tiles
    being two (two float32 accumulators; ptxas spilled 250+ B with BN = 128 and 36 B with BK = 64 at
    4 stages, sm90 bf16, tests/test_triton_compile.py)."""
    return [c for c in _configs() if c.kwargs["BN"] <= 64 and c.kwargs["BK"] <= 32]


_fwd = autotuned(_glu_fwd_kernel, glu_fwd_configs(), _GLU_KEY, smem_glu_fwd)


# ------------------------------------------------------------------------------------ launchers


@on_tensor_device
def forward(
    a: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str,
    interleaved: bool,
    *,
    sort_idx: torch.Tensor | None = None,
    top_k: int = 1,
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [M, H], pre [M, 2H] or [0]); one launch. With sort_idx, a is [T, in] in token order and
    row r reads a[sort_idx[r] // top_k] (gather-on-load)."""
    check_dtype("x", a)
    a, offsets = a.contiguous(), offsets.contiguous()
    e, n2, k = w1.shape
    n = n2 // 2
    gather = sort_idx is not None
    m = sort_idx.numel() if gather else a.shape[0]
    h = torch.empty(m, n, dtype=a.dtype, device=a.device)
    pre = torch.empty(m, n2, dtype=a.dtype, device=a.device) if save_pre else a.new_empty(0)
    if m == 0:
        return h, pre
    bias = b1 if b1 is not None else w1
    args = (
        a,
        w1,
        bias,
        h,
        pre if save_pre else h,
        offsets,
        sort_idx.contiguous() if gather else offsets,
        m,
        n,
        k,
        e,
        top_k,
        _bucket(m),
        *w1.stride(),
        bias.stride(0),
        bias.stride(1) if b1 is not None else 1,
        b1 is not None,
        ACTIVATION_CODES[activation],
        gather,
        False,
        save_pre,
        dot_precision(a.dtype),
        interleaved,
        GROUP,
    )
    grid = lambda meta: (row_tiles(m, e, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    launch(_fwd, grid, args, _FIXED)
    return h, pre


_GRAD_BLOCK = 1024


@on_tensor_device
def glu_grad_pass(grad_h: torch.Tensor, pre: torch.Tensor, activation: str, interleaved: bool) -> torch.Tensor:
    """grad_pre [M, 2H] (w1's row order) from grad_h [M, H] and pre [M, 2H]: one launch."""
    grad_h, pre = grad_h.contiguous(), pre.contiguous()
    m, n = grad_h.shape
    out = torch.empty(m, 2 * n, dtype=pre.dtype, device=pre.device)
    numel = grad_h.numel()
    if numel:
        grid = (triton.cdiv(numel, _GRAD_BLOCK),)
        _glu_grad_kernel[grid](grad_h, pre, out, numel, n, ACTIVATION_CODES[activation], interleaved, _GRAD_BLOCK)
    return out


def grouped_linear_glu(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str,
    interleaved: bool = False,
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `grouped_linear_glu` (one launch): the reference's contract."""
    return forward(x, w1, b1, offsets, activation, interleaved, save_pre=save_pre)


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
    """The gated derivative (one elementwise launch), then dX and dW + db (two launches)."""
    check_dtype("x", x)
    gpre = glu_grad_pass(grad_h, pre, activation, interleaved)
    dx, dw, db, _ = launch_grouped_linear_backward(
        gpre, x, w1, offsets, x.new_empty(0), "none", has_bias, strided_weight=True
    )
    return dx, dw, db


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
    """One launch: the gated GEMM reading x's rows through sort_idx // k (gather-on-load)."""
    return forward(x, w1, b1, offsets, activation, interleaved, sort_idx=sort_idx, top_k=top_k, save_pre=save_pre)


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
    """The gather GEMM's backward on grad_pre + the gated derivative of grad_h (each may be an
    empty [0], absent): in moe_mlp's fused composition grad_pre comes from fc2's dX epilogue
    (`grouped_linear_glu_combine_backward`) and grad_h is absent, so this is the linear backward."""
    check_dtype("x", x)
    if grad_h.numel():
        g = glu_grad_pass(grad_h, pre, activation, interleaved)
        grad_pre = g if not grad_pre.numel() else g + grad_pre
    return gather_backward_pre(grad_pre, x, w1, sort_idx, offsets, top_k, has_bias)


def gather_backward_pre(
    grad_pre: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    sort_idx: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad_x [T, in], grad_w1 (w1's strides), grad_b1): dX in slot order, dW + db (x gathered on
    load), the sum over each token's k slots."""
    dx_slot, dw, db, _ = launch_grouped_linear_backward(
        grad_pre,
        x,
        w1,
        offsets,
        x.new_empty(0),
        "none",
        has_bias,
        sort_idx=sort_idx.contiguous(),
        top_k=top_k,
        gather_x=True,
        scatter_dx=True,
        strided_weight=True,
    )
    gx = dx_slot if top_k == 1 else slot_sum(dx_slot, x.shape[0], top_k)
    return gx, dw, db


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
    """fc2 with the weighted combine over h = glu(pre) (the triton backend's combine: two launches)."""
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
    """(grad_pre [M, 2H], grad_w2, grad_b2 or None, grad_weights [T, k]); two launches: fc2's dX
    (grad_out gathered and scaled on load, the routing weights' gradient from its first column
    block, the gated derivative in its epilogue: grad_h never reaches memory), dW2 + db2."""
    gpre, gw, gb, gwts = launch_grouped_linear_backward(
        grad_out,
        h,
        w2,
        offsets,
        h.new_empty(0),
        "none",
        has_bias,
        sort_idx=sort_idx.contiguous(),
        top_k=weights.shape[1],
        routing_weights=weights,
        y_slot=y_slot,
        glu=(activation, interleaved, pre),
    )
    return gpre, gw, gb, gwts


__all__ = [
    "grouped_linear_glu",
    "grouped_linear_glu_combine",
    "grouped_linear_glu_combine_backward",
    "grouped_linear_glu_backward",
    "grouped_linear_glu_gather",
    "grouped_linear_glu_gather_backward",
]
