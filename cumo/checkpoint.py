"""Convert state dicts between this package's names and CuMo's checkpoint keys (CUMO.md).

This package's modules keep each MoE block's experts stacked, and their `state_dict()` names those
parameters (`...mlp.w1`, `mm_projector.w1`, ...: the names transformers' loader, accelerate, DeepSpeed
and FSDP walk); `load_state_dict()` also takes CuMo's per-expert keys (`cumo._keys`). What differs
between the two formats:

- Layout. transformers 5's `CLIPVisionModel` holds `embeddings`, `pre_layrnorm`, `encoder`,
  `post_layernorm` itself (keys without a `vision_model.` prefix); CuMo's checkpoints (transformers 4)
  nest the tower under `vision_model.`.
- `post_layernorm`. Neither of CuMo's towers has one (their features are the hidden state entering
  the last layer): `to_cumo` drops it, `from_cumo` adds a LayerNorm with the identity affine (weight 1,
  bias 0, the size and dtype of `pre_layrnorm`) where a tower has none, so that a CuMo tower loads into
  a converted `CLIPVisionModel` with `strict=True`. That is a choice, not CuMo's data: CuMo never
  applies a post-layernorm (its features, `hidden_states[-2]`, do not pass through one), while the
  `pooler_output` of such a model is the CLS state normalised (zero mean, unit variance) without an
  affine transform, not the raw CLS state.
- Stacked names. `state_dict()` and `named_parameters()` (what optimisers, DeepSpeed ZeRO and FSDP
  consolidation see) give the stacked `...mlp.w1` / `w1`; `to_cumo` unstacks them into CuMo's
  per-expert keys (views, no copy), and `from_cumo(stacked=True)` produces them.

transformers' `save_pretrained` / `from_pretrained` of `cumo.CLIPMoEVisionModel` convert between the
two by themselves (a weight-conversion mapping registered with transformers); `conversions()` gives
that mapping for other transformers models that hold CuMo's blocks.

Both functions return a new dict (tensors are shared or views, never copied unless stacked); keys
they do not know (the LLM's, a dense connector's `mm_projector.0.weight`, ...) pass through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from . import _keys

_TOWER_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_CLIP_NAMES = ("fc1", "fc2")
_CONNECTOR_NAMES = ("0", "2")


def _check_state_dict(fn: str, state_dict: object) -> None:
    if not isinstance(state_dict, Mapping):
        hint = "; pass module.state_dict()" if isinstance(state_dict, torch.nn.Module) else ""
        got = type(state_dict).__name__
        raise TypeError(f"{fn}: state_dict: expected a mapping of keys to tensors, got {got}{hint}")


def _tower_prefixes(sd: dict[str, Tensor]) -> set[str]:
    """Prefixes T under which a CLIP vision tower's parts (T + "embeddings." ...) live."""
    out = set()
    for k in sd:
        for marker in ("embeddings.class_embedding", "pre_layrnorm.weight"):
            if k.endswith(marker):
                out.add(k[: -len(marker)])
    return out


def _unstack_all(sd: dict[str, Tensor]) -> None:
    """Stacked MoE parameters (P + "w1", ...) -> CuMo's per-expert keys, in place."""
    for k in [k for k in sd if k.endswith("gate.weight")]:
        p = k[: -len("gate.weight")]
        if p + "w1" not in sd or p + "w2" not in sd:
            continue
        e = sd[p + "w1"].shape[0]
        if p.endswith("mlp."):  # a CLIP-MoE layer: gate and experts sit on the layer in CuMo's keys
            out = p[: -len("mlp.")]
            _keys.unstack(sd, p, _CLIP_NAMES, e)
            for key in [key for key in sd if key.startswith(p + "experts.")]:
                sd[out + key[len(p) :]] = sd.pop(key)
            sd[out + "gate.weight"] = sd.pop(k)
        else:
            _keys.unstack(sd, p, _CONNECTOR_NAMES, e)


def _stack_all(sd: dict[str, Tensor]) -> None:
    """CuMo's per-expert keys -> stacked parameter names (P + "mlp.w1" for CLIP, P + "w1" otherwise), in place."""
    groups: dict[tuple[str, str], set[int]] = {}
    pattern = re.compile(r"^(.*)experts\.(\d+)\.(fc1|fc2|0|2)\.(weight|bias)$")
    for k in sd:
        m = pattern.match(k)
        if m:
            groups.setdefault((m.group(1), "clip" if m.group(3) in _CLIP_NAMES else "connector"), set()).add(
                int(m.group(2))
            )
    for (p, kind), experts in groups.items():
        e = max(experts) + 1
        if kind == "clip":
            for key in [key for key in sd if key.startswith(p + "experts.")]:
                sd[p + "mlp." + key[len(p) :]] = sd.pop(key)
            if p + "gate.weight" in sd:
                sd[p + "mlp.gate.weight"] = sd.pop(p + "gate.weight")
            errors: list[str] = []
            _keys.stack(sd, p + "mlp.", _CLIP_NAMES, e, errors)
        else:
            errors = []
            _keys.stack(sd, p, _CONNECTOR_NAMES, e, errors)
        if errors:
            raise ValueError("; ".join(errors))


