"""Grouped GEMM kernels: one launch for all experts over rows grouped by expert.

Tile schedule without a host sync: `row_tiles(M, E, BM)` row tiles, the most that any split of M
rows among E experts and the dropped slots (the rows past offsets[E], which belong to no expert:
their tiles store zeros) can need: G = min(E + 1, M) groups with rows, each one tile for its first
row, plus (M - G) // BM full tiles of the rest (E = 256 experts over M = 96 rows: 96 tiles, not the
cdiv(M, BM) + E + 1 = 263 of a bound blind to M);each program walks the E+1 offsets (E is
small) to find its expert and row block, and a program past the last tile runs no K iterations and
stores nothing. Offsets are clamped into [0, M] and made non-decreasing as they are read, so that
no row outside [0, M) is addressed whatever a caller passes (garbage in, garbage out, but no
out-of-bounds access); sort_idx entries are clamped the same way.

Options, each a constexpr:
- GATHER (forward, dW): A's rows are read through the sort order, x[sort_idx[r] // k], so no
  permuted copy of x is materialised (gather-on-load).
- SCATTER (forward, dX): output row r is written to row sort_idx[r] (slot order t*k+j), which
  turns the following sum over each token's k rows into a contiguous reduction.
- GATHER_G (backward of the combine): the incoming gradient of row r is read as
  grad_out[sort_idx[r] // k] * routing_weight[sort_idx[r]]; with GW, the dX programs of the first
  column block also compute grad_routing_weight[s] = <y_slot[s], grad_out[s // k]>.
- ACT: bias + activation fused into the forward epilogue (the pre-activation is stored for the
  backward). The backward forms grad * act'(pre) once, in one elementwise pass, and hands it to
  the dX and dW kernels (which before recomputed it on load, once per output tile: 16-64 times
  per element at CuMo's shapes).
dW is a per-expert reduction over that expert's rows in row order (E x N-blocks x K-blocks
programs), with d bias accumulated by the first K block: no atomics, deterministic.

Tile order (issue #19; counted in benchmarks/NOTES.md and `python -m benchmarks.traffic`): every
grid is one-dimensional and grouped: GROUP consecutive row tiles (dW: GROUP consecutive N blocks of
one expert) take all their column tiles before the next group starts, so the programs running at
one time share both operands' panels in L2 instead of streaming every row again for each column
tile. The dX kernel's output tile is BM x BN (BK is its reduction step), as wide as the
forward's, not BK wide.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._activations import ACTIVATION_CODES
from ._common import (
    act_fwd,
    act_grad,
    autotuned,
    check_dtype,
    config_meta,
    dot_precision,
    glu_cols,
    glu_grad,
    launch,
    on_tensor_device,
    smem_fits,
)
from .permute import slot_sum

_FIXED = {"BM": 16, "BN": 16, "BK": 16}


def _configs() -> list:
    # A small set for GPUs (untuned: waits for a GPU measurement), keyed by shape.
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (64, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (128, 64, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (64, 64, 64, 4, 4),
        )
    ]


# Autotune keys: the problem's widths and row-count bucket, and the compile-time variant (one
# timing is not reused across variants that compile to different code).
_KEY = ["N", "K", "M_BUCKET"]
_FWD_KEY = _KEY + ["HAS_BIAS", "ACT", "GATHER", "SCATTER", "STORE_PRE", "PREC"]
_DX_KEY = _KEY + ["GATHER_G", "SCATTER", "GW", "GLU", "INTERLEAVED", "PREC"]
_DW_KEY = _KEY + ["HAS_BIAS", "GATHER_X", "GATHER_G", "PREC"]
# Row tiles (dW: N blocks) per group of the grouped tile order.
GROUP = 8

# Shared memory per kernel and element size, a model of Triton's software pipeliner (3.6) kept an
# upper bound of the compiled kernels' allocation by tests/test_triton_compile.py (sm90, every
# variant the ops launch, fp32 with ieee and tf32 dots, fp16, bf16; divisible-by-16 dims): a tile
# the dot reads straight from global memory has num_stages buffers (Hopper's asynchronous MMA keeps
# one more than the loads in flight), a tile consumed by register math first (dX and dW's gradient
# when it is scaled by act'(pre) or a routing weight, and the pre-activation) num_stages - 1, and
# a tile computed in registers that the dot reads back through shared memory one. _SMEM_SLACK
# covers the pipeline's and TMA's barriers (tens of bytes) and alignment. In fp32 the BM128 x BN128
# configs of dX and dW exceed sm90's 227 KB (measured 360-393 KB); the autotuner never tries them.
_SMEM_SLACK = 1024


def smem_fwd(meta: dict, elt: int) -> int:
    """Forward (either kernel): A's BM x BK and W's BN x BK tiles per stage."""
    return meta["num_stages"] * (meta["BM"] + meta["BN"]) * meta["BK"] * elt + _SMEM_SLACK


def smem_dx(meta: dict, elt: int) -> int:
    """dX (output tile BM x BN over K, reduction steps of BK over N): W's BK x BN tile (num_stages
    buffers) and the gradient's BM x BK tile: num_stages buffers where it goes straight into the
    dot, else num_stages - 1 of it and one of the scaled gradient; bounded by 2 * num_stages - 1."""
    s, bm, bn, bk = meta["num_stages"], meta["BM"], meta["BN"], meta["BK"]
    return (s * bn * bk + (2 * s - 1) * bm * bk) * elt + _SMEM_SLACK


def smem_dw(meta: dict, elt: int) -> int:
    """dW: x's BM x BK tile per stage, and the gradient tiles as in dX."""
    s, bm, bn, bk = meta["num_stages"], meta["BM"], meta["BN"], meta["BK"]
    return (s * bm * bk + (2 * s - 1) * bm * bn) * elt + _SMEM_SLACK


