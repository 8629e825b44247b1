"""CuMo's CLIP-MoE vision tower as transformers classes (imports transformers; `cumo` imports this
module when transformers is installed, and registers what it defines).

- `CLIPMoEVisionConfig`: `CLIPVisionConfig` plus `cumo_moe` ({"num_experts": E, "top_k": k}), model
  type "cumo_clip_vision_model".
- `CLIPMoEVisionModel`, `CLIPMoEVisionModelWithProjection`: `CLIPVisionModel` /
  `CLIPVisionModelWithProjection` whose encoder layers are CuMo's MoE layers from construction on,
  so transformers' own `from_pretrained` (dtype, device_map, meta-device loading, sharded files,
  `state_dict=`, `ignore_mismatched_sizes`, ...) builds and fills them like any transformers model.
- `CLIPMoEConfig` (model type "cumo_clip": a `CLIPConfig` whose `vision_config` is a
  `CLIPMoEVisionConfig`), `CLIPMoEModel`, `CLIPMoEForImageClassification`: `CLIPModel` /
  `CLIPForImageClassification` whose `vision_model` is a `CLIPMoEVisionModel`.
  `cumo.convert_clip_to_moe` gives converted models of the dense classes these classes in place (`adopt`).
- The weight-conversion mapping between CuMo's per-expert checkpoint keys and the stacked
  parameters, registered with transformers for the tower classes (`register`): transformers applies it
  when loading and reverts it when saving, as it does for Mixtral's per-expert checkpoints and its
  stacked `gate_up_proj`, and applies it to a tower inside another transformers model (a CLIPModel's
  `vision_model`, a LLaVA's `vision_tower`) scoped to the tower's prefix.

Why stacked parameters with a conversion mapping, not per-expert modules: the kernels read each
block's experts stacked (`w1` [E, hidden, in], ...), with no copy per forward; state-dict keys that
name those real parameters are what transformers' loader, accelerate (`set_module_tensor_to_device`,
device_map dispatch, disk offload), DeepSpeed ZeRO-3 and FSDP2 walk; the per-expert layout is a file
format, converted where files are read and written.

Dense loaders refuse what these classes save: a `CLIPMoEVisionConfig` writes `initializer_factor` as
{"cumo": <message>, "value": f}, which a dense `CLIPVisionConfig` rejects in its validation (quoting
the message, which says to import cumo) while this class reads f back. The tower's config is written so
wherever it is: at the top level of a tower's `config.json`, or nested as the `vision_config` of a
CLIPModel's, a LLaVA's or another host's, which the host's config class turns into a dense
`CLIPVisionConfig` when it is CLIP's own (CLIPConfig, transformers 5.17 and 5.23 alike). Without it a
dense CLIP class would load such a directory with every MLP initialised at random, with only a
missing-keys report.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import (
    MergeModulelist,
    PrefixChange,
    SplitModulelist,
    WeightConverter,
    WeightRenaming,
)

from . import _keys
from ._clip_layer import CLIPMoEEncoderLayer, convert_layer
from .blocks import CLIPMoEMLP

MODEL_TYPE = "cumo_clip_vision_model"
CLIP_MODEL_TYPE = "cumo_clip"
DEFAULT_MOE = {"num_experts": 4, "top_k": 2}
_CLIP_NAMES = ("fc1", "fc2")
_CONNECTOR_NAMES = ("0", "2")

DENSE_REFUSAL = (
    "this config holds a CuMo CLIP-MoE vision tower (model type cumo_clip_vision_model); a dense CLIP class "
    "would load it with randomly initialised MLPs. `import cumo`, then load it with cumo's class: "
    "cumo.CLIPMoEVisionModel.from_pretrained(path) (cumo.CLIPMoEVisionModelWithProjection, cumo.CLIPMoEModel "
    "for a CLIPModel, cumo.CLIPMoEForImageClassification), or transformers.AutoModel.from_pretrained(path)"
)


# --- the weight-conversion mapping -------------------------------------------------------------


class StackExperts(MergeModulelist):
    """MergeModulelist (per-expert tensors -> one stacked tensor, expert e at index e along `dim`) whose
    reverse, used by `save_pretrained`, splits along `dim` only (transformers 5.17's SplitModulelist
    squeezes every size-1 dimension, which a [E, 1, in] or [E, out, 1] stack would lose)."""

    @property
    def reverse_op(self) -> SplitModulelist:
        return UnstackExperts(self.dim)


class UnstackExperts(SplitModulelist):
    """One stacked tensor -> its per-expert slices (views), named by the target pattern's `*`."""

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for source_pattern, tensors in input_dict.items():
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            pattern = target_patterns[0] if len(input_dict) == 1 else source_pattern
            out.update({pattern.replace("*", str(e)): t for e, t in enumerate(tensor.unbind(self.dim))})
        return out

    @property
    def reverse_op(self) -> MergeModulelist:
        return StackExperts(self.dim)


