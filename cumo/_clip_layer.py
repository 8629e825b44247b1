"""The CLIP-MoE encoder layer (imports transformers; `cumo.vision` imports this module lazily)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .blocks import CLIPMoEMLP
from .upcycle import activation_name, upcycle_mlp


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

    State dict: the parameters' own names (`mlp.gate.weight`, `mlp.w1`, `mlp.b1`, `mlp.w2`, `mlp.b2`),
    so that loaders that walk modules by key (transformers, accelerate) find them. `load_state_dict`
    also takes CuMo's keys, `gate.weight` and `experts.{i}.fc1.weight|bias`, `experts.{i}.fc2.weight|bias`
    directly under the layer (a load pre-hook moves them under `mlp.`, whose own hook stacks them).
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


def _layer_load_pre_hook(module: nn.Module, sd: dict[str, Any], prefix: str, *args: Any) -> None:
    for k in [k for k in sd if k.startswith((prefix + "gate.", prefix + "experts."))]:
        sd[prefix + "mlp." + k[len(prefix) :]] = sd.pop(k)


def check_layer(layer: nn.Module) -> None:
    """Raise unless `layer` is a (dense) transformers CLIPEncoderLayer."""
    if isinstance(layer, CLIPMoEEncoderLayer):
        raise ValueError("model: this CLIP encoder is already converted to MoE")
    if type(layer) is not CLIPEncoderLayer:
        raise TypeError(
            f"model: expected encoder layers of class CLIPEncoderLayer (transformers >= 5), got {type(layer).__name__}"
        )


def convert_layer(layer: nn.Module, num_experts: int, top_k: int, backend: str | None, *, upcycle: bool = True) -> None:
    """Turn a CLIPEncoderLayer into a CLIPMoEEncoderLayer in place.

    upcycle=True: co-upcycling, every expert a copy of the layer's MLP, a fresh gate.
    upcycle=False: a new MoE block of the MLP's shape, activation, device and dtype whose values
    are left to the caller (a transformers model's own weight initialisation or loading, which is
    how `CLIPMoEVisionModel` builds its layers: nothing is read from the dense MLP, so this works
    on the meta device and under DeepSpeed ZeRO-3's partitioned construction alike).
    """
    check_layer(layer)
    if upcycle:
        moe = upcycle_mlp(layer.mlp, num_experts=num_experts, top_k=top_k, backend=backend)
    else:
        mlp = layer.mlp
        hidden_act = getattr(getattr(mlp, "config", None), "hidden_act", None)
        moe = CLIPMoEMLP(
            mlp.fc1.in_features,
            mlp.fc1.out_features,
            num_experts=num_experts,
            top_k=top_k,
            activation=activation_name(getattr(mlp, "activation_fn", None), hidden_act),
            backend=backend,
            device=mlp.fc1.weight.device,
            dtype=mlp.fc1.weight.dtype,
        )
    assert isinstance(moe, CLIPMoEMLP)
    layer.mlp = moe
    layer.__class__ = CLIPMoEEncoderLayer
    layer.aux_losses = None
    layer.register_load_state_dict_pre_hook(_layer_load_pre_hook)
