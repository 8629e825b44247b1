"""cumo: CuMo's model components on top of cumo_kernels.

- `MLPMoE`: CuMo's MoE connector (drop-in: same constructor, forward and state-dict keys).
- `convert_clip_to_moe`, `collect_aux_losses`: CuMo's CLIP-MoE vision encoder made in place from a
  Hugging Face CLIP vision model (co-upcycling), and its aux losses; `from_pretrained` reloads one;
  `enable_activation_checkpointing` turns on transformers' checkpointing under either API name.
- `upcycle_mlp`: co-upcycling of a dense connector or CLIP MLP into an MoE block.
- `cumo.checkpoint.to_cumo` / `from_cumo`: state-dict conversion to and from CuMo's checkpoints.
- `aux_loss`: CuMo's 0.1 * balance + 0.01 * z per place.
- `MultiScaleVisionTower`: CuMo's S^2 (scales 1, 3) wrapper.

- `CLIPMoEVisionModel`, `CLIPMoEVisionModelWithProjection`, `CLIPMoEVisionConfig`: the CLIP-MoE tower
  as transformers classes (transformers' own `from_pretrained` / `save_pretrained`, `AutoModel`);
  `CLIPMoEModel`, `CLIPMoEForImageClassification`, `CLIPMoEConfig`: `CLIPModel` /
  `CLIPForImageClassification` with that tower.

Nothing here chooses a backend: `backend=` is passed through to the kernels. transformers (the `hf`
extra) is optional: `import cumo` works without it; where it is installed, `import cumo` imports its
CLIP classes and registers the CLIP-MoE tower and CLIP model with `AutoConfig` / `AutoModel` and its checkpoint
key mapping with transformers' loader (so that `AutoModel.from_pretrained` of a saved tower works
once cumo is imported).
"""

from . import checkpoint
from .blocks import CLIPMoEMLP, MLPMoE
from .losses import BALANCE_COEF, Z_COEF, aux_loss
from .s2 import MultiScaleVisionTower
from .upcycle import upcycle_mlp
from .vision import collect_aux_losses, convert_clip_to_moe, enable_activation_checkpointing, from_pretrained

# the transformers classes (cumo._hf), exported where transformers imports
_HF_NAMES = (
    "CLIPMoEConfig",
    "CLIPMoEForImageClassification",
    "CLIPMoEModel",
    "CLIPMoEVisionConfig",
    "CLIPMoEVisionModel",
    "CLIPMoEVisionModelWithProjection",
)

try:  # transformers (the `hf` extra) installed, and new enough for the CLIP-MoE classes
    from . import _hf as _hf_classes
except ImportError:  # not installed or too old: the classes' names below then raise the install hint
    pass
except Exception as _exc:  # installed but broken: the connector and the kernels still work
    import warnings

    warnings.warn(f"cumo: transformers failed to import ({_exc!r}); the CLIP-MoE classes are unavailable", stacklevel=2)
else:
    _hf_classes.register()
    globals().update({_name: getattr(_hf_classes, _name) for _name in _HF_NAMES})


def __getattr__(name: str):
    if name in _HF_NAMES:  # only reached when the import above failed
        from .vision import _hf_module

        return getattr(_hf_module(), name)
    raise AttributeError(f"module 'cumo' has no attribute {name!r}")


__all__ = [
    *_HF_NAMES,
    "BALANCE_COEF",
    "CLIPMoEMLP",
    "MLPMoE",
    "MultiScaleVisionTower",
    "Z_COEF",
    "aux_loss",
    "checkpoint",
    "collect_aux_losses",
    "convert_clip_to_moe",
    "enable_activation_checkpointing",
    "from_pretrained",
    "upcycle_mlp",
]
