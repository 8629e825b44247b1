"""Permutation kernels: the per-expert histogram, offsets and stable sort order computed on the
device (no host sync, no atomics), row gathers, and the sums over each token's k slots that
implement the weighted combine (`unpermute`) and permute's backward.

Sort order in two launches: `_hist_kernel` counts each block's slots per expert; in
`_sort_scatter_kernel` every block reads all blocks' counts (a few dozen rows of E ints), takes
the exclusive prefix over experts (the offsets) and over earlier blocks, ranks its slots within
the block by a cumulative sum, and writes sort_idx[position] = slot. Positions are a permutation,
so the writes never collide. An id outside 0..E-1 (>= E: a dropped slot; negative: refused by the
public op where it validates) counts as expert E, so dropped slots follow every expert's rows in
slot order and offsets[E] counts the routed ones.

Indices read from memory (sort_idx, its inverse) are clamped into range before they address
anything: wrong indices give wrong rows, never an access out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_dtype, on_tensor_device, pow2

BLOCK_S = 64 if INTERPRET else 512
BLOCK_R = 16 if INTERPRET else 32
BLOCK_C = 32 if INTERPRET else 128


@triton.jit
def _expert_keys(ids_ptr, s, S, E):
    """The slots' sort keys: the expert id, E for an id outside 0..E-1 (dropped), -1 past S."""
    ids = tl.load(ids_ptr + s, mask=s < S, other=-1)
    keys = tl.where((ids >= 0) & (ids < E), ids, E)
    return tl.where(s < S, keys, -1)


