"""cumo-kernels: fused Mixture-of-Experts MLP kernels as differentiable PyTorch ops.

    y, balance_loss, z_loss = cumo_kernels.moe_mlp(x, gate_weight, w1, b1, w2, b2, top_k=2)

`import cumo_kernels` never initialises CUDA and never fails because a backend is missing.
"""

from . import nn, ops
from ._activations import ACTIVATIONS, GLU_ACTIVATIONS
from .dispatch import BACKENDS, available_backends
from .ops import aux_losses, grouped_linear, grouped_linear_glu, moe_mlp, permute, route, unpermute

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "GLU_ACTIVATIONS",
    "available_backends",
    "aux_losses",
    "grouped_linear",
    "grouped_linear_glu",
    "moe_mlp",
    "nn",
    "ops",
    "permute",
    "route",
    "unpermute",
]