def _experts(names: tuple[str, str], stacked_at: str) -> list[WeightConverter]:
    """CuMo's `<...>experts.{e}.<names[i]>.<weight|bias>` <-> the stacked `<...><stacked_at>w1` etc."""
    out = []
    for stacked, (which, kind) in _keys.STACKED.items():
        out.append(
            WeightConverter(
                source_patterns=f".experts.*.{names[which]}.{kind}",
                target_patterns=f"{stacked_at}{stacked}",
                operations=[StackExperts(dim=0)],
            )
        )
    return out


def clip_conversions(*, vision_model_prefix: bool) -> list:
    """The mapping of a CLIP-MoE tower: CuMo's `encoder.layers.{L}.gate.weight` and
    `encoder.layers.{L}.experts.{i}.fc1|fc2.weight|bias` <-> `encoder.layers.{L}.mlp.gate.weight`,
    `...mlp.w1|b1|w2|b2`. With `vision_model_prefix`, a `vision_model.` prefix (CuMo's own files, the
    hub's CLIP files) is dropped on load, as transformers' own mapping for CLIPVisionModel does."""
    out: list = [PrefixChange(prefix_to_remove="vision_model")] if vision_model_prefix else []
    # the gate sits on the layer in CuMo's keys, under `mlp.` in the module; scoped to CLIP's
    # `encoder.layers.N`, so that an LLM's `layers.N.mlp.gate.weight` (Mixtral's router) is never touched
    out.append(WeightRenaming(r"(encoder\.layers\.\d+)\.gate\.weight", r"\1.mlp.gate.weight"))
    out += _experts(_CLIP_NAMES, ".mlp.")
    return out


def connector_conversions() -> list:
    """The mapping of an `MLPMoE` connector: CuMo's `<p>experts.{i}.0|2.weight|bias` <-> `<p>w1|b1|w2|b2`
    (the gate is `<p>gate.weight` in both). The stacked names are matched where they do not follow
    `mlp` (a CLIP-MoE layer's `mlp.w1` is the CLIP mapping's)."""
    return _experts(_CONNECTOR_NAMES, "(?<!mlp).")


# --- config and models ---------------------------------------------------------------------------


