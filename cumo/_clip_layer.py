"""The CLIP-MoE encoder layer (imports transformers; `cumo.vision` imports this module lazily)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .blocks import CLIPMoEMLP
from .upcycle import upcycle_mlp


class CLIPMoEEncoderLayer(CLIPEncoderLayer):
    """A CLIP encoder layer whose MLP is CuMo's MoE block (`self.mlp`: a `CLIPMoEMLP`).

    Made by `convert_clip_to_moe`, which turns `CLIPEncoderLayer` objects into this class in place
    (attention and layer norms are kept as they are). Callers see CLIPEncoderLayer's contract:
    `layer(hidden_states, attention_mask, **kwargs) -> hidden_states`. The MoE losses of the call
    are kept in `self.aux_losses` (balance, z), read by `cumo.collect_aux_losses`.

    Gradient checkpointing: transformers checkpoints `forward`, which returns
    `(hidden_states, balance, z)`, so the losses are outputs of the checkpointed function and carry
    gradients under reentrant checkpointing too (a side channel written inside the checkpointed
    function would hold the no-grad values of the first pass). `__call__` records them and returns
    the hidden states only, once per call: the recomputation in the backward runs `forward`
    alone and overwrites nothing.

    State dict: CuMo's keys, `gate.weight` and `experts.{i}.fc1.weight|bias`, `experts.{i}.fc2.weight|bias`
    directly under the layer (the hooks move `mlp.`'s keys up on save and down on load).
    """

    _cumo_moe_layer = True

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        residual = hidden_states
        h = self.layer_norm1(hidden_states)
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, **kwargs)
        h = residual + h
        y, balance, z = self.mlp(self.layer_norm2(h))
        return h + y, balance, z

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        h, balance, z = super().__call__(*args, **kwargs)
        self.aux_losses = (balance, z)
        return h

    def __getstate__(self) -> dict[str, Any]:
        # The last call's losses are outputs, not module state: after a forward with grad they are
        # non-leaf tensors, which copy.deepcopy refuses (an EMA copy of a training model) and which
        # torch.save would store with the model.
        state = super().__getstate__()
        state["aux_losses"] = None
        return state


def _layer_state_dict_hook(module: nn.Module, sd: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # Only CuMo's names move up (a stacked placeholder that `_keys.unstack` left, e.g. under ZeRO-3,
    # stays under mlp., where it loads back).
    src = prefix + "mlp."
    for k in [k for k in sd if k.startswith((src + "gate.", src + "experts."))]:
        sd[prefix + k[len(src) :]] = sd.pop(k)


def _layer_load_pre_hook(module: nn.Module, sd: dict[str, Any], prefix: str, *args: Any) -> None:
    for k in [k for k in sd if k.startswith((prefix + "gate.", prefix + "experts."))]:
        sd[prefix + "mlp." + k[len(prefix) :]] = sd.pop(k)


def _layer_load_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    prefix = getattr(module.mlp, "_cumo_load_prefix", None)  # the mlp's: "<layer prefix>mlp."
    if prefix is None or not prefix.endswith("mlp."):
        return
    layer_prefix = prefix[: -len("mlp.")]
    missing = incompatible_keys.missing_keys
    missing[:] = [layer_prefix + k[len(prefix) :] if k.startswith(prefix) else k for k in missing]


def check_layer(layer: nn.Module) -> None:
    """Raise unless `layer` is a (dense) transformers CLIPEncoderLayer."""
    if isinstance(layer, CLIPMoEEncoderLayer):
        raise ValueError("model: this CLIP encoder is already converted to MoE")
    if type(layer) is not CLIPEncoderLayer:
        raise TypeError(
            f"model: expected encoder layers of class CLIPEncoderLayer (transformers >= 5), got {type(layer).__name__}"
        )


def convert_layer(layer: nn.Module, num_experts: int, top_k: int, backend: str | None) -> None:
    """Turn a CLIPEncoderLayer into a CLIPMoEEncoderLayer in place (co-upcycling its MLP)."""
    check_layer(layer)
    moe = upcycle_mlp(layer.mlp, num_experts=num_experts, top_k=top_k, backend=backend)
    assert isinstance(moe, CLIPMoEMLP)
    layer.mlp = moe
    layer.__class__ = CLIPMoEEncoderLayer
    layer.aux_losses = None
    layer.register_state_dict_post_hook(_layer_state_dict_hook)
    layer.register_load_state_dict_pre_hook(_layer_load_pre_hook)
    layer.register_load_state_dict_post_hook(_layer_load_post_hook)
