"""transformers experts backend "cumo": the experts of transformers' MoE models on cumo's ops.

    import cumo_kernels.hf  # registers "cumo" with transformers' ExpertsInterface
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="cumo")

transformers (>= 5) decorates its experts classes (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS, NemotronH, ...) with `@use_experts_implementation`, which looks up the function named by
`config._experts_implementation` in `ExpertsInterface` and calls it as
`fn(experts_module, hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k]) -> [T, H]`.
Routing stays in the model; `experts_forward` below computes the experts with the public cumo ops:
`permute` (group the slots by expert; ids >= num_experts are expert parallelism's sentinels and are
dropped), `grouped_linear` for the up (or gate+up) and the down projection, and `unpermute` (the
weighted combine back to token order). Each is a `cumo::` custom op on the backend that
`CUMO_KERNELS_BACKEND` names (else "auto"), with its own backward, fake and torch.compile support.

This module is the only place of the package that imports transformers: `import cumo_kernels`
never does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import resolve_name
from .ops import grouped_linear, permute, unpermute

NAME = "cumo"

__all__ = ["NAME", "activation_name", "experts_forward", "register"]

# Floating dtypes torch.autocast casts (float64 it leaves alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def register() -> str:
    """Register `experts_forward` as the experts implementation "cumo" with transformers'
    `ExpertsInterface` (every model loaded afterwards accepts `experts_implementation="cumo"`).
    Importing this module does it; calling it again is harmless. Returns the name, "cumo"."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, experts_forward)
    return NAME


def activation_name(act_fn: object) -> str | None:
    """The name of cumo's activation that computes exactly the function `act_fn` (a transformers
    activation module, ACT2FN[...], or a torch one), or None when cumo has no kernel for it (then
    the caller applies `act_fn` itself). Only exact types are recognised: a subclass or a module
    whose function is replaced (GELUActivation(use_gelu_python=True)) is not."""
    from transformers import activations as A

    kind = type(act_fn)
    if kind in (torch.nn.SiLU, getattr(A, "SiLUActivation", torch.nn.SiLU)):
        return "silu"
    if kind is torch.nn.ReLU:
        return "relu"
    if kind is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    if kind is getattr(A, "QuickGELUActivation", None):
        return "quick_gelu"
    if kind is getattr(A, "GELUActivation", None) and getattr(act_fn, "act", None) is F.gelu:
        return "gelu"
    if kind is getattr(A, "GELUTanh", None):
        act = getattr(act_fn, "act", None)
        if isinstance(act, functools.partial) and act.func is F.gelu and act.keywords == {"approximate": "tanh"}:
            return "gelu_tanh"
    return None


def _weight(module: torch.nn.Module, name: str) -> Tensor:
    """Expert weight `name` as [E, N, K] (nn.Linear layout per expert): a transposed view of the
    parameter for the classes that store [E, K, N] (`is_transposed`), never a copy here."""
    w = getattr(module, name)
    return w.transpose(1, 2) if getattr(module, "is_transposed", False) else w


def _bias(module: torch.nn.Module, name: str) -> Tensor | None:
    return getattr(module, name + "_bias") if getattr(module, "has_bias", False) else None


def _gated_up(
    module: torch.nn.Module, x_sorted: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, backend: str
) -> Tensor:
    """The gated first layer of the experts: [M, H] grouped rows -> [M, I], the model's
    `module._apply_gate(x W_e^T + b_e)` on each expert's rows (for the default gate
    `act_fn(gate) * up` over the concatenated halves; GPT-OSS's clamped SwiGLU over interleaved
    columns is its own `_apply_gate`). `weight` is [E, 2I, H] (a transposed view where the class
    stores [E, H, 2I]), `bias` [E, 2I] or None.

    Unfused today: the [M, 2I] pre-activations go to memory and the gate runs as the model's own
    torch code (so every gate function of every class is computed exactly as the model computes
    it). This is the one place to switch to a fused gated op: it would take `weight` through its
    strides (`module.is_concatenated` says concatenated or interleaved rows), the activation from
    `activation_name(module.act_fn)` (or GPT-OSS's `alpha`/`limit`), and keep this path for a
    gate it has no kernel for."""
    gate_up = grouped_linear(x_sorted, weight, bias, offsets, "none", backend=backend, validate=False)
    return module._apply_gate(gate_up)


