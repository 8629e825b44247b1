"""Elementwise activations and their derivatives, shared by every backend's reference math.

Both compute in float32 (float64 for float64 inputs). `apply` returns the input's dtype, rounded
once; `derivative` returns the compute precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu", "gelu_tanh", "silu", "relu", "relu2")
"""Activations accepted by `moe_mlp`, `MoEMLP` and `grouped_linear` (which also takes "none").
"relu2" is relu(x)^2 (NemotronH's experts)."""

GLU_ONLY: tuple[str, ...] = ("gpt_oss_swiglu",)
"""Gated-only activations (`glu=True`): functions of both halves, not of the gate alone.
"gpt_oss_swiglu" is GPT-OSS's clamped SwiGLU: with g = min(gate, 7) and u = clamp(up, -7, 7),
h = g * sigmoid(1.702 g) * (u + 1)."""

GLU_ACTIVATIONS: tuple[str, ...] = ACTIVATIONS + GLU_ONLY
"""Activations of the gate accepted with `glu=True`: every one of ACTIVATIONS (h = act(gate) * up;
"silu" is SwiGLU, "gelu" / "gelu_tanh" GeGLU, "relu" ReGLU) and the GLU_ONLY ones."""

ACTIVATION_CODES: dict[str, int] = {
    "none": 0,
    "quick_gelu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "silu": 4,
    "relu": 5,
    "relu2": 6,
    "gpt_oss_swiglu": 7,
}
"""The one numbering of the activations, as the kernels take them (Triton constexprs). The CUDA
extension computes the first six and exports their codes from its enum (`_cuda.ACTIVATION_CODES`,
csrc/cumo_hd.h `Act`), which cumo_kernels/cuda.py reads; tests/test_cuda_ext.py checks that they
are these."""

GLU_LIMIT = 7.0
GLU_ALPHA = 1.702

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
    if activation == "relu2":
        v = _compute_dtype(x)
        return F.relu(v).square().to(x.dtype)
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
    if activation == "relu2":
        return 2.0 * F.relu(v)
    raise ValueError(f"activation: unknown {activation!r}; accepted: {', '.join(ACTIVATIONS)}")


# ----------------------------------------------------------------------------- gated (glu=True)


def glu_halves(pre: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views [..., H] of a gated pre-activation [..., 2H] whose columns follow w1's rows:
    gate then up (concatenated), or alternating gate, up (interleaved)."""
    if interleaved:
        return pre[..., 0::2], pre[..., 1::2]
    h = pre.shape[-1] // 2
    return pre[..., :h], pre[..., h:]


def glu_apply(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """h = a(gate) * b(up) in gate's dtype, computed in float32 (float64 for float64) and rounded
    once: a = the activation and b = identity, or GPT-OSS's clamped pair for "gpt_oss_swiglu"."""
    g, u = _compute_dtype(gate), _compute_dtype(up)
    if activation == "gpt_oss_swiglu":
        g = g.clamp(max=GLU_LIMIT)
        return (g * torch.sigmoid(GLU_ALPHA * g) * (u.clamp(-GLU_LIMIT, GLU_LIMIT) + 1.0)).to(gate.dtype)
    return (apply(g, activation) * u).to(gate.dtype)


def glu_derivative(
    grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up) in float32 (float64 for float64) of h = a(gate) * b(up): grad_h * b(up) *
    a'(gate) and grad_h * a(gate) * b'(up). The clamps of "gpt_oss_swiglu" pass the gradient inside
    their closed bounds and none outside (torch.clamp's gradient)."""
    gh, g, u = _compute_dtype(grad_h), _compute_dtype(gate), _compute_dtype(up)
    if activation == "gpt_oss_swiglu":
        gc = g.clamp(max=GLU_LIMIT)
        s = torch.sigmoid(GLU_ALPHA * gc)
        a = gc * s
        da = torch.where(g <= GLU_LIMIT, s + GLU_ALPHA * gc * s * (1.0 - s), 0.0)
        inside = (u >= -GLU_LIMIT) & (u <= GLU_LIMIT)
        b = u.clamp(-GLU_LIMIT, GLU_LIMIT) + 1.0
        return gh * b * da, torch.where(inside, gh * a, 0.0)
    return gh * u * derivative(g, activation), gh * apply(g, activation)