@triton.jit
def _find_tile(offsets_ptr, E, M, pid, BM: tl.constexpr):
    """(expert, first row, end row) of the pid-th tile of BM rows: the experts' tiles in order,
    then those of the rows offsets[E]:M (expert E: dropped slots, stored as zeros); expert -1 past
    the last tile. Expert e's rows run from the previous end to offsets[e+1] clamped into
    [previous end, M].

    Experts are taken CH at a time as vectors (issue 23: many small experts): a chunk loads its
    experts' ends offsets[e+1] and starts offsets[e], clamps them into [0, M] and makes them
    non-decreasing with a running max (carried from chunk to chunk), counts each expert's tiles and
    their prefix sum, and picks the one lane whose tile range holds pid. The running max and the
    prefix sum are CH x CH masked reductions (not scans: the interpreter runs those element by
    element). ceil((E+1)/CH) steps of vector work per program instead of E+1 dependent scalar
    loads (E = 128: 5 steps, not 129)."""
    CH: tl.constexpr = 32
    zero = tl.load(offsets_ptr) * 0
    e_sel = zero - 1
    row0 = zero
    row_end = zero
    acc = zero  # tiles of the experts before this chunk
    s = zero  # end of the previous chunk's last expert
    lane = tl.arange(0, CH)
    upto = lane[None, :] <= lane[:, None]  # [i, j]: j <= i
    for c0 in range(0, E + 1, CH):
        es = c0 + lane
        a = tl.load(offsets_ptr + tl.minimum(es + 1, E), mask=es < E, other=0)
        a = tl.where(es < E, tl.minimum(tl.maximum(a, 0), M), M)
        b = tl.load(offsets_ptr + tl.minimum(es, E), mask=(es > 0) & (es <= E), other=0)
        b = tl.where(es <= E, tl.minimum(tl.maximum(b, 0), M), M)
        t = tl.maximum(tl.max(tl.where(upto, a[None, :], 0), 1), s)  # ends, non-decreasing
        st = tl.maximum(tl.max(tl.where(upto, b[None, :], 0), 1), s)  # starts: the previous end
        n_t = (t - st + BM - 1) // BM
        incl = tl.sum(tl.where(upto, n_t[None, :], 0), 1) + acc
        excl = incl - n_t
        hit = (pid >= excl) & (pid < incl)
        found = tl.sum(hit.to(tl.int32), 0) > 0
        e_sel = tl.where(found, tl.max(tl.where(hit, es, -1), 0), e_sel)
        row0 = tl.where(found, tl.sum(tl.where(hit, st + (pid - excl) * BM, 0), 0), row0)
        row_end = tl.where(found, tl.sum(tl.where(hit, t, 0), 0), row_end)
        acc += tl.sum(n_t, 0)
        s = tl.max(t, 0)
    return e_sel, row0, row_end


