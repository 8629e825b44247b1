"""Routing kernels: softmax in float32, CuMo's rounding of the probabilities to the activation
dtype, top-k with the lower-index tie rule, renormalisation (CuMo's w / w.sum() in the activation
dtype: the sum rounded to it, then the quotient), per-sample balance statistics and z-loss sums;
from given logits (`route`) or fused with the router GEMM x @ gate^T (`route_x`), and their
backward kernels.

Per-sample statistics without atomics: the grid is (sample, chunk of tokens); each program writes
its partial sums to a [B, chunks, E] buffer that `_route_reduce_kernel` sums in chunk order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_dtype, dot_precision, on_tensor_device, pow2

BLOCK_T = 16 if INTERPRET else 64
BLOCK_IN = 32 if INTERPRET else 64
BLOCK_RED = 256 if INTERPRET else 1024


@triton.jit
def _route_tile(lf, rows, rmask, cols, cmask, w_ptr, ids_ptr, TOPK: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Route a [BT, BE] tile of float32 logits (already rounded to the activation dtype); store
    weights and ids of the valid rows; return the tile's partial statistics (prob sums [BE],
    first-choice counts [BE], sum of lse^2)."""
    lf = tl.where(cmask[None, :], lf, float("-inf"))
    m = tl.max(lf, axis=1)
    ex = tl.exp(lf - m[:, None])
    s = tl.sum(ex, axis=1)
    # IEEE-rounded divisions (div.rn): Triton's float32 `/` is div.full (up to 2 ulp), which
    # would let sel / sum(sel) differ from 1 for k = 1 and put rounding noise into the gate's
    # gradient (seen on the first GPU run), and could break float32 ties differently from torch.
    p = tl.math.div_rn(ex, s[:, None])
    lse = m + tl.log(s)
    pr = p.to(w_ptr.dtype.element_ty).to(tl.float32)
    # NaN scores rank first (as in torch's descending sort), padding columns never.
    score = tl.where(pr != pr, float("inf"), pr)
    score = tl.where(cmask[None, :], score, -1.0)
    rank = tl.full([BT, BE], -1, tl.int32)
    for j in tl.static_range(TOPK):
        avail = rank < 0
        sc = tl.where(avail, score, -2.0)
        best = tl.max(sc, axis=1)
        cand = (sc == best[:, None]) & avail
        idx = tl.min(tl.where(cand, cols[None, :], BE), axis=1)
        rank = tl.where(cols[None, :] == idx[:, None], j, rank)
        tl.store(ids_ptr + rows * TOPK + j, idx.to(tl.int64), mask=rmask)
    sel = tl.where(rank >= 0, pr, 0.0)
    # CuMo's w / w.sum() runs in the activation dtype: the sum of the selected probabilities is
    # rounded to it before the division (and the quotient at the store). For k = 1 the sum is
    # the probability itself, so the weight is exactly 1.
    ssum = tl.sum(sel, axis=1).to(w_ptr.dtype.element_ty).to(tl.float32)
    wts = tl.math.div_rn(sel, ssum[:, None])
    for j in tl.static_range(TOPK):
        wj = tl.sum(tl.where(rank == j, wts, 0.0), axis=1)
        tl.store(w_ptr + rows * TOPK + j, wj.to(w_ptr.dtype.element_ty), mask=rmask)
    valid = rmask[:, None] & cmask[None, :]
    ps = tl.sum(tl.where(valid, pr, 0.0), axis=0)
    fc = tl.sum(tl.where(valid & (rank == 0), 1.0, 0.0), axis=0)
    z = tl.sum(tl.where(rmask, lse * lse, 0.0), axis=0)
    return ps, fc, z


@triton.jit
def _store_partials(ps, fc, z, ps_part, fc_part, z_part, cols, cmask, E, NCHUNK):
    b = tl.program_id(0)
    c = tl.program_id(1)
    base = (b * NCHUNK + c) * E
    tl.store(ps_part + base + cols, ps, mask=cmask)
    tl.store(fc_part + base + cols, fc, mask=cmask)
    tl.store(z_part + b * NCHUNK + c, z)


