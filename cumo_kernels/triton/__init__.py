"""The Triton backend of cumo-kernels: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1.

Defines the backend contract (cumo_kernels.backend): the op functions of `cumo_kernels.reference`
(same signatures), `not_supported_reasons(call)`, and the fused composition's functions: routing
from x (`route_x`), the sort order without a permuted copy of x (`sort_experts`), the first GEMM
with gather-on-load (`grouped_linear_gather`), the second GEMM with the combine
(`grouped_linear_combine`), and their backward functions.
"""

from __future__ import annotations

import os

import torch

from ..backend import Call
from ._common import SUPPORTED
from .grouped_linear import (
    grouped_linear,
    grouped_linear_backward,
    grouped_linear_combine,
    grouped_linear_combine_backward,
    grouped_linear_gather,
    grouped_linear_gather_backward,
)
from .grouped_linear_glu import (
    grouped_linear_glu,
    grouped_linear_glu_backward,
    grouped_linear_glu_combine,
    grouped_linear_glu_combine_backward,
    grouped_linear_glu_gather,
    grouped_linear_glu_gather_backward,
)
from .permute import permute, permute_backward, sort_experts, unpermute, unpermute_backward
from .routing import route, route_backward, route_x, route_x_backward

COMPOSITION = "fused"
"""moe_mlp composes the fused ops (route_x, sort_experts, grouped_linear_gather,
grouped_linear_combine) for this backend."""

FEATURES: frozenset[str] = frozenset()


def refusal(device_type: str) -> str | None:
    """None when the Triton backend can run on `device_type` tensors, else the reason."""
    if device_type == "cuda":
        if torch.cuda.is_available():
            return None
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return (
            "Triton runs on CPU tensors only in its interpreter (tests): start Python with "
            "TRITON_INTERPRET=1 in the environment"
        )
    return f"Triton kernels run on cuda tensors (or cpu under TRITON_INTERPRET=1), not {device_type}"


def not_supported_reasons(call: Call) -> list[str]:
    """Every reason the Triton backend cannot run `call`: the device (see `refusal`), the dtype."""
    why = []
    device = refusal(call.device.type)
    if device is not None:
        why.append(device)
    if call.dtype is not None and call.dtype not in SUPPORTED:
        why.append(f"the Triton kernels compute float32, float16 and bfloat16, not {call.dtype}; use backend='torch'")
    return why


__all__ = [
    "COMPOSITION",
    "FEATURES",
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
    "not_supported_reasons",
    "permute",
    "permute_backward",
    "refusal",
    "route",
    "route_backward",
    "route_x",
    "route_x_backward",
    "sort_experts",
    "unpermute",
    "unpermute_backward",
]
