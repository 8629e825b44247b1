"""The Hopper (sm90+) variant of the grouped linear forward kernel: the weight tile, and A's tile
when rows are not gathered, come through TMA descriptors. Off by default (CUMO_TRITON_TMA=1): no
GPU has measured it against the default kernel yet (benchmarks/NOTES.md). The launcher
`grouped_linear.launch_grouped_linear` takes it where `tma_usable` says so; it shares that file's
tile schedule and epilogue (@triton.jit helpers).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import INTERPRET, autotuned, explicit_meta
from .grouped_linear import _FIXED, _FWD_KEY, _configs, _fwd_epilogue, _row_tile, _tile_of, smem_fwd


def _tma_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' block shapes follow the config's tile."""
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["w_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _tma_configs() -> list:
    return [
        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_block_shapes)
        for c in _configs()
    ]


def tma_enabled() -> bool:
    """The Hopper TMA forward is off unless CUMO_TRITON_TMA=1 (no GPU has measured it yet)."""
    return os.environ.get("CUMO_TRITON_TMA", "0") == "1"


def tma_usable(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides, and a Hopper (sm90+) GPU."""
    if not tma_enabled():
        return False
    k = weight.shape[2]
    aligned = k * a.element_size() % 16 == 0 and a.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    if not aligned:
        return False
    return INTERPRET or (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 9)


def descriptors(a: torch.Tensor, weight: torch.Tensor) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The TMA descriptors of a [M, K] and weight viewed as [E*N, K]; block shapes: the launch's
    explicit config, else placeholders the autotune pre-hook sets."""
    e, n, k = weight.shape
    bs = explicit_meta(_FIXED) or _FIXED
    a_desc = TensorDescriptor.from_tensor(a, [bs["BM"], bs["BK"]])
    w_desc = TensorDescriptor.from_tensor(weight.view(e * n, k), [bs["BN"], bs["BK"]])
    return a_desc, w_desc


@triton.jit
def _grouped_linear_tma_kernel(
    a_ptr,
    a_desc,
    w_desc,
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
    """Hopper variant of `_grouped_linear_kernel` (off by default: CUMO_TRITON_TMA=1, waits for a GPU
    measurement): the weight tile, and A's tile when rows are not gathered, come through TMA
    descriptors (w viewed as [E*N, K], a as [M, K]). A block may read rows of the next expert or
    the next expert's weight rows: those rows / columns are masked at the store, and TMA zero-fills
    past the tensors' ends."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, E, N, BM, BN, GROUP_M)
    e_sel, row0, rows, rmask, slot, arow, cols, cmask, e_safe, live = _row_tile(
        offsets_ptr, idx_ptr, E, M, N, top_k, pid_m, pid_n, GATHER, SCATTER, BM, BN
    )
    w_row = (e_safe * N + pid_n * BN).to(tl.int32)
    a_row = row0.to(tl.int32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_end = tl.where(live, K, 0)
    for k0 in range(0, k_end, BK):
        if GATHER:
            ks = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + arow[:, None] * K + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
        else:
            a = a_desc.load([a_row, k0])
        b = w_desc.load([w_row, k0])
        acc = tl.dot(a, b.T, acc, input_precision=PREC)
    _fwd_epilogue(
        acc, b_ptr, y_ptr, pre_ptr, rows, slot, rmask, cols, cmask, e_safe, live, N, HAS_BIAS, ACT, SCATTER, STORE_PRE
    )


_fwd_tma = autotuned(_grouped_linear_tma_kernel, _tma_configs(), _FWD_KEY, smem_fwd)