@triton.jit
def _route_kernel(
    logits_ptr,
    w_ptr,
    ids_ptr,
    ps_part,
    fc_part,
    z_part,
    N,
    E,
    NCHUNK,
    TOPK: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    local = c * BT + tl.arange(0, BT)
    rmask = local < N
    rows = (b * N + local).to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    lg = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    ps, fc, z = _route_tile(lg.to(tl.float32), rows, rmask, cols, cmask, w_ptr, ids_ptr, TOPK, BT, BE)
    _store_partials(ps, fc, z, ps_part, fc_part, z_part, cols, cmask, E, NCHUNK)


@triton.jit
def _route_x_kernel(
    x_ptr,
    gate_ptr,
    logits_ptr,
    w_ptr,
    ids_ptr,
    ps_part,
    fc_part,
    z_part,
    N,
    E,
    D,
    NCHUNK,
    TOPK: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
):
    """The router GEMM x @ gate^T fused with the routing: x is read once."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    local = c * BT + tl.arange(0, BT)
    rmask = local < N
    rows = (b * N + local).to(tl.int64)
    cols = tl.arange(0, BE)
    cmask = cols < E
    acc = tl.zeros([BT, BE], dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = ds < D
        xt = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        gt = tl.load(gate_ptr + cols[None, :] * D + ds[:, None], mask=dmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(xt, gt, acc, input_precision=PREC)
    # CuMo's logits are in the activation dtype: round once, keep them for the backward.
    lg = acc.to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + rows[:, None] * E + cols[None, :], lg, mask=rmask[:, None] & cmask[None, :])
    ps, fc, z = _route_tile(lg.to(tl.float32), rows, rmask, cols, cmask, w_ptr, ids_ptr, TOPK, BT, BE)
    _store_partials(ps, fc, z, ps_part, fc_part, z_part, cols, cmask, E, NCHUNK)


@triton.jit
def _route_reduce_kernel(ps_part, fc_part, z_part, ps_ptr, fc_ptr, z_ptr, E, NCHUNK, BE: tl.constexpr):
    """Per-sample sums of the chunk partials, in chunk order (deterministic)."""
    b = tl.program_id(0)
    cols = tl.arange(0, BE)
    cmask = cols < E
    ps = tl.zeros([BE], dtype=tl.float32)
    fc = tl.zeros([BE], dtype=tl.float32)
    z = tl.sum(tl.zeros([BE], dtype=tl.float32), axis=0)
    for c in range(NCHUNK):
        base = (b * NCHUNK + c) * E
        ps += tl.load(ps_part + base + cols, mask=cmask, other=0.0)
        fc += tl.load(fc_part + base + cols, mask=cmask, other=0.0)
        z += tl.load(z_part + b * NCHUNK + c)
    tl.store(ps_ptr + b * E + cols, ps, mask=cmask)
    tl.store(fc_ptr + b * E + cols, fc, mask=cmask)
    tl.store(z_ptr + b, z)


@triton.jit
def _dlogits_tile(
    lg_ptr, gw_ptr, gp_ptr, gz_ptr, ids_ptr, rows, rmask, cols, cmask, E, N, TOPK: tl.constexpr, BT: tl.constexpr
):
    """d loss / d logits [BT, BE] in float32 for a tile of rows (route's backward)."""
    lf = tl.load(lg_ptr + rows[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    lf = tl.where(cmask[None, :], lf.to(tl.float32), float("-inf"))
    m = tl.max(lf, axis=1)
    ex = tl.exp(lf - m[:, None])
    s = tl.sum(ex, axis=1)
    p = tl.math.div_rn(ex, s[:, None])  # IEEE division, as in _route_tile
    lse = m + tl.log(s)
    pr = p.to(lg_ptr.dtype.element_ty).to(tl.float32)
    ssum = tl.zeros([BT], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        idj = tl.load(ids_ptr + rows * TOPK + j, mask=rmask, other=0)
        ssum += tl.sum(tl.where(cols[None, :] == idj[:, None], pr, 0.0), axis=1)
    # CuMo's autograd differentiates sel / sum at the values its graph saved: the rounded
    # probabilities and their sum rounded to the activation dtype (as the forward).
    ssum = ssum.to(lg_ptr.dtype.element_ty).to(tl.float32)
    gdot = tl.zeros([BT], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        idj = tl.load(ids_ptr + rows * TOPK + j, mask=rmask, other=0)
        gwj = tl.load(gw_ptr + rows * TOPK + j, mask=rmask, other=0.0).to(tl.float32)
        # w_j = sel_j / sum first (exactly 1 for k = 1, so that no rounding noise reaches the gate).
        gdot += gwj * tl.math.div_rn(tl.sum(tl.where(cols[None, :] == idj[:, None], pr, 0.0), axis=1), ssum)
    bidx = rows // N
    dp = tl.load(gp_ptr + bidx[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    dp = dp.to(tl.float32)
    for j in tl.static_range(TOPK):
        idj = tl.load(ids_ptr + rows * TOPK + j, mask=rmask, other=0)
        gwj = tl.load(gw_ptr + rows * TOPK + j, mask=rmask, other=0.0).to(tl.float32)
        dp += tl.where(cols[None, :] == idj[:, None], tl.math.div_rn(gwj - gdot, ssum)[:, None], 0.0)
    gz = tl.load(gz_ptr + bidx, mask=rmask, other=0.0).to(tl.float32)
    dl = p * (dp - tl.sum(dp * p, axis=1)[:, None]) + (2.0 * lse * gz)[:, None] * p
    return tl.where(rmask[:, None] & cmask[None, :], dl, 0.0)


@triton.jit
def _route_bwd_kernel(
    lg_ptr, gw_ptr, gp_ptr, gz_ptr, ids_ptr, dl_ptr, T, E, N, TOPK: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr
):
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    cols = tl.arange(0, BE)
    cmask = cols < E
    dl = _dlogits_tile(lg_ptr, gw_ptr, gp_ptr, gz_ptr, ids_ptr, rows, rmask, cols, cmask, E, N, TOPK, BT)
    tl.store(dl_ptr + rows[:, None] * E + cols[None, :], dl.to(dl_ptr.dtype.element_ty), mask=rmask[:, None] & cmask)


@triton.jit
def _route_x_bwd_kernel(
    lg_ptr,
    gw_ptr,
    gp_ptr,
    gz_ptr,
    ids_ptr,
    gate_ptr,
    dl_ptr,
    dx_ptr,
    T,
    E,
    N,
    D,
    TOPK: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
):
    """d logits (rounded to the activation dtype, as CuMo's autograd graph has it) and the
    router's share of dx = dlogits @ gate, for a tile of rows."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    cols = tl.arange(0, BE)
    cmask = cols < E
    dl = _dlogits_tile(lg_ptr, gw_ptr, gp_ptr, gz_ptr, ids_ptr, rows, rmask, cols, cmask, E, N, TOPK, BT)
    dl = dl.to(dl_ptr.dtype.element_ty)
    tl.store(dl_ptr + rows[:, None] * E + cols[None, :], dl, mask=rmask[:, None] & cmask)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = ds < D
        gt = tl.load(gate_ptr + cols[:, None] * D + ds[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        dx = tl.dot(dl, gt, input_precision=PREC)
        tl.store(dx_ptr + rows[:, None] * D + ds[None, :], dx.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & dmask)


@triton.jit
def _dgate_kernel(
    dl_ptr,
    x_ptr,
    part_ptr,
    T,
    E,
    D,
    CHUNK,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
):
    """Partial dgate [E, BD] = dlogits^T @ x over the tokens [s*CHUNK, (s+1)*CHUNK), in order,
    for column block d and token split s (grid (D-blocks, splits)): float32 partials, no atomics."""
    ds = tl.program_id(0) * BD + tl.arange(0, BD)
    dmask = ds < D
    split = tl.program_id(1)
    cols = tl.arange(0, BE)
    cmask = cols < E
    t_start = split * CHUNK
    t_end = tl.minimum(t_start + CHUNK, T)
    acc = tl.zeros([BE, BD], dtype=tl.float32)
    for t0 in range(t_start, t_end, BT):
        rows = (t0 + tl.arange(0, BT)).to(tl.int64)
        rmask = rows < t_end
        dlt = tl.load(dl_ptr + cols[:, None] + rows[None, :] * E, mask=cmask[:, None] & rmask[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(dlt, xt, acc, input_precision=PREC)
    base = split.to(tl.int64) * E * D
    tl.store(part_ptr + base + cols[:, None] * D + ds[None, :], acc, mask=cmask[:, None] & dmask)


@triton.jit
def _dgate_reduce_kernel(part_ptr, dg_ptr, NSPLIT, NUMEL, BLOCK: tl.constexpr):
    """dgate = the sum of the splits' partials, in split order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(NSPLIT):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=m, other=0.0)
    tl.store(dg_ptr + offs, acc.to(dg_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------ launchers


def _stats(logits_like: torch.Tensor, b: int, e: int, nchunk: int):
    dev = logits_like.device
    f32 = torch.float32
    parts = (
        torch.empty(b, nchunk, e, dtype=f32, device=dev),
        torch.empty(b, nchunk, e, dtype=f32, device=dev),
        torch.empty(b, nchunk, dtype=f32, device=dev),
    )
    outs = (
        torch.empty(b, e, dtype=f32, device=dev),
        torch.empty(b, e, dtype=f32, device=dev),
        torch.empty(b, dtype=f32, device=dev),
    )
    return parts, outs


@on_tensor_device
def route(
    logits: torch.Tensor, top_k: int, num_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `route`: same contract as `cumo_kernels.reference.route`. Two launches."""
    check_dtype("logits", logits)
    logits = logits.contiguous()
    t, e = logits.shape
    b = num_samples
    n = t // b
    weights = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    nchunk = max(1, triton.cdiv(n, BLOCK_T))
    parts, outs = _stats(logits, b, e, nchunk)
    if t == 0:
        for o in outs:
            o.zero_()
        return weights, ids, *outs
    be = pow2(e, 2)
    _route_kernel[(b, nchunk)](logits, weights, ids, *parts, n, e, nchunk, TOPK=top_k, BT=BLOCK_T, BE=be)
    _route_reduce_kernel[(b,)](*parts, *outs, e, nchunk, BE=be)
    return weights, ids, *outs


@on_tensor_device
def route_backward(
    grad_weights: torch.Tensor,
    grad_prob_sums: torch.Tensor,
    grad_z_sums: torch.Tensor,
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """Triton `route_backward` (one launch): d logits in logits.dtype."""
    check_dtype("logits", logits)
    t, e = logits.shape
    dl = torch.empty_like(logits)
    if t == 0:
        return dl
    n = t // grad_prob_sums.shape[0]
    k = expert_ids.shape[1]
    grid = (triton.cdiv(t, BLOCK_T),)
    _route_bwd_kernel[grid](
        logits.contiguous(),
        grad_weights.contiguous(),
        grad_prob_sums.contiguous(),
        grad_z_sums.contiguous(),
        expert_ids.contiguous(),
        dl,
        t,
        e,
        n,
        TOPK=k,
        BT=BLOCK_T,
        BE=pow2(e, 2),
    )
    return dl


@on_tensor_device
def route_x(
    x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, num_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `route_x` (two launches): the router GEMM fused with `route`; also returns the
    logits [T, E] (x.dtype) that the backward needs."""
    check_dtype("x", x)
    x, gate_weight = x.contiguous(), gate_weight.contiguous()
    t, d = x.shape
    e = gate_weight.shape[0]
    b = num_samples
    n = t // b
    logits = torch.empty(t, e, dtype=x.dtype, device=x.device)
    weights = torch.empty(t, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    nchunk = max(1, triton.cdiv(n, BLOCK_T))
    parts, outs = _stats(x, b, e, nchunk)
    if t == 0:
        for o in outs:
            o.zero_()
        return weights, ids, *outs, logits
    be = pow2(e, 16)
    _route_x_kernel[(b, nchunk)](
        x,
        gate_weight,
        logits,
        weights,
        ids,
        *parts,
        n,
        e,
        d,
        nchunk,
        TOPK=top_k,
        PREC=dot_precision(x.dtype),
        BT=BLOCK_T,
        BE=be,
        BD=BLOCK_IN,
    )
    _route_reduce_kernel[(b,)](*parts, *outs, e, nchunk, BE=be)
    return weights, ids, *outs, logits


@on_tensor_device
def route_x_backward(
    grad_weights: torch.Tensor,
    grad_prob_sums: torch.Tensor,
    grad_z_sums: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `route_x_backward` (three launches): (grad_x [T, in], grad_gate [E, in])."""
    check_dtype("x", x)
    x, gate_weight = x.contiguous(), gate_weight.contiguous()
    t, d = x.shape
    e = gate_weight.shape[0]
    dx = torch.empty_like(x)
    dg = torch.empty_like(gate_weight)
    if t == 0:
        return dx.zero_(), dg.zero_()
    dl = torch.empty(t, e, dtype=x.dtype, device=x.device)
    n = t // grad_prob_sums.shape[0]
    k = expert_ids.shape[1]
    be = pow2(e, 16)
    prec = dot_precision(x.dtype)
    _route_x_bwd_kernel[(triton.cdiv(t, BLOCK_T),)](
        logits.contiguous(),
        grad_weights.contiguous(),
        grad_prob_sums.contiguous(),
        grad_z_sums.contiguous(),
        expert_ids.contiguous(),
        gate_weight,
        dl,
        dx,
        t,
        e,
        n,
        d,
        TOPK=k,
        PREC=prec,
        BT=BLOCK_T,
        BE=be,
        BD=BLOCK_IN,
    )
    # dgate reduces over all T tokens: split them so that enough programs run (at most 32 splits
    # of >= 4 token blocks each), then sum the float32 partials in split order.
    nsplit = min(triton.cdiv(t, 4 * BLOCK_T), 32)
    chunk = triton.cdiv(triton.cdiv(t, nsplit), BLOCK_T) * BLOCK_T
    nsplit = triton.cdiv(t, chunk)
    part = torch.empty(nsplit, e, d, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(d, BLOCK_IN), nsplit)
    _dgate_kernel[grid](dl, x, part, t, e, d, chunk, PREC=prec, BT=BLOCK_T, BE=be, BD=BLOCK_IN)
    numel = e * d
    _dgate_reduce_kernel[(triton.cdiv(numel, BLOCK_RED),)](part, dg, nsplit, numel, BLOCK=BLOCK_RED)
    return dx, dg
