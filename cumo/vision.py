"""CuMo's CLIP-MoE vision encoder: in-place conversion of a Hugging Face CLIP vision model,
aux-loss collection, and reloading a saved converted model.

transformers is imported only when a function needs it (it is the optional `hf` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

_INSTALL = "the CLIP-MoE encoder needs transformers >= 5: pip install 'cumo-kernels[hf]'"


def _clip_layer_module():
    try:
        from . import _clip_layer
    except ImportError as exc:  # transformers missing or too old
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    return _clip_layer


def find_clip_encoder(model: nn.Module) -> nn.Module:
    """The CLIPEncoder (the module holding `.layers`) of a CLIP vision model.

    Accepts a CLIPEncoder, a CLIPVisionModel (transformers 5: `.encoder`), or a model holding the
    tower as `.vision_model` (CLIPVisionModelWithProjection, CLIPModel; transformers 4's
    CLIPVisionModel and CLIPVisionTransformer have the same attributes).
    """
    seen = model
    for _ in range(3):
        if isinstance(getattr(seen, "layers", None), nn.ModuleList):
            return seen
        if isinstance(getattr(seen, "encoder", None), nn.Module):
            seen = seen.encoder
        elif isinstance(getattr(seen, "vision_model", None), nn.Module):
            seen = seen.vision_model
        else:
            break
    raise TypeError(
        f"model: expected a CLIP vision model (CLIPVisionModel, CLIPEncoder, or a model with .vision_model), "
        f"got {type(model).__name__}"
    )


def convert_clip_to_moe(
    model: nn.Module, *, num_experts: int = 4, top_k: int = 2, backend: str | None = None
) -> nn.Module:
    """Convert a Hugging Face CLIP vision model into CuMo's CLIP-MoE in place, and return it.

    Every encoder layer's MLP is co-upcycled (CUMO.md): `num_experts` experts, each an exact copy of
    that MLP (`fc1`, the config's activation, `fc2`), and a freshly initialised bias-free gate;
    tokens go to `top_k` experts with renormalised weights, so the converted model computes what
    the dense one computed (up to float rounding) until training moves the experts apart.

    Args:
        model: CLIPVisionModel, CLIPEncoder, or a model with `.vision_model` (transformers >= 5).
        num_experts, top_k: E and k (CuMo: 4, 2).
        backend: passed through to the kernels (None: $CUMO_KERNELS_BACKEND, else "auto").

    Callers see the same forward as before (same arguments, same outputs, `output_hidden_states`,
    gradient checkpointing); each layer keeps its MoE losses of the last call, which
    `collect_aux_losses(model)` averages. The layers' state-dict keys become CuMo's
    (`encoder.layers.{L}.gate.weight`, `encoder.layers.{L}.experts.{i}.fc1.weight`, ...), and
    `model.config.cumo_moe` records E and k so that `cumo.from_pretrained` can rebuild the model
    after `save_pretrained`.
    """
    clip_layer = _clip_layer_module()
    encoder = find_clip_encoder(model)
    for layer in encoder.layers:  # all or nothing: check every layer before converting any
        clip_layer.check_layer(layer)
    for layer in encoder.layers:
        clip_layer.convert_layer(layer, num_experts, top_k, backend)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.cumo_moe = {"num_experts": num_experts, "top_k": top_k}
    return model


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The CLIP-MoE encoder layers of `model`, in module order."""
    return [m for m in model.modules() if getattr(type(m), "_cumo_moe_layer", False)]


def collect_aux_losses(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(balance_loss, z_loss) of the last forward: the means over `model`'s CLIP-MoE layers.

    Differentiable (also under gradient checkpointing, reentrant or not). balance is float32, z in
    the activation dtype (CUMO.md). CuMo's tower runs every layer and counts every layer's losses,
    the last one's too. Read it after each forward: a second forward (another S^2 scale) replaces
    the values (`cumo.MultiScaleVisionTower` averages the scales for you).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model: has no CLIP-MoE layers; convert it with cumo.convert_clip_to_moe first")
    aux = [layer.aux_losses for layer in layers]
    if any(a is None for a in aux):
        raise RuntimeError("collect_aux_losses: some MoE layers have not run a forward yet")
    balance = torch.stack([a[0] for a in aux]).mean()
    z = torch.stack([a[1] for a in aux]).mean()
    return balance, z


def enable_activation_checkpointing(model: nn.Module, *, use_reentrant: bool = False, **kwargs: Any) -> nn.Module:
    """Turn on transformers' activation (gradient) checkpointing of `model`'s layers, and return it.

    transformers renamed the entry point during 5.x: 5.17 has only
    `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`; later releases (5.23, for
    one) have `activation_checkpointing_enable(activation_checkpointing_kwargs=...)` and keep the
    old name as a deprecated alias (a FutureWarning; to go in v6). This calls whichever the
    installed version has, the new one first. `use_reentrant` goes to `torch.utils.checkpoint.checkpoint`; other
    keyword arguments (`every_n_layers`, `offload` where the version has them) are passed through.
    The converted CLIP-MoE layers keep their aux losses and gradients either way.
    """
    ckpt_kwargs = {"use_reentrant": use_reentrant}
    new = getattr(model, "activation_checkpointing_enable", None)
    if callable(new):
        new(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        return model
    old = getattr(model, "gradient_checkpointing_enable", None)
    if callable(old):
        old(gradient_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        return model
    raise TypeError(
        f"model: {type(model).__name__} has neither activation_checkpointing_enable nor "
        "gradient_checkpointing_enable (expected a transformers PreTrainedModel)"
    )


def _read_weights(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd: dict[str, Tensor] = {}
    for name in files:
        sd.update(load_file(os.path.join(path, name)))
    return sd


def from_pretrained(
    path: str | os.PathLike,
    *,
    model_class: type | None = None,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
) -> nn.Module:
    """Reload a converted model written by Hugging Face `save_pretrained`, MoE included.

    `Model.from_pretrained` alone would build the dense model and drop the experts (transformers
    assigns tensors to the module tree by name; the stacked expert weights have no per-expert
    modules), so: build the model from the saved config, convert it with the saved
    `config.cumo_moe`, and load the saved tensors with `load_state_dict(strict=True)`. The file's
    keys are the model's state-dict keys, i.e. CuMo's per-expert names; a file in CuMo's own layout
    (`vision_model.` prefix, no post-layernorm) goes through `cumo.checkpoint.from_cumo` first.

    Args:
        path: the directory given to save_pretrained (local).
        model_class: the transformers class (default: the config's `architectures[0]`).
        backend: passed through to the kernels.
        dtype: cast the model to this dtype after loading (default: as built, float32).
        num_experts, top_k: E and k where the config has no `cumo_moe` (a CuMo tower saved with a
            plain CLIP config); given with one, they must agree with it.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    from .checkpoint import from_cumo

    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    moe = getattr(config, "cumo_moe", None)
    if not isinstance(moe, dict):
        if num_experts is None or top_k is None:
            raise ValueError(
                f"{path}: config has no `cumo_moe` entry (not saved from a converted model): "
                "pass num_experts= and top_k="
            )
        moe = {"num_experts": num_experts, "top_k": top_k}
    for name, given in (("num_experts", num_experts), ("top_k", top_k)):
        if given is not None and given != moe[name]:
            raise ValueError(f"{name}={given} disagrees with the saved config's cumo_moe {moe}")
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        if arch is None or not hasattr(transformers, arch):
            raise ValueError(f"{path}: config names no transformers architecture; pass model_class=")
        model_class = getattr(transformers, arch)
    model = model_class(config)
    convert_clip_to_moe(model, num_experts=moe["num_experts"], top_k=moe["top_k"], backend=backend)
    sd = _read_weights(path)
    expected = model.state_dict().keys()
    if not set(sd) <= set(expected):
        sd = from_cumo(sd)
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