def to_cumo(state_dict: dict[str, Tensor], *, keep_post_layernorm: bool = False) -> dict[str, Tensor]:
    """This package's (transformers 5) state dict -> CuMo's keys.

    Works on a converted vision tower's, an MLPMoE connector's, or a whole model's dict (the tower
    is found by its `embeddings.class_embedding` / `pre_layrnorm.weight`; its parts move under
    `vision_model.` unless they are there already). Stacked MoE names are unstacked. A tower's
    `post_layernorm.*` is dropped (CuMo's towers have none) unless `keep_post_layernorm`.
    """
    _check_state_dict("to_cumo", state_dict)
    sd = dict(state_dict)
    _unstack_all(sd)
    for t in _tower_prefixes(sd):
        base = t if t.endswith("vision_model.") else t + "vision_model."
        for k in [k for k in sd if k.startswith(t) and k[len(t) :].startswith(_TOWER_PARTS)]:
            v = sd.pop(k)
            rest = k[len(t) :]
            if rest.startswith("post_layernorm.") and not keep_post_layernorm:
                continue
            sd[base + rest] = v
    return sd


def from_cumo(
    state_dict: dict[str, Tensor],
    *,
    post_layernorm: bool = True,
    strip_vision_model: bool = True,
    stacked: bool = False,
) -> dict[str, Tensor]:
    """CuMo's keys (transformers 4 layout) -> this package's (a converted transformers 5 model).

    - `T.vision_model.{embeddings|pre_layrnorm|encoder|post_layernorm}.*` -> `T.*` (the layout of a
      transformers 5 CLIPVisionModel), unless `strip_vision_model=False` (for a host that keeps the
      tower under `vision_model.`, e.g. CLIPVisionModelWithProjection).
    - `post_layernorm`: a tower without one gets a LayerNorm with weight 1, bias 0 (module docstring);
      False leaves it out (then load with strict=False; the missing keys are exactly `post_layernorm.*`).
    - `stacked=True` gives the stacked parameter names (`...mlp.w1`, `mm_projector.w1`) instead of
      CuMo's per-expert keys (both load into a converted model).
    """
    _check_state_dict("from_cumo", state_dict)
    sd = dict(state_dict)
    pattern = re.compile(r"^(.*)vision_model\.(" + "|".join(p[:-1] for p in _TOWER_PARTS) + r")\.")
    towers = set()
    for k in list(sd):
        m = pattern.match(k)
        if not m:
            continue
        t = m.group(1) if strip_vision_model else m.group(1) + "vision_model."
        towers.add(t)
        if strip_vision_model:
            sd[m.group(1) + k[len(m.group(1)) + len("vision_model.") :]] = sd.pop(k)
    if post_layernorm:
        for t in towers:
            pre_w, pre_b = sd.get(t + "pre_layrnorm.weight"), sd.get(t + "pre_layrnorm.bias")
            if pre_w is not None and t + "post_layernorm.weight" not in sd:
                sd[t + "post_layernorm.weight"] = torch.ones_like(pre_w)
                sd[t + "post_layernorm.bias"] = torch.zeros_like(pre_w if pre_b is None else pre_b)
    if stacked:
        _stack_all(sd)
    return sd


def conversions(*, vision_model_prefix: bool = False) -> list:
    """transformers' weight-conversion mapping between CuMo's per-expert keys and the stacked parameters.

    For a transformers model of your own that holds CuMo's blocks (a LLaVA-style model with a CLIP-MoE
    tower and an `MLPMoE` connector): register the mapping for its class, and its `from_pretrained`
    reads CuMo's keys (stacking the experts) while its `save_pretrained` writes them::

        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        register_checkpoint_conversion_mapping(MyModel.__name__, cumo.checkpoint.conversions())

    Covers CLIP-MoE layers (`<...>encoder.layers.{L}.gate.weight`, `<...>encoder.layers.{L}.experts.{i}.
    fc1|fc2.weight|bias` <-> `<...>.mlp.gate.weight`, `<...>.mlp.w1` ...) and connectors
    (`<p>experts.{i}.0|2.weight|bias` <-> `<p>w1` ...). `vision_model_prefix=True` also drops a leading
    `vision_model.` when loading (a tower at the model's root, as in CuMo's tower files). A
    `cumo.CLIPMoEVisionModel` has its mapping registered already, also where it sits inside another
    transformers model. Needs transformers (the `hf` extra).
    """
    try:
        from ._hf import clip_conversions, connector_conversions
    except ImportError as exc:
        raise ImportError(
            f"cumo.checkpoint.conversions needs transformers >= 5: pip install 'cumo-kernels[hf]' ({exc})"
        ) from exc
    return [*clip_conversions(vision_model_prefix=vision_model_prefix), *connector_conversions()]