@triton.jit
def _hist_kernel(ids_ptr, hist_ptr, S, E, BS: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    s = pid * BS + tl.arange(0, BS)
    ids = _expert_keys(ids_ptr, s, S, E)
    cols = tl.arange(0, BE)
    cnt = tl.sum((ids[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + pid * BE + cols, cnt)


@triton.jit
def _sort_scatter_kernel(ids_ptr, hist_ptr, sort_ptr, offsets_ptr, S, E, NBLK, BS: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BE)
    total = tl.zeros([BE], dtype=tl.int32)
    before = tl.zeros([BE], dtype=tl.int32)
    for blk in range(NBLK):
        h = tl.load(hist_ptr + blk * BE + cols)
        total += h
        before += tl.where(blk < pid, h, 0)
    incl = tl.cumsum(total, axis=0)
    base = incl - total + before
    s = pid * BS + tl.arange(0, BS)
    smask = s < S
    ids = _expert_keys(ids_ptr, s, S, E)
    oh = (ids[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.cumsum(oh, axis=0) - oh
    pos = tl.sum(oh * (base[None, :] + rank), axis=1)
    tl.store(sort_ptr + pos, s.to(tl.int64), mask=smask)
    # Block 0 writes the offsets. A branch, not a mask `& (pid == 0)`: Triton 3.9's interpreter
    # refuses that mask (the scalar comparison splats to int32 data, and its store takes only bool).
    if pid == 0:
        tl.store(offsets_ptr + 1 + cols, incl.to(tl.int64), mask=cols < E)
        tl.store(offsets_ptr + cols, tl.zeros([BE], dtype=tl.int64), mask=cols == 0)


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, dst_ptr, M, H, top_k, BR: tl.constexpr, BC: tl.constexpr):
    """dst[i] = src[idx[i] // top_k]."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < M
    src_rows = tl.minimum(tl.maximum(tl.load(idx_ptr + rows, mask=rmask, other=0), 0), M - 1) // top_k
    for c0 in range(0, H, BC):
        cs = c0 + tl.arange(0, BC)
        m = rmask[:, None] & (cs < H)[None, :]
        v = tl.load(src_ptr + src_rows[:, None] * H + cs[None, :], mask=m, other=0.0)
        tl.store(dst_ptr + rows[:, None].to(tl.int64) * H + cs[None, :], v, mask=m)


@triton.jit
def _invert_kernel(idx_ptr, inv_ptr, M, BR: tl.constexpr):
    """inv[idx[i]] = i (entries idx[i] outside [0, M) are skipped)."""
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    m = i < M
    s = tl.load(idx_ptr + i, mask=m, other=0)
    tl.store(inv_ptr + s, i.to(tl.int64), mask=m & (s >= 0) & (s < M))


@triton.jit
def _slot_sum_kernel(
    src_ptr,
    inv_ptr,
    w_ptr,
    out_ptr,
    T,
    H,
    top_k,
    INDIRECT: tl.constexpr,
    HAS_W: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * src[row of slot t*k+j] (float32 accumulation). The row is
    inv[t*k+j] when INDIRECT (src in grouped order), else t*k+j (src in slot order)."""
    toks = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    tmask = toks < T
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    m = tmask[:, None] & (cs < H)[None, :]
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for j in range(top_k):
        slot = toks * top_k + j
        row = slot
        if INDIRECT:
            row = tl.load(inv_ptr + slot, mask=tmask, other=0)
            row = tl.minimum(tl.maximum(row, 0), T * top_k - 1)
        v = tl.load(src_ptr + row[:, None] * H + cs[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + slot, mask=tmask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + toks[:, None] * H + cs[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpermute_bwd_kernel(
    g_ptr, ys_ptr, idx_ptr, w_ptr, gys_ptr, gw_ptr, M, H, top_k, BR: tl.constexpr, BC: tl.constexpr
):
    """Per grouped row i with slot s = idx[i]: grad_y[i] = g[s // k] * w[s] and
    grad_w[s] = <y_sorted[i], g[s // k]>; no inverse permutation needed."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    rmask = rows < M
    slot = tl.minimum(tl.maximum(tl.load(idx_ptr + rows, mask=rmask, other=0), 0), M - 1)
    tok = slot // top_k
    w = tl.load(w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
    dot = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, H, BC):
        cs = c0 + tl.arange(0, BC)
        m = rmask[:, None] & (cs < H)[None, :]
        g = tl.load(g_ptr + tok[:, None] * H + cs[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(ys_ptr + rows[:, None] * H + cs[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(gys_ptr + rows[:, None] * H + cs[None, :], (g * w[:, None]).to(gys_ptr.dtype.element_ty), mask=m)
        dot += tl.sum(y * g, axis=1)
    tl.store(gw_ptr + slot, dot.to(gw_ptr.dtype.element_ty), mask=rmask)


# ------------------------------------------------------------------------------------ launchers


@on_tensor_device
def sort_experts(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sort_idx [T*k] int64, offsets [E+1] int64), stable, on the device: two launches. Ids
    outside 0..E-1 are dropped slots: last in sort_idx, not counted in offsets."""
    flat = expert_ids.contiguous().view(-1)
    s = flat.numel()
    dev = flat.device
    sort_idx = torch.empty(s, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    if s == 0:
        return sort_idx, offsets.zero_()
    be = pow2(num_experts + 1, 2)  # one column more: the dropped slots'
    nblk = triton.cdiv(s, BLOCK_S)
    hist = torch.empty(nblk, be, dtype=torch.int32, device=dev)
    _hist_kernel[(nblk,)](flat, hist, s, num_experts, BS=BLOCK_S, BE=be)
    _sort_scatter_kernel[(nblk,)](flat, hist, sort_idx, offsets, s, num_experts, nblk, BS=BLOCK_S, BE=be)
    return sort_idx, offsets


@on_tensor_device
def gather_rows(src: torch.Tensor, idx: torch.Tensor, top_k: int) -> torch.Tensor:
    m, h = idx.numel(), src.shape[1]
    out = torch.empty(m, h, dtype=src.dtype, device=src.device)
    if m and h:
        _gather_rows_kernel[(triton.cdiv(m, BLOCK_R),)](src, idx, out, m, h, top_k, BR=BLOCK_R, BC=BLOCK_C)
    return out


@on_tensor_device
def invert(idx: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(idx)
    if idx.numel():
        _invert_kernel[(triton.cdiv(idx.numel(), BLOCK_S),)](idx, inv, idx.numel(), BR=BLOCK_S)
    return inv


@on_tensor_device
def slot_sum(
    src: torch.Tensor, t: int, top_k: int, *, inv: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    h = src.shape[1]
    out = torch.empty(t, h, dtype=src.dtype, device=src.device)
    if t and h:
        grid = (triton.cdiv(t, BLOCK_R), triton.cdiv(h, BLOCK_C))
        _slot_sum_kernel[grid](
            src,
            src if inv is None else inv,
            src if weights is None else weights,
            out,
            t,
            h,
            top_k,
            INDIRECT=inv is not None,
            HAS_W=weights is not None,
            BR=BLOCK_R,
            BC=BLOCK_C,
        )
    return out


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `permute` (three launches): histogram, sort scatter, row gather."""
    check_dtype("x", x)
    x = x.contiguous()
    sort_idx, offsets = sort_experts(expert_ids, num_experts)
    return gather_rows(x, sort_idx, expert_ids.shape[1]), sort_idx, offsets


def permute_backward(grad_sorted: torch.Tensor, sort_idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """Triton `permute_backward` (two launches): invert the order, sum each token's k rows."""
    check_dtype("grad_sorted", grad_sorted)
    return slot_sum(grad_sorted.contiguous(), sort_idx.numel() // top_k, top_k, inv=invert(sort_idx))


def unpermute(y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Triton `unpermute` (two launches): invert the order, weighted sum of each token's k rows."""
    check_dtype("y_sorted", y_sorted)
    t, k = weights.shape
    return slot_sum(y_sorted.contiguous(), t, k, inv=invert(sort_idx), weights=weights.contiguous())


@on_tensor_device
def unpermute_backward(
    grad_out: torch.Tensor, y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `unpermute_backward` (one launch): (grad_y_sorted, grad_weights)."""
    check_dtype("y_sorted", y_sorted)
    y_sorted = y_sorted.contiguous()
    m, h = y_sorted.shape
    gys = torch.empty_like(y_sorted)
    gw = torch.empty_like(weights)
    if m:
        _unpermute_bwd_kernel[(triton.cdiv(m, BLOCK_R),)](
            grad_out.contiguous(),
            y_sorted,
            sort_idx.contiguous(),
            weights.contiguous(),
            gys,
            gw,
            m,
            h,
            weights.shape[1],
            BR=BLOCK_R,
            BC=BLOCK_C,
        )
    return gys, gw
