"""cumo: CuMo's model components on top of cumo_kernels.

- `MLPMoE`: CuMo's MoE connector (drop-in: same constructor, forward and state-dict keys).
- `convert_clip_to_moe`, `collect_aux_losses`: CuMo's CLIP-MoE vision encoder made in place from a
  Hugging Face CLIP vision model (co-upcycling), and its aux losses; `from_pretrained` reloads one;
  `enable_activation_checkpointing` turns on transformers' checkpointing under either API name.
- `upcycle_mlp`: co-upcycling of a dense connector or CLIP MLP into an MoE block.
- `cumo.checkpoint.to_cumo` / `from_cumo`: state-dict conversion to and from CuMo's checkpoints.
- `aux_loss`: CuMo's 0.1 * balance + 0.01 * z per place.
- `MultiScaleVisionTower`: CuMo's S^2 (scales 1, 3) wrapper.

Nothing here chooses a backend: `backend=` is passed through to the kernels. transformers (the `hf`
extra) is imported only by the functions that need it.
"""

from . import checkpoint
from .blocks import CLIPMoEMLP, MLPMoE
from .losses import BALANCE_COEF, Z_COEF, aux_loss
from .s2 import MultiScaleVisionTower
from .upcycle import upcycle_mlp
from .vision import collect_aux_losses, convert_clip_to_moe, enable_activation_checkpointing, from_pretrained

__all__ = [
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
