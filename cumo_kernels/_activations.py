"""Elementwise activations and their derivatives, shared by every backend's reference math.

All functions compute in float32 (or float64 for float64 inputs) and return that precision;
callers round to the activation dtype where CuMo does.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu", "gelu_tanh", "silu", "relu")
"""Activations accepted by `moe_mlp`, `MoEMLP` and `grouped_linear` (which also takes "none")."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def apply(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x) in float32 (float64 for float64 x). `activation` is one of ACTIVATIONS or "none"."""
    v = _compute_dtype(x)
    if activation == "none":
        return v
    if activation == "quick_gelu":
        return v * torch.sigmoid(1.702 * v)
    if activation == "gelu":
        return 0.5 * v * (1.0 + torch.erf(v * _INV_SQRT_2))
    if activation == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
    if activation == "silu":
        return v * torch.sigmoid(v)
    if activation == "relu":
        return torch.relu(v)
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
