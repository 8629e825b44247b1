"""Public differentiable ops of cumo-kernels, one file per op family (see `moe.py` for the table)."""

from .grouped_linear import grouped_linear
from .grouped_linear_glu import grouped_linear_glu
from .moe import moe_mlp
from .permute import permute, unpermute
from .routing import aux_losses, route

__all__ = ["aux_losses", "grouped_linear", "grouped_linear_glu", "moe_mlp", "permute", "route", "unpermute"]