def row_tiles(m: int, e: int, bm: int) -> int:
    """Row tiles of a grouped launch over m rows and e experts, bm rows a tile: the most tiles any
    split of the rows can need. G = min(e + 1, m) groups (the experts and the dropped rows) can have
    rows; g groups need at most g + (m - g) // bm tiles (one for each group's first row, then full
    tiles), which grows with g. `_tile_of` computes the same number in the kernel."""
    g = min(e + 1, m)
    return g + (m - g) // bm


@triton.jit
def _grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of the pid-th program of a one-dimensional grid in grouped order: GROUP_M
    consecutive row tiles take all num_n column tiles before the next group starts, the row index
    running fastest within a group, so that programs launched together read GROUP_M row panels and
    a few column panels (each from HBM once while they run, then from L2)."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


@triton.jit
def _tile_of(pid, M, E, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid over the grouped kernels' tiles: `row_tiles(M, E, BM)` row
    tiles (the most the experts' and the dropped rows' tiles can be) by cdiv(N, BN) column tiles."""
    g = tl.minimum(E + 1, M)
    num_m = g + (M - g) // BM
    num_n = (N + BN - 1) // BN
    return _grouped_order(pid, num_m, num_n, GROUP_M)


@triton.jit
def _row_tile(
    offsets_ptr,
    idx_ptr,
    E,
    M,
    N,
    top_k,
    pid_m,
    pid_n,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """A block's tile of grouped rows x output columns (both forward kernels, and dX with its
    columns over K): expert (-1 past the last tile, E on dropped rows) and first row; rows
    (clamped to 0 where masked), their mask, slots (sort_idx of the rows with GATHER or SCATTER,
    clamped into [0, M), else the rows), A's rows (the slots' tokens with GATHER); columns, their
    mask; the expert clamped into [0, E) for addressing; whether the tile computes (an expert's
    rows: no K iterations otherwise)."""
    e_sel, row0, row_end = _find_tile(offsets_ptr, E, M, pid_m, BM)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    rows = tl.where(rmask, rows, 0)
    slot = rows
    if GATHER or SCATTER:
        slot = tl.load(idx_ptr + rows, mask=rmask, other=0)
        slot = tl.minimum(tl.maximum(slot, 0), M - 1)
    arow = rows
    if GATHER:
        arow = slot // top_k
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    e_safe = tl.minimum(tl.maximum(e_sel, 0), E - 1)
    live = (e_sel >= 0) & (e_sel < E)
    return e_sel, row0, rows, rmask, slot, arow, cols, cmask, e_safe, live


@triton.jit
def _fwd_epilogue(
    acc,
    b_ptr,
    y_ptr,
    pre_ptr,
    rows,
    slot,
    rmask,
    cols,
    cmask,
    e_safe,
    live,
    N,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    SCATTER: tl.constexpr,
    STORE_PRE: tl.constexpr,
):
    """+ bias, store the pre-activation (rounded to the output dtype; only when a backward will
    need it) and act(pre); rows go to sort_idx[r] when SCATTER. A dropped rows' tile (not `live`)
    adds no bias: it stores zeros (every activation maps 0 to 0)."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + e_safe * N + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.where(live, bias, 0.0)[None, :]
    orow = rows
    if SCATTER:
        orow = slot
    out_mask = rmask[:, None] & cmask[None, :]
    pre = acc.to(y_ptr.dtype.element_ty)
    if ACT != 0:
        if STORE_PRE:
            tl.store(pre_ptr + rows[:, None] * N + cols[None, :], pre, mask=out_mask)
        y = act_fwd(pre.to(tl.float32), ACT).to(y_ptr.dtype.element_ty)
    else:
        y = pre
    tl.store(y_ptr + orow[:, None] * N + cols[None, :], y, mask=out_mask)


