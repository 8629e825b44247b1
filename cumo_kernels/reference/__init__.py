"""Pure-PyTorch twins of every cumo op: the `torch` backend.

Each forward has the signature of its public op in `cumo_kernels.ops` (less `backend`), and each
backward the signature of its `cumo::*_backward` op. These functions are the production path on
the CPU (sorted dispatch, per-expert `mm` on host-known row counts) and a sync-free baseline on
CUDA (`grouped_mm` where it accepts the operands, else every expert over all rows with a mask).
They import neither triton nor the extension.
"""

from .gemm import grouped_linear, grouped_linear_backward
from .permute import permute, permute_backward, unpermute, unpermute_backward
from .routing import aux_losses, route, route_backward

__all__ = [
    "aux_losses",
    "grouped_linear",
    "grouped_linear_backward",
    "permute",
    "permute_backward",
    "route",
    "route_backward",
    "unpermute",
    "unpermute_backward",
]