def _check_moe(moe: Any) -> dict[str, int]:
    if not isinstance(moe, dict) or set(moe) != {"num_experts", "top_k"}:
        raise ValueError(f"cumo_moe: expected {{'num_experts': E, 'top_k': k}}, got {moe!r}")
    e, k = moe["num_experts"], moe["top_k"]
    for name, v in (("num_experts", e), ("top_k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"cumo_moe[{name!r}]: expected a positive int, got {v!r}")
    if k > e:
        raise ValueError(f"cumo_moe: top_k={k} exceeds num_experts={e}")
    return {"num_experts": e, "top_k": k}


def _factor_from_file(value: Any) -> Any:
    """`initializer_factor` as `CLIPMoEVisionConfig.to_dict` writes it ({"cumo": DENSE_REFUSAL, "value": f}) -> f."""
    if isinstance(value, dict):
        if set(value) != {"cumo", "value"}:
            raise ValueError(f"initializer_factor: expected a float or {{'cumo': ..., 'value': float}}, got {value!r}")
        return value["value"]
    return value


@strict  # as transformers' configs are: validates this class's own field types on assignment
class CLIPMoEVisionConfig(CLIPVisionConfig):
    """`CLIPVisionConfig` of CuMo's CLIP-MoE tower: every field of CLIP's, plus `cumo_moe`
    ({"num_experts": E, "top_k": k}; default CuMo's 4 and 2).

    `to_dict` (hence `config.json`, at the top level or nested in a host's config) writes
    `initializer_factor` as {"cumo": DENSE_REFUSAL, "value": f}: this class reads f back, while a
    dense `CLIPVisionConfig` built from that dict (CLIPVisionModel's own from_pretrained, or
    CLIPConfig building its vision sub-config, transformers 5.17 and 5.23 alike) fails its
    validation quoting the message, which says to import cumo. Without it a dense CLIP class would
    load such a directory with every MLP initialised at random, with only a missing-keys report.
    initializer_factor because it matters only when weights are initialised: nothing else reads it."""

    model_type = MODEL_TYPE

    cumo_moe: dict | None = None
    initializer_factor: float | dict = 1.0

    def __post_init__(self, **kwargs: Any) -> None:
        self.initializer_factor = float(_factor_from_file(self.initializer_factor))
        super().__post_init__(**kwargs)
        self.cumo_moe = _check_moe(dict(DEFAULT_MOE) if self.cumo_moe is None else dict(self.cumo_moe))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["initializer_factor"] = {"cumo": DENSE_REFUSAL, "value": out["initializer_factor"]}
        return out


def _vision_fields(config: CLIPVisionConfig | dict) -> dict[str, Any]:
    """A vision config's settings, to build a CLIPMoEVisionConfig from (without what to_dict adds)."""
    d = config.to_dict() if isinstance(config, CLIPVisionConfig) else dict(config)
    return {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}


@strict
class CLIPMoEConfig(CLIPConfig):
    """`CLIPConfig` of a CLIP model whose vision tower is CuMo's CLIP-MoE: `vision_config` is a
    `CLIPMoEVisionConfig` (its `cumo_moe` gives E and k); the text side is CLIP's. Model type
    "cumo_clip".

    `vision_config` takes what CLIPConfig takes: None, a dict or a CLIPVisionConfig, which become a
    CLIPMoEVisionConfig (the default `cumo_moe` unless they have one). A dense `CLIPConfig` refuses
    this config's files: its vision sub-config is a CLIPMoEVisionConfig's dict (see there)."""

    model_type = CLIP_MODEL_TYPE
    if "sub_configs_defaults" in vars(CLIPConfig):  # transformers 5.23
        sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPMoEVisionConfig}
    else:  # 5.17
        sub_configs = {"text_config": CLIPTextConfig, "vision_config": CLIPMoEVisionConfig}

    def __post_init__(self, **kwargs: Any) -> None:
        vision = self.vision_config
        if vision is None:
            vision = CLIPMoEVisionConfig()
        elif not isinstance(vision, CLIPMoEVisionConfig):
            if not isinstance(vision, (CLIPVisionConfig, dict)):
                raise TypeError(f"vision_config: expected a dict or a CLIPVisionConfig, got {type(vision).__name__}")
            vision = CLIPMoEVisionConfig(**_vision_fields(vision))
        # CLIPConfig's own __post_init__ (5.17) rebuilds a vision config as a dense CLIPVisionConfig
        # from its dict, which refuses ours: it builds a default one, replaced after
        self.vision_config = None
        super().__post_init__(**kwargs)
        self.vision_config = vision


def _fill_like_one_expert(param: nn.Parameter | None, fill) -> None:
    """Initialise a stacked parameter as co-upcycling does: one draw, copied to every expert.
    Skipped when transformers marked the tensor as loaded."""
    if param is None or getattr(param, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        one = torch.empty_like(param[0])
        fill(one)
        param.copy_(one.unsqueeze(0).expand_as(param))


def init_moe_block(module: CLIPMoEMLP, config: CLIPVisionConfig, factor: float | None = None) -> None:
    """transformers-style initialisation of a CLIP-MoE block whose weights a checkpoint did not give:
    every expert the same draw from CLIP's MLP initialisation (what upcycling a freshly initialised
    CLIP gives), the gate a fresh nn.Linear initialisation (CuMo's gate is a new nn.Linear).
    `config` is the tower's; `factor` the root model's `initializer_factor` (CLIP's rule; default
    the tower config's)."""
    factor = config.initializer_factor if factor is None else factor
    fc_std = (2 * config.hidden_size) ** -0.5 * factor
    in_proj_std = config.hidden_size**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
    _fill_like_one_expert(module.w1, lambda t: init.normal_(t, std=fc_std))
    _fill_like_one_expert(module.w2, lambda t: init.normal_(t, std=in_proj_std))
    _fill_like_one_expert(module.b1, init.zeros_)
    _fill_like_one_expert(module.b2, init.zeros_)
    init.kaiming_uniform_(module.gate.weight, a=math.sqrt(5))


def _vision_config(config: Any) -> Any:
    """The tower's config in a CLIP vision config (itself) or a CLIPConfig (its vision_config)."""
    return config.vision_config if isinstance(config, CLIPConfig) else config


class _CLIPMoEMixin:
    """What the CLIP-MoE classes add to transformers' CLIP classes."""

    config_class = CLIPMoEVisionConfig
    # an MoE layer's gate and experts must stay on one device (accelerate's device_map)
    _no_split_modules = [*CLIPVisionModel._no_split_modules, "CLIPMoEEncoderLayer"]

    def post_init(self) -> None:
        # CLIP's __init__ built dense layers; they become MoE layers before any weight is
        # initialised or loaded (transformers' own init then fills them: _init_weights below)
        moe = _check_moe(getattr(_vision_config(self.config), "cumo_moe", None) or dict(DEFAULT_MOE))
        _build_moe_layers(self, moe)
        adopt(self, moe)
        super().post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CLIPMoEMLP):
            init_moe_block(module, _vision_config(self.config), self.config.initializer_factor)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' `PreTrainedModel.from_pretrained`, every argument as documented there; then,
        where a `device_map` offloaded MoE blocks to the CPU or disk, their accelerate hooks also load
        the gate's weight (`preload_gate_weights`)."""
        out = super().from_pretrained(*args, **kwargs)
        preload_gate_weights(out[0] if isinstance(out, tuple) else out)
        return out


class CLIPMoEVisionModel(_CLIPMoEMixin, CLIPVisionModel):
    """CuMo's CLIP-MoE vision tower: `CLIPVisionModel` with MoE encoder layers (`cumo.CLIPMoEMLP`:
    `config.cumo_moe` experts, top-k routing). Same forward and outputs as CLIPVisionModel; each layer
    keeps its MoE losses of the last call (`cumo.collect_aux_losses`). Loads and saves with
    transformers' own `from_pretrained` / `save_pretrained` (files hold CuMo's per-expert keys)."""

    config_class = CLIPMoEVisionConfig


class CLIPMoEVisionModelWithProjection(_CLIPMoEMixin, CLIPVisionModelWithProjection):
    """`CLIPVisionModelWithProjection` with CuMo's MoE encoder layers (see CLIPMoEVisionModel)."""

    config_class = CLIPMoEVisionConfig


class CLIPMoEModel(_CLIPMoEMixin, CLIPModel):
    """`CLIPModel` whose vision tower is CuMo's CLIP-MoE (`vision_model` is a `CLIPMoEVisionModel`;
    `config.vision_config.cumo_moe` gives E and k); the text tower and projections are CLIP's. Same
    forward and outputs as CLIPModel. Loads and saves with transformers' own `from_pretrained` /
    `save_pretrained` (files hold CuMo's per-expert keys, `vision_model.encoder.layers.{L}.experts.{i}...`:
    the tower's mapping applies where the tower sits)."""

    config_class = CLIPMoEConfig
    _no_split_modules = [*CLIPModel._no_split_modules, "CLIPMoEEncoderLayer"]


class CLIPMoEForImageClassification(_CLIPMoEMixin, CLIPForImageClassification):
    """`CLIPForImageClassification` whose vision tower is CuMo's CLIP-MoE (see CLIPMoEModel)."""

    config_class = CLIPMoEConfig
    _no_split_modules = [*CLIPForImageClassification._no_split_modules, "CLIPMoEEncoderLayer"]


_MOE_CLASSES = {
    CLIPVisionModel: CLIPMoEVisionModel,
    CLIPVisionModelWithProjection: CLIPMoEVisionModelWithProjection,
    CLIPModel: CLIPMoEModel,
    CLIPForImageClassification: CLIPMoEForImageClassification,
}
_DENSE_NAMES = {cls.__name__: moe for cls, moe in _MOE_CLASSES.items()}
_DENSE_NAMES.update({moe.__name__: moe for moe in _MOE_CLASSES.values()})


def moe_class_for(cls_or_name: type | str | None) -> type | None:
    """The CLIP-MoE class for a CLIP vision class or class name (dense or MoE), else None."""
    name = cls_or_name if isinstance(cls_or_name, str) or cls_or_name is None else cls_or_name.__name__
    return _DENSE_NAMES.get(name)


def _build_moe_layers(model: nn.Module, moe: dict[str, int]) -> None:
    from .vision import find_clip_encoder

    for layer in find_clip_encoder(model).layers:
        if not isinstance(layer, CLIPMoEEncoderLayer):
            convert_layer(layer, moe["num_experts"], moe["top_k"], None, upcycle=False)


def adopt(model: nn.Module, moe: dict[str, int]) -> bool:
    """Give `model` (a CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel or
    CLIPForImageClassification whose tower's layers are MoE) and the CLIP vision model inside it their
    CLIP-MoE classes and config classes, in place.
    False (and nothing changed) for any other model."""
    if type(model) not in _MOE_CLASSES and not isinstance(model, _CLIPMoEMixin):
        return False
    for m in model.modules():
        cls = _MOE_CLASSES.get(type(m))
        if cls is not None:
            m.__class__ = cls
        if isinstance(m, _CLIPMoEMixin):
            if type(m.config) is CLIPConfig:
                m.config.__class__ = CLIPMoEConfig
            vision = _vision_config(m.config)
            if type(vision) is CLIPVisionConfig:
                vision.__class__ = CLIPMoEVisionConfig
            vision.cumo_moe = _check_moe(dict(moe))
            # post_init stores the class's list as an instance set: a converted instance keeps the dense one
            m._no_split_modules = set(getattr(m, "_no_split_modules", None) or ()) | {"CLIPMoEEncoderLayer"}
            _register_output_recording(m)
    return True


def _register_output_recording(model: nn.Module) -> None:
    """transformers records `output_hidden_states` / `output_attentions` from a registry that
    PreTrainedModel.__init__ fills, keyed by the model's class name: an instance whose class changed
    after __init__ registers its new class here (5.17 keys the dict by the name, 5.23 by the model)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:
        return
    if type(registry).__setitem__ is dict.__setitem__:
        registry[str(type(model))] = model._can_record_outputs
    else:
        registry[model] = model._can_record_outputs


def preload_gate_weights(model: nn.Module) -> None:
    """Let accelerate's offload hooks of every MoE block in `model` load the block's gate weight too.

    An offloaded module (device_map entries "cpu" next to a GPU, or "disk") gets an accelerate hook
    that loads its own tensors before its forward and drops them after; each submodule gets its own
    hook. A MoE block reads `gate.weight` without calling `gate` (the routing kernels take the
    weight), so its hook must place submodules' tensors as well: what accelerate's
    `preload_module_classes=["CLIPMoEMLP", "MLPMoE"]` does in `dispatch_model`, which transformers'
    `from_pretrained` does not pass. Pass that yourself when you call accelerate's dispatch functions.
    """
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # without accelerate there are no hooks
        return
    from cumo_kernels.nn import MoEMLP

    for m in model.modules():
        hook = getattr(m, "_hf_hook", None) if isinstance(m, MoEMLP) else None
        for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if isinstance(h, AlignDevicesHook) and h.offload:
                h.place_submodules = True


def register() -> None:
    """Register the config and model with transformers' Auto classes, and the weight-conversion mapping
    of each model class (by class name; transformers applies it to the class and to those classes
    where they sit inside another transformers model). Idempotent."""
    AutoConfig.register(MODEL_TYPE, CLIPMoEVisionConfig, exist_ok=True)
    AutoModel.register(CLIPMoEVisionConfig, CLIPMoEVisionModel, exist_ok=True)
    AutoConfig.register(CLIP_MODEL_TYPE, CLIPMoEConfig, exist_ok=True)
    AutoModel.register(CLIPMoEConfig, CLIPMoEModel, exist_ok=True)
    AutoModelForImageClassification.register(CLIPMoEConfig, CLIPMoEForImageClassification, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(CLIPMoEConfig, CLIPMoEModel, exist_ok=True)  # CLIPModel's task
    # CLIPMoEModel has no mapping of its own: transformers applies CLIPMoEVisionModel's to its
    # `vision_model` (scoped to that prefix); a second, unscoped one would convert the keys twice
    register_checkpoint_conversion_mapping(
        "CLIPMoEVisionModel", clip_conversions(vision_model_prefix=True), overwrite=True
    )
    register_checkpoint_conversion_mapping(
        "CLIPMoEVisionModelWithProjection", clip_conversions(vision_model_prefix=False), overwrite=True
    )
