"""CuMo's CLIP-MoE vision encoder: in-place conversion of a Hugging Face CLIP vision model,
aux-loss collection, and reloading a saved converted model.

transformers is imported only when a function needs it (it is the optional `hf` extra).
"""

from __future__ import annotations

import os
import re
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


def _hf_module():
    """cumo._hf (the transformers classes and mapping), registered with transformers."""
    try:
        from . import _hf
    except ImportError as exc:  # transformers missing or without the weight-conversion API (5.17+ tested)
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    _hf.register()
    return _hf


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
    `collect_aux_losses(model)` averages. The state-dict keys are the parameters' names
    (`encoder.layers.{L}.mlp.gate.weight`, `encoder.layers.{L}.mlp.w1`, ...); `cumo.checkpoint.to_cumo`
    gives CuMo's keys, and `load_state_dict` takes either.

    A `CLIPVisionModel` becomes a `cumo.CLIPMoEVisionModel` (a `CLIPVisionModelWithProjection` a
    `cumo.CLIPMoEVisionModelWithProjection`, a `CLIPModel` a `cumo.CLIPMoEModel`, a
    `CLIPForImageClassification` a `cumo.CLIPMoEForImageClassification`; each a subclass of the dense
    class) and its config a `cumo.CLIPMoEVisionConfig` recording E and k (`config.cumo_moe`; a
    CLIPModel's config a `cumo.CLIPMoEConfig`, its `vision_config` that). `save_pretrained` then
    writes CuMo's per-expert keys (with the `vision_model.` prefix where the model has one or was
    loaded from a file that had it), and transformers' own `from_pretrained` of that class or of
    `AutoModel` rebuilds the MoE model, while dense CLIP classes refuse the directory.

    Any other host (the tower of a CLIPModel or of a LLaVA converted by itself, a subclass of your own)
    keeps its class; the tower's config object becomes a `cumo.CLIPMoEVisionConfig`, which the
    host's config usually is too (transformers' composite models share it with their tower). Then a
    host that builds its tower with `AutoModel.from_config(config.vision_config)` (LLaVA) reloads the
    MoE tower once cumo is imported, and a host with a fixed `CLIPVisionConfig` (CLIPModel, your
    subclass) refuses its directory with a message naming cumo's class that loads it. A host holding
    a copy of the tower's config is not reached: convert the host, not its tower.
    """
    clip_layer = _clip_layer_module()
    encoder = find_clip_encoder(model)
    for layer in encoder.layers:  # all or nothing: check every layer before converting any
        clip_layer.check_layer(layer)
    hf = _hf_module() if isinstance(model, _pretrained_model_class()) else None
    for layer in encoder.layers:
        clip_layer.convert_layer(layer, num_experts, top_k, backend)
    moe = {"num_experts": num_experts, "top_k": top_k}
    if hf is not None and hf.adopt(model, moe):
        loaded = getattr(model, "_weight_conversions", None)
        if loaded is not None:  # from_pretrained's record of the file's layout, which save_pretrained reverts to
            model._weight_conversions = [*loaded, *hf.clip_conversions(vision_model_prefix=False)]
        return model
    # another host (a tower inside a CLIPModel or a LLaVA, a subclass of the user's): the tower's
    # config, which transformers' composite models share with their own config, becomes a
    # CLIPMoEVisionConfig, so that the host's config.json refuses dense loaders (or, where the host
    # builds its tower through AutoModel, rebuilds the MoE tower)
    config = getattr(encoder, "config", None)
    if config is None:
        config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        if hf is None:
            hf = _hf_module()
        if type(config) is hf.CLIPVisionConfig:
            config.__class__ = hf.CLIPMoEVisionConfig
        config.cumo_moe = moe
    return model


def _pretrained_model_class() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel


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


def from_pretrained(
    path: str | os.PathLike,
    *,
    model_class: type | None = None,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
) -> nn.Module:
    """Reload a CLIP-MoE tower from a directory, strictly: a shortcut over transformers' own loading.

    `cumo.CLIPMoEVisionModel.from_pretrained(path)` (or `AutoModel.from_pretrained(path)` after
    `import cumo`) loads what `save_pretrained` of a converted model wrote, with every argument of
    transformers' `from_pretrained`. This function calls it, and also reads directories that those
    cannot: one written by an earlier cumo (a plain CLIP config with `cumo_moe`), or a CuMo tower
    checkpoint next to a plain CLIP config (pass `num_experts=` and `top_k=`). It fails unless every
    parameter came from the file, `post_layernorm.*` excepted (CuMo's towers have none: it gets the
    identity affine, weight 1 and bias 0, as `cumo.checkpoint.from_cumo` gives it).

    Args:
        path: the directory given to save_pretrained (local or a hub id).
        model_class: CLIPVisionModel / CLIPVisionModelWithProjection or their CLIP-MoE classes
            (default: the config's `architectures[0]`, else CLIPMoEVisionModel).
        backend: passed through to the kernels.
        dtype: the parameters' dtype (default: as saved, transformers' dtype="auto").
        num_experts, top_k: E and k where the config has no `cumo_moe` (a CuMo tower saved with a
            plain CLIP config); given with one, they must agree with it.
    """
    hf = _hf_module()
    from transformers import CLIPVisionConfig, PreTrainedConfig

    path = os.fspath(path)
    raw, _ = PreTrainedConfig.get_config_dict(path)
    if raw.get("model_type") == hf.MODEL_TYPE:
        config = hf.CLIPMoEVisionConfig.from_pretrained(path)
        moe = config.cumo_moe
    else:  # a plain CLIP config, with `cumo_moe` when an earlier cumo wrote it
        dense = CLIPVisionConfig.from_pretrained(path)
        moe = getattr(dense, "cumo_moe", None)
        if not isinstance(moe, dict):
            if num_experts is None or top_k is None:
                raise ValueError(
                    f"{path}: config has no `cumo_moe` entry (not saved from a converted model): "
                    "pass num_experts= and top_k="
                )
            moe = {"num_experts": num_experts, "top_k": top_k}
        fields = {k: v for k, v in dense.to_dict().items() if k not in ("model_type", "transformers_version")}
        fields["cumo_moe"] = moe
        config = hf.CLIPMoEVisionConfig(**fields)
    for name, given in (("num_experts", num_experts), ("top_k", top_k)):
        if given is not None and given != moe[name]:
            raise ValueError(f"{name}={given} disagrees with the saved config's cumo_moe {moe}")
    arch = (raw.get("architectures") or [None])[0]
    cls = hf.moe_class_for(model_class if model_class is not None else arch)
    if cls is None:
        if model_class is not None:
            raise ValueError(
                f"model_class: expected CLIPVisionModel, CLIPVisionModelWithProjection or their CLIP-MoE "
                f"classes, got {getattr(model_class, '__name__', model_class)!r}"
            )
        cls = hf.CLIPMoEVisionModel
    model, info = cls.from_pretrained(
        path, config=config, dtype="auto" if dtype is None else dtype, output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if not re.search(r"(^|\.)post_layernorm\.", k)]
    problems = {"missing": missing, "unexpected": info["unexpected_keys"], "mismatched": info["mismatched_keys"]}
    if any(problems.values()):
        raise RuntimeError(
            f"{path}: the checkpoint does not fill {cls.__name__} exactly: "
            + "; ".join(f"{kind} keys {sorted(map(str, keys))[:6]}" for kind, keys in problems.items() if keys)
        )
    if backend is not None:
        from cumo_kernels import dispatch

        dispatch.resolve_name(backend)
        for m in model.modules():
            if isinstance(m, hf.CLIPMoEMLP):
                m.backend = backend
    return model.eval()
