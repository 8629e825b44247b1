"""Pure-PyTorch twins of every cumo op: the `torch` backend.

Each forward has the signature of its public op in `cumo_kernels.ops` (less `backend`), and each
backward the signature of its `cumo::*_backward` op. These functions are the production path on
the CPU (sorted dispatch, per-expert `mm` on host-known row counts) and a sync-free baseline on
CUDA (`grouped_mm` where it accepts the operands, else every expert over all rows with a mask).
They import neither triton nor the extension.

The twins of the fused ops (`route_x`, `sort_experts`, `grouped_linear_gather`,
`grouped_linear_combine`) are compositions of the base ones: the torch backend's `moe_mlp` keeps
its own composition; they exist for the fused custom ops' parity and opcheck tests.
"""

import torch

from ..backend import Call
from .grouped_linear import (
    expert_mlp,
    grouped_linear,
    grouped_linear_backward,
    grouped_linear_combine,
    grouped_linear_combine_backward,
    grouped_linear_gather,
    grouped_linear_gather_backward,
)
from .grouped_linear_glu import (
    expert_mlp_glu,
    grouped_linear_glu,
    grouped_linear_glu_backward,
    grouped_linear_glu_combine,
    grouped_linear_glu_combine_backward,
    grouped_linear_glu_gather,
    grouped_linear_glu_gather_backward,
)
from .permute import permute, permute_backward, sort_experts, unpermute, unpermute_backward
from .routing import aux_losses, route, route_backward, route_x, route_x_backward

COMPOSITION = "unfused"
"""moe_mlp composes route -> permute -> grouped_linear (fc1, fc2) -> unpermute for this backend."""

FEATURES = frozenset({"expert_mlp"})
"""expert_mlp: both expert layers in one op, for inference on CPU tensors."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def not_supported_reasons(call: Call) -> list[str]:
    """The torch backend runs any call of a floating dtype on any device."""
    if call.dtype is not None and call.dtype not in _DTYPES:
        return [f"the torch backend computes float32, float16, bfloat16 and float64, not {call.dtype}"]
    return []


__all__ = [
    "COMPOSITION",
    "FEATURES",
    "not_supported_reasons",
    "aux_losses",
    "expert_mlp",
    "expert_mlp_glu",
    "grouped_linear",
    "grouped_linear_backward",
    "grouped_linear_combine",
    "grouped_linear_combine_backward",
    "grouped_linear_gather",
    "grouped_linear_gather_backward",
    "grouped_linear_glu",
    "grouped_linear_glu_backward",
    "grouped_linear_glu_combine",
    "grouped_linear_glu_combine_backward",
    "grouped_linear_glu_gather",
    "grouped_linear_glu_gather_backward",
    "permute",
    "permute_backward",
    "route",
    "route_backward",
    "route_x",
    "route_x_backward",
    "sort_experts",
    "unpermute",
    "unpermute_backward",
]
