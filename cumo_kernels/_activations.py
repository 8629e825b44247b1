"""Elementwise activations and their derivatives, shared by every backend's reference math.

Both compute in float32 (float64 for float64 inputs). `apply` returns the input's dtype, rounded
once; `derivative` returns the compute precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu", "gelu_tanh", "silu", "relu")
"""Activations accepted by `moe_mlp`, `MoEMLP` and `grouped_linear` (which also takes "none")."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def apply(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x) in x's dtype, computed in float32 (float64 for float64 x) and rounded once.

    `activation` is one of ACTIVATIONS or "none". torch's own gelu/silu/relu kernels compute
    low-precision inputs in float32 internally, in one pass; quick_gelu, which has no torch
    kernel, is computed on a float32 copy.
    """
    if activation == "none":
        return x
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    if activation == "relu":
        return F.relu(x)
    if activation == "quick_gelu":
        v = _compute_dtype(x)
        return (v * torch.sigmoid(1.702 * v)).to(x.dtype)
    raise ValueError(f"activation: unknown {activation!r}; accepted: {', '.join(ACTIVATIONS)}")


def derivative(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx in float32 (float64 for float64 x)."""
    v = _compute_dtype(x)
    if activation == "none":
        return torch.ones_like(v)
    if activation == "quick_gelu":
        s = torch.sigmoid(1.702 * v)
        return s + 1.702 * v * s * (1.0 - s)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(v * _INV_SQRT_2)) + v * torch.exp(-0.5 * v * v) * _INV_SQRT_2PI
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)
        t = torch.tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v)
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * dinner
    if activation == "silu":
        s = torch.sigmoid(v)
        return s * (1.0 + v * (1.0 - s))
    if activation == "relu":
        return (v > 0).to(v.dtype)
    raise ValueError(f"activation: unknown {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
