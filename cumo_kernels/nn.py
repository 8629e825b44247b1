"""`MoEMLP`: a module that owns the MoE MLP parameters and calls `cumo_kernels.moe_mlp`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import dispatch
from ._activations import ACTIVATIONS, GLU_ACTIVATIONS
from .ops import moe_mlp
from .ops.moe import glu_layout


class MoEMLP(nn.Module):
    """Sparse top-k Mixture-of-Experts MLP block, as CuMo runs it.

    Parameters: `gate.weight` [E, in] (bias-free nn.Linear), `w1` [E, hidden, in],
    `b1` [E, hidden], `w2` [E, out, hidden], `b2` [E, out] (biases only when bias=True), each
    expert initialised as nn.Linear initialises its own weight and bias.

    With `glu` (True or "concat", or "interleaved"; see `moe_mlp`) the experts are gated,
    fc2(act(gate) * up): `w1` is [E, 2*hidden, in] and `b1` [E, 2*hidden], each expert's gate rows
    and up rows in that layout (one nn.Linear(in, 2*hidden) per expert), and `activation` is the
    gate's ("silu" for SwiGLU, or any of `GLU_ACTIVATIONS`).

    forward(x): x [T, in] or [B, N, in] -> (y [..., out], balance_loss (float32 scalar),
    z_loss (scalar, x.dtype)).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        *,
        num_experts: int,
        top_k: int,
        activation: str = "quick_gelu",
        glu: bool | str = False,
        bias: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        for name, v in (
            ("in_features", in_features),
            ("hidden_features", hidden_features),
            ("out_features", out_features),
            ("num_experts", num_experts),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int with 1 <= top_k <= num_experts={num_experts}, got {top_k!r}")
        layout = glu_layout(glu)
        accepted = ACTIVATIONS if layout is None else GLU_ACTIVATIONS
        if activation not in accepted:
            kind = "" if layout is None else " for gated experts (glu)"
            raise ValueError(f"activation: unknown {activation!r}{kind}; accepted: {', '.join(accepted)}")
        if backend is not None:
            dispatch.resolve_name(backend)
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.num_experts, self.top_k, self.activation, self.backend = num_experts, top_k, activation, backend
        self.glu = glu
        rows1 = hidden_features if layout is None else 2 * hidden_features
        kw = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(in_features, num_experts, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(num_experts, rows1, in_features, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, out_features, hidden_features, **kw))
        if bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, rows1, **kw))
            self.b2 = nn.Parameter(torch.empty(num_experts, out_features, **kw))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of each expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
        (kaiming_uniform with a=sqrt(5)) and biases.

        One `uniform_` per stacked tensor, not one `kaiming_uniform_` per expert slice: the same
        values on the CPU (the same draws in the same order), and it also initialises a DTensor
        (FSDP2's or ExpertParallel's shards after `to_empty`), where indexing an expert gives a
        copy that the per-expert calls filled instead of the parameter."""
        self.gate.reset_parameters()
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[2])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    # Set by `cumo_kernels.distributed.ExpertParallel` (then forward runs the expert-parallel path: the
    # experts are DTensor shards, tokens cross ranks). A check here, not a replaced forward, so that a
    # subclass's own forward (cumo's MLPMoE) still runs around it.
    _expert_parallel = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._expert_parallel is not None:
            return self._expert_parallel.forward(self, x)
        return moe_mlp(
            x,
            self.gate.weight,
            self.w1,
            self.b1,
            self.w2,
            self.b2,
            top_k=self.top_k,
            activation=self.activation,
            glu=self.glu,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, backend={self.backend!r}"
            + (f", glu={self.glu!r}" if self.glu is not False else "")
        )
