"""CuMo's MoE blocks as modules over `cumo_kernels.nn.MoEMLP`: the connector (`MLPMoE`) and the
MLP of a CLIP-MoE encoder layer (`CLIPMoEMLP`), both with CuMo's state-dict keys."""

from __future__ import annotations

import torch
from torch import Tensor

from cumo_kernels.nn import MoEMLP

from . import _keys


class MLPMoE(MoEMLP):
    """CuMo's MoE connector ("smoe_mlp"), a drop-in for CuMo's own `MLPMoE`.

    Each of the `num_experts` experts is CuMo's `nn.Sequential(nn.Linear(mm_channels, channels),
    nn.GELU(), nn.Linear(channels, channels))` (exact erf GELU); tokens go to `num_selected` of them.
    CuMo's call `MLPMoE(num_experts=..., num_selected=..., mm_channels=..., channels=...,
    num_layers=..., dropout=...)` works as it is; `num_layers` and `dropout` are stored and unused
    (as in CuMo).

    Parameters (stacked, what the kernels read; no copy per forward): `gate.weight` [E, mm_channels],
    `w1` [E, channels, mm_channels], `b1` [E, channels], `w2` [E, channels, channels], `b2` [E, channels].
    `state_dict()` / `load_state_dict()` use CuMo's keys: `gate.weight`, `experts.{i}.0.weight`,
    `experts.{i}.0.bias`, `experts.{i}.2.weight`, `experts.{i}.2.bias` (see `cumo._keys`).

    forward(x_img [B, N, mm_channels]) -> (y [B, N, channels], balance_loss (float32 scalar, statistics
    per sample b), router_z_loss (scalar in x's dtype)), CUMO.md's math exactly.
    """

    def __init__(
        self,
        num_experts: int,
        num_selected: int,
        mm_channels: int,
        channels: int,
        num_layers: int | None = None,
        dropout: bool = False,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            mm_channels,
            channels,
            channels,
            num_experts=num_experts,
            top_k=num_selected,
            activation="gelu",
            bias=True,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.num_selected, self.mm_channels, self.channels = num_selected, mm_channels, channels
        self.num_layers, self.dropout = num_layers, dropout
        _keys.register(self, ("0", "2"))

    def forward(self, x_img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return super().forward(x_img)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, num_selected={self.num_selected}, mm_channels={self.mm_channels}, "
            f"channels={self.channels}, backend={self.backend!r}"
        )


class CLIPMoEMLP(MoEMLP):
    """The MoE MLP of a CLIP-MoE encoder layer: `num_experts` copies of CLIP's MLP (`fc1`, act, `fc2`).

    Parameters as `MoEMLP` (stacked); `state_dict()` keys are CuMo's `gate.weight` and
    `experts.{i}.fc1.weight`, `.fc1.bias`, `.fc2.weight`, `.fc2.bias`. (Inside a converted encoder
    layer this module is `layer.mlp`, and the layer moves these keys up to the layer, where CuMo
    has them.) forward(x [B, N, hidden_size]) -> (y, balance_loss, z_loss).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        num_experts: int = 4,
        top_k: int = 2,
        activation: str = "quick_gelu",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            hidden_size,
            intermediate_size,
            hidden_size,
            num_experts=num_experts,
            top_k=top_k,
            activation=activation,
            bias=True,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        _keys.register(self, ("fc1", "fc2"))