def _autocast(tensors: list[Tensor | None], device_type: str) -> list[Tensor | None]:
    """Under torch.autocast, the GEMM operands in the autocast dtype, as nn.Linear takes them
    (float64 operands are left alone, as autocast leaves them)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors]
    return tensors


def experts_forward(self: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts of a transformers MoE layer on cumo's ops (registered as "cumo").

    Args:
        self: the experts module (`@use_experts_implementation`): `num_experts` (the local count
            under expert parallelism), `act_fn`, the flags `has_gate`, `has_bias`,
            `is_transposed`, `is_concatenated`, `has_post_expert_norm` (transformers >= 5.23), and
            the weights `gate_up_proj` [E, 2I, H] (gated) or `up_proj` [E, I, H], `down_proj`
            [E, H, I] ([E, H, 2I], [E, H, I], [E, I, H] where `is_transposed`), `*_bias` [E, N].
        hidden_states: [T, H] tokens (any leading shape is flattened and restored).
        top_k_index: [T, k] expert of each slot; ids >= num_experts are sentinel slots (expert
            parallelism: the expert lives on another rank) and are dropped.
        top_k_weights: [T, k] routing weights in the dtype the model gives (float32 for Mixtral
            and DeepSeek-V3, the logits' dtype for the Qwen and OLMoE routers).

    Returns:
        [T, H] in hidden_states.dtype: sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x_t).
        The combine multiplies and sums in the wider of the experts' output dtype and the routing
        weights' dtype (a float32 weight is never rounded to bfloat16), and rounds once, to
        hidden_states.dtype. Gradients reach hidden_states, top_k_weights and every parameter.
    """
    backend = resolve_name(None)
    lead = hidden_states.shape[:-1]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    ids = top_k_index.reshape(-1, top_k_index.shape[-1])
    if ids.dtype != torch.int64:
        ids = ids.long()
    weights = top_k_weights.reshape(ids.shape)
    e = self.num_experts
    gated = getattr(self, "has_gate", True)
    first = "gate_up_proj" if gated else "up_proj"
    w1, b1 = _weight(self, first), _bias(self, first)
    w2, b2 = _weight(self, "down_proj"), _bias(self, "down_proj")
    x, w1, b1, w2, b2 = _autocast([x, w1, b1, w2, b2], x.device.type)

    x_sorted, sort_idx, offsets = permute(x, ids, e, backend=backend)
    if gated:
        h = _gated_up(self, x_sorted, w1, b1, offsets, backend)
    else:
        act = activation_name(self.act_fn)
        h = grouped_linear(x_sorted, w1, b1, offsets, act or "none", backend=backend, validate=False)
        if act is None:
            h = self.act_fn(h)
    y_sorted = grouped_linear(h, w2, b2, offsets, "none", backend=backend, validate=False)
    if getattr(self, "has_post_expert_norm", False):
        y_sorted = self.post_expert_norm(y_sorted)
        # The dropped slots' rows (offsets[E]:) are zero out of grouped_linear; a norm with a shift
        # would make them nonzero, and give sentinel slots a routing-weight gradient.
        live = torch.arange(y_sorted.shape[0], device=y_sorted.device) < offsets[-1]
        y_sorted = torch.where(live.unsqueeze(1), y_sorted, 0)
    acc = torch.promote_types(y_sorted.dtype, weights.dtype)
    out = unpermute(y_sorted.to(acc), sort_idx, weights.to(acc), backend=backend, validate=False)
    return out.to(hidden_states.dtype).reshape(*lead, out.shape[-1])


register()