@triton.jit
def _grouped_linear_kernel(
    a_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    pre_ptr,
    offsets_ptr,
    idx_ptr,
    M,
    N,
    K,
    E,
    top_k,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    STORE_PRE: tl.constexpr,
    PREC: tl.constexpr,
    GROUP_M: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), M, E, N, BM, BN, GROUP_M)
    e_sel, row0, rows, rmask, slot, arow, cols, cmask, e_safe, live = _row_tile(
        offsets_ptr, idx_ptr, E, M, N, top_k, pid_m, pid_n, GATHER, SCATTER, BM, BN
    )
    w_base = w_ptr + e_safe * N * K
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(live, K, 0)
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(a_ptr + arow[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_base + cols[None, :] * K + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    _fwd_epilogue(
        acc, b_ptr, y_ptr, pre_ptr, rows, slot, rmask, cols, cmask, e_safe, live, N, HAS_BIAS, ACT, SCATTER, STORE_PRE
    )


@triton.jit
def _load_grad(g_ptr, rw_ptr, rows, slot, rmask, ns, nmask, N, top_k, GATHER_G: tl.constexpr):
    """The gradient of rows x ns, in the operands' dtype: grad rows as they are, or
    grad_out[slot // k] * routing_weight[slot] (GATHER_G; the product rounded to the dtype)."""
    m = rmask[:, None] & nmask[None, :]
    grow = rows
    if GATHER_G:
        grow = slot // top_k
    g = tl.load(g_ptr + grow[:, None] * N + ns[None, :], mask=m, other=0.0)
    if GATHER_G:
        gf = g.to(tl.float32) * tl.load(rw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)[:, None]
        g = gf.to(g_ptr.dtype.element_ty)
    return g


@triton.jit
def _act_grad_kernel(g_ptr, pre_ptr, out_ptr, NUMEL, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """out = g * act'(pre), in float32, rounded to the dtype: the gradient before the activation,
    once per element (the dX and dW kernels then read it as it is)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * act_grad(p, ACT)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grouped_linear_dx_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    offsets_ptr,
    idx_ptr,
    rw_ptr,
    ys_ptr,
    grw_ptr,
    pre_ptr,
    M,
    N,
    K,
    E,
    top_k,
    M_BUCKET,
    s_we,
    s_wn,
    s_wk,
    GATHER_G: tl.constexpr,
    SCATTER: tl.constexpr,
    GW: tl.constexpr,
    GLU: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PREC: tl.constexpr,
    GROUP_M: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """dx[rows, ks] = sum_n g[rows, n] * w[e, n, ks] (w[e] is [N, K]): an output tile of BM rows
    by BN columns of K, reduction steps of BK over N.

    GLU (a gated activation's code, issue 23): dx is grad_h of a gated first layer whose
    pre-activation pre [M, 2K] (columns in w1's row order) is given; the epilogue applies the gated
    derivative and stores grad_pre [M, 2K] instead (grad_h rounded to the dtype first, as the
    unfused path rounds it): grad_h never reaches memory."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, E, K, BM, BN, GROUP_M)
    e_sel, _, rows, rmask, slot, _, ks, kmask, e_safe, live = _row_tile(
        offsets_ptr, idx_ptr, E, M, K, top_k, pid_m, pid_n, GATHER_G, SCATTER, BM, BN
    )
    w_base = w_ptr + e_safe.to(tl.int64) * s_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    gw = tl.zeros([BM], dtype=tl.float32)
    # a [BM] tensor, not the scalar pid_n == 0: Triton 3.9's interpreter refuses a load/store mask
    # combined with a scalar comparison (which it splats to int32 data; its masks must be bool)
    first = tl.full([BM], pid_n, tl.int32) == 0
    n_end = tl.where(live, N, 0)
    for n0 in range(0, n_end, BK):
        ns = n0 + tl.arange(0, BK)
        nmask = ns < N
        g = _load_grad(g_ptr, rw_ptr, rows, slot, rmask, ns, nmask, N, top_k, GATHER_G)
        wt = tl.load(w_base + ns[:, None] * s_wn + ks[None, :] * s_wk, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(g, wt, acc, input_precision=PREC)
        if GW:
            m = rmask[:, None] & nmask[None, :] & first[:, None]
            go = tl.load(g_ptr + (slot // top_k)[:, None] * N + ns[None, :], mask=m, other=0.0).to(tl.float32)
            ys = tl.load(ys_ptr + slot[:, None] * N + ns[None, :], mask=m, other=0.0).to(tl.float32)
            gw += tl.sum(ys * go, axis=1)
    orow = rows
    if SCATTER:
        orow = slot
    if GLU != 0:
        gcol, ucol = glu_cols(ks, K, INTERLEAVED)
        pm = rmask[:, None] & kmask[None, :]
        gh = acc.to(dx_ptr.dtype.element_ty).to(tl.float32)
        pg = tl.load(pre_ptr + rows[:, None] * (2 * K) + gcol[None, :], mask=pm, other=0.0).to(tl.float32)
        pu = tl.load(pre_ptr + rows[:, None] * (2 * K) + ucol[None, :], mask=pm, other=0.0).to(tl.float32)
        dg, du = glu_grad(gh, pg, pu, GLU)
        tl.store(dx_ptr + orow[:, None] * (2 * K) + gcol[None, :], dg.to(dx_ptr.dtype.element_ty), mask=pm)
        tl.store(dx_ptr + orow[:, None] * (2 * K) + ucol[None, :], du.to(dx_ptr.dtype.element_ty), mask=pm)
    else:
        tl.store(dx_ptr + orow[:, None] * K + ks[None, :], acc.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & kmask)
    if GW:
        tl.store(grw_ptr + slot, gw.to(grw_ptr.dtype.element_ty), mask=rmask & first)


@triton.jit
def _grouped_linear_dw_kernel(
    g_ptr,
    x_ptr,
    dw_ptr,
    db_ptr,
    offsets_ptr,
    idx_ptr,
    rw_ptr,
    M,
    N,
    K,
    E,
    top_k,
    M_BUCKET,
    s_we,
    s_wn,
    s_wk,
    HAS_BIAS: tl.constexpr,
    GATHER_X: tl.constexpr,
    GATHER_G: tl.constexpr,
    PREC: tl.constexpr,
    GROUP_M: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """dw[e, ns, ks] = sum over expert e's rows of g[r, ns]^T x[r, ks]; db[e, ns] = sum g[r, ns].
    Program order: expert-major, then GROUP_M N blocks at a time by every K block (grouped), so
    that the programs running together walk the same rows of g and x."""
    num_n = (N + BN - 1) // BN
    num_k = (K + BK - 1) // BK
    pid = tl.program_id(0)
    e = pid // (num_n * num_k)
    pid_n, pid_k = _grouped_order(pid % (num_n * num_k), num_n, num_k, GROUP_M)
    # Clamped as _find_tile clamps them (rows offsets[E]:M, dropped, reach no expert's dW).
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), 0), M)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + e + 1), start), M)
    ns = pid_n * BN + tl.arange(0, BN)
    nmask = ns < N
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < K
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    db = tl.zeros([BN], dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < end
        rows = tl.where(rmask, rows, 0)
        slot = rows
        if GATHER_X or GATHER_G:
            slot = tl.load(idx_ptr + rows, mask=rmask, other=0)
            slot = tl.minimum(tl.maximum(slot, 0), M - 1)
        g = _load_grad(g_ptr, rw_ptr, rows, slot, rmask, ns, nmask, N, top_k, GATHER_G)
        xrow = rows
        if GATHER_X:
            xrow = slot // top_k
        xt = tl.load(x_ptr + xrow[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), xt, acc, input_precision=PREC)
        if HAS_BIAS:
            db += tl.sum(g.to(tl.float32), axis=0)
    w_off = e.to(tl.int64) * s_we + ns[:, None] * s_wn + ks[None, :] * s_wk
    tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        if pid_k == 0:  # a branch, not a mask `& (pid_k == 0)` (see the dX kernel's `first`)
            tl.store(db_ptr + e * N + ns, db.to(db_ptr.dtype.element_ty), mask=nmask)


_fwd = autotuned(_grouped_linear_kernel, _configs(), _FWD_KEY, smem_fwd)
_dx = autotuned(_grouped_linear_dx_kernel, _configs(), _DX_KEY, smem_dx)


def glu_dx_configs() -> list:
    """The autotune set of dX with the gated epilogue (issue 23): 64 x 64 tiles over 8 warps, 16
    float32 registers per thread per tile. The epilogue holds five such tiles (grad_h, gate, up and
    their two gradients): with 32 (4 warps) triton 3.9's ptxas spills 48-88 B at sm90 in bf16, with
    64 every config spills on 3.6 and 3.9 (tests/test_triton_compile.py, both tritons)."""
    return [triton.Config({"BM": 64, "BN": 64, "BK": bk}, num_warps=8, num_stages=3) for bk in (32, 64)]


_dx_glu = autotuned(_grouped_linear_dx_kernel, glu_dx_configs(), _DX_KEY, smem_dx)
_dw = autotuned(_grouped_linear_dw_kernel, _configs(), _DW_KEY, smem_dw)

SMEM_ESTIMATES = {"forward": smem_fwd, "dX": smem_dx, "dW": smem_dw}
"""The shared memory estimate of each autotuned GEMM kernel (the TMA forward: `smem_fwd`)."""


def smem_pruned(cfg: triton.Config, dtype: torch.dtype, limit: int) -> str | None:
    """Why the autotune prune drops `cfg` for one of the GEMM kernels in `dtype` under `limit`
    bytes of shared memory (tests skip forcing it), or None where every kernel keeps it."""
    elt, meta = dtype.itemsize, config_meta(cfg)
    for name, est in SMEM_ESTIMATES.items():
        if meta not in [config_meta(c) for c in smem_fits(_configs(), est, elt, limit)]:
            need, dt = est(meta, elt), str(dtype).removeprefix("torch.")
            return f"the {name} kernel needs an estimated {need} B of shared memory in {dt}, over the {limit} B limit"
    return None


def _bucket(m: int) -> int:
    return max(int(m), 1).bit_length()


# ------------------------------------------------------------------------------------ launchers


@on_tensor_device
def launch_grouped_linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str,
    *,
    sort_idx: torch.Tensor | None = None,
    top_k: int = 1,
    gather: bool = False,
    scatter: bool = False,
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], pre [M, N] or [0]) with M = number of grouped rows; one launch.

    gather: a is [T, K] in token order and row r reads a[sort_idx[r] // top_k].
    scatter: y's row r is stored at sort_idx[r] (slot order); pre stays in grouped order.
    save_pre: store the pre-activation (an empty pre otherwise: inference needs none).
    """
    check_dtype("x", a)
    a, weight, offsets = a.contiguous(), weight.contiguous(), offsets.contiguous()
    e, n, k = weight.shape
    m = sort_idx.numel() if gather else a.shape[0]
    act = ACTIVATION_CODES[activation]
    y = torch.empty(m, n, dtype=a.dtype, device=a.device)
    store_pre = bool(act) and save_pre
    pre = torch.empty(m, n, dtype=a.dtype, device=a.device) if store_pre else a.new_empty(0)
    if m == 0:
        return y, pre
    idx = sort_idx if sort_idx is not None else offsets
    args = (
        a,
        weight,
        weight if bias is None else bias.contiguous(),
        y,
        pre if store_pre else y,
        offsets,
        idx,
        m,
        n,
        k,
        e,
        top_k,
        _bucket(m),
        bias is not None,
        act,
        gather,
        scatter,
        store_pre,
        dot_precision(a.dtype),
        GROUP,
    )
    # one-dimensional, grouped order (_tile_of): row tiles (row_tiles: an upper bound of the
    # experts' tiles and the dropped rows') by column tiles
    grid = lambda meta: (row_tiles(m, e, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    if grouped_linear_tma.tma_usable(a, weight):
        a_desc, w_desc = grouped_linear_tma.descriptors(a, weight)
        launch(grouped_linear_tma._fwd_tma, grid, (a, a_desc, w_desc) + args[2:], _FIXED)
    else:
        launch(_fwd, grid, args, _FIXED)
    return y, pre


@on_tensor_device
def launch_grouped_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    has_bias: bool,
    *,
    sort_idx: torch.Tensor | None = None,
    top_k: int = 1,
    gather_x: bool = False,
    scatter_dx: bool = False,
    routing_weights: torch.Tensor | None = None,
    y_slot: torch.Tensor | None = None,
    strided_weight: bool = False,
    glu: tuple[str, bool, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw, db or None, grad routing weights or None); two launches (dX, dW + db), after a
    third that forms grad * act'(pre) when `activation` is not "none".

    grad: [M, N] in grouped order, or with `routing_weights` [T, k] given, grad_out [T, N] of the
    weighted combine (gathered and scaled on load); `y_slot` [T*k, N] (the forward's output in
    slot order) then also gives the routing weights' gradient.
    gather_x: x is [T, K] in token order (the forward gathered it). scatter_dx: dx is written in
    slot order [T*k, K] (then summed over k by the caller).
    strided_weight: read `weight` through its strides (a gated w1 in any layout, issue 23), and
    write dw with the same strides; else weight is made contiguous first.
    glu: (activation, interleaved, pre [M, 2K]) of the gated first layer whose output x is: dx is
    then that layer's grad_pre [M, 2K], the gated derivative applied in the dX kernel's epilogue.
    """
    check_dtype("x", x)
    grad, x, offsets = grad.contiguous(), x.contiguous(), offsets.contiguous()
    if not strided_weight:
        weight = weight.contiguous()
    e, n, k = weight.shape
    m = sort_idx.numel() if sort_idx is not None else x.shape[0]
    act = ACTIVATION_CODES[activation]
    gather_g = routing_weights is not None
    gw_on = gather_g and y_slot is not None
    dx = torch.empty(m, 2 * k if glu is not None else k, dtype=x.dtype, device=x.device)
    dw = torch.empty_like(weight)
    db = torch.empty(e, n, dtype=weight.dtype, device=weight.device) if has_bias else None
    grw = torch.empty_like(routing_weights) if gw_on else None
    idx = sort_idx if sort_idx is not None else offsets
    rw = routing_weights.contiguous() if gather_g else grad
    prec = dot_precision(x.dtype)
    bucket = _bucket(m)
    if act and m:
        # The gradient before the activation, once (not once per output tile of dX and dW).
        grad = act_grad_pass(grad, pre.contiguous(), act)
    if m:
        dx_args = (
            grad,
            weight,
            dx,
            offsets,
            idx,
            rw,
            y_slot.contiguous() if gw_on else grad,
            grw if gw_on else grad,
            glu[2].contiguous() if glu is not None else grad,
            m,
            n,
            k,
            e,
            top_k,
            bucket,
            *weight.stride(),
            gather_g,
            scatter_dx,
            gw_on,
            ACTIVATION_CODES[glu[0]] if glu is not None else 0,
            glu is not None and glu[1],
            prec,
            GROUP,
        )
        dx_grid = lambda meta: (row_tiles(m, e, meta["BM"]) * triton.cdiv(k, meta["BN"]),)  # noqa: E731
        launch(_dx_glu if glu is not None else _dx, dx_grid, dx_args, _FIXED)
    dw_args = (
        grad,
        x,
        dw,
        db if has_bias else dw,
        offsets,
        idx,
        rw,
        m,
        n,
        k,
        e,
        top_k,
        bucket,
        *dw.stride(),
        has_bias,
        gather_x,
        gather_g,
        prec,
        GROUP,
    )
    launch(_dw, lambda meta: (e * triton.cdiv(n, meta["BN"]) * triton.cdiv(k, meta["BK"]),), dw_args, _FIXED)
    return dx, dw, db, grw


_ACT_BLOCK = 1024


@on_tensor_device
def act_grad_pass(grad: torch.Tensor, pre: torch.Tensor, act: int) -> torch.Tensor:
    """grad * act'(pre) (float32 math, rounded to grad's dtype): one launch over [M, N]."""
    out = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        _act_grad_kernel[(triton.cdiv(numel, _ACT_BLOCK),)](grad, pre, out, numel, act, _ACT_BLOCK)
    return out


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor, activation: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `grouped_linear` (one launch): same contract as the reference."""
    return launch_grouped_linear(x, weight, bias, offsets, activation)


def grouped_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton `grouped_linear_backward` (two launches)."""
    dx, dw, db, _ = launch_grouped_linear_backward(grad_y, x, weight, offsets, pre, activation, has_bias)
    return dx, dw, db


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
    return launch_grouped_linear(
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
    dx_slot, dw, db, _ = launch_grouped_linear_backward(
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
    y_slot, _ = launch_grouped_linear(h, weight, bias, offsets, "none", sort_idx=sort_idx.contiguous(), scatter=True)
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
    gh, gw, gb, gwts = launch_grouped_linear_backward(
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


# The Hopper TMA variant of the forward (its own file; it builds on this file's @triton.jit helpers).
from . import grouped_linear_tma  # noqa: E402
