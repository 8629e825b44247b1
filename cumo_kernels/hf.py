"""transformers experts backend "cumo": the experts of transformers' MoE models on cumo's ops.

    import cumo_kernels.hf  # registers "cumo" with transformers' ExpertsInterface
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="cumo")

transformers (>= 5) decorates its experts classes (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS, NemotronH, ...) with `@use_experts_implementation`, which looks up the function named by
`config._experts_implementation` in `ExpertsInterface` and calls it as
`fn(experts_module, hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k]) -> [T, H]`.
Routing stays in the model; `experts_forward` below computes the experts with the public cumo ops:
`permute` (group the slots by expert; ids >= num_experts are expert parallelism's sentinels and are
dropped), `grouped_linear_glu` (the fused gated first layer, where cumo has the model's gate) or
`grouped_linear` (the up projection, or gate+up followed by the model's own gate), `grouped_linear`
for the down projection, and `unpermute` (the weighted combine back to token order). Each is a
`cumo::` custom op on the backend that `CUMO_KERNELS_BACKEND` names (else "auto"), with its own
backward, fake and torch.compile support.

This module is the only place of the package that imports transformers: `import cumo_kernels`
never does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._activations import GLU_ALPHA, GLU_LIMIT
from .dispatch import resolve_name
from .ops import grouped_linear, grouped_linear_glu, permute, unpermute

NAME = "cumo"

__all__ = ["NAME", "activation_name", "experts_forward", "fused_gate", "register"]

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


@functools.cache
def _gate_kind(cls: type) -> str | None:
    """How experts class `cls` gates: "default" (transformers' `_default_apply_gate`:
    `act_fn(gate) * up` over the concatenated halves), "gpt_oss" (GPT-OSS's clamped SwiGLU over
    interleaved columns), or None (a gate of the class's own, applied as the model's code)."""
    apply_gate = getattr(cls, "_apply_gate", None)
    from transformers.integrations import moe as hf_moe

    if apply_gate is not None and apply_gate is getattr(hf_moe, "_default_apply_gate", None):
        return "default"
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # a transformers without GPT-OSS
        return None
    return "gpt_oss" if apply_gate is GptOssExperts.__dict__.get("_apply_gate") else None


def fused_gate(module: torch.nn.Module) -> tuple[str, str] | None:
    """(activation, layout) of `grouped_linear_glu` that computes exactly what `module._apply_gate`
    computes, or None when cumo has no fused kernel for the module's gate (then `_gated_up` runs the
    model's own `_apply_gate` on the unfused pre-activations)."""
    if "_apply_gate" in vars(module):  # replaced on the instance: the model's own code
        return None
    kind = _gate_kind(type(module))
    if kind == "default":
        act = activation_name(module.act_fn)
        return None if act is None else (act, "concat")
    if kind == "gpt_oss" and float(module.alpha) == GLU_ALPHA and float(module.limit) == GLU_LIMIT:
        return "gpt_oss_swiglu", "interleaved"
    return None


def _gated_up(
    module: torch.nn.Module, x_sorted: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, backend: str
) -> Tensor:
    """The gated first layer of the experts: [M, H] grouped rows -> [M, I], the model's
    `module._apply_gate(x W_e^T + b_e)` on each expert's rows. `weight` is [E, 2I, H] (a transposed
    view where the class stores [E, H, 2I]), `bias` [E, 2I] or None.

    Fused where cumo has the module's gate (`fused_gate`: transformers' default gate with an
    activation of ours, GPT-OSS's clamped SwiGLU): `grouped_linear_glu` computes the gate and up
    tiles together and writes act(gate) * up once, reading `weight` through its strides. Otherwise
    (a gate of the class's own, an activation we have no kernel for, or the cuda backend on a
    strided weight, which its extension cannot read) unfused: the [M, 2I] pre-activations go to
    memory and the model's own `_apply_gate` runs on them."""
    fused = fused_gate(module)
    if fused is not None:
        activation, layout = fused
        name = dispatch.choose(backend, x_sorted.device, x_sorted.dtype, weight.shape[0], op="grouped_linear_glu")
        if name != "cuda" or (weight.is_contiguous() and (bias is None or bias.is_contiguous())):
            return grouped_linear_glu(
                x_sorted, weight, bias, offsets, activation, layout=layout, backend=name, validate=False
            )
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
