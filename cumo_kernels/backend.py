"""The backend contract: what a backend of cumo-kernels is, in code.

A backend is a module, imported only when a call asks for it (`cumo_kernels.dispatch` keeps the
registry: "torch" is `cumo_kernels.reference`, "triton" is `cumo_kernels.triton`, "cuda" is
`cumo_kernels.cuda`). The module defines:

- the op functions of the contract, with the signatures of the Protocols below: every backend
  the `BaseOps` (the public ops route, permute, unpermute and grouped_linear, and their backward
  functions); a backend whose `COMPOSITION` is "fused" also the `FusedOps`; a backend whose
  `FEATURES` hold "expert_mlp" also the `ExpertMLPOps`. `cumo::aux_losses` is no backend op (a few
  scalar ops on the statistics, the same on every backend).
- `COMPOSITION`: how `moe_mlp` composes the ops for it (COMPOSITIONS says each composition's ops);
- `FEATURES`: a frozenset of the optional features of FEATURES it has;
- `not_supported_reasons(call: Call) -> list[str]`: every reason it cannot run `call` (device,
  dtype, number of experts, arch, missing install), computed from the call's description alone,
  before anything launches, in the manner of xformers' fmha dispatch. An empty list: it can.

A layer call chooses one backend at entry (`dispatch.choose`): an explicitly requested backend
with reasons raises them; `auto` takes the first candidate without reasons (in its measured order
where a GPU measurement exists, cumo_kernels.tuning); when none fits the error lists every
candidate's reasons. The ops then run on that backend only: no per-op fallback, no substitution
of the torch twin for a missing op. `tests/test_contract.py` checks every registered backend
against this module.

`Unsupported` is what an op function raises for operands its backend's `not_supported_reasons`
could not see (an element-misaligned data pointer; `CUMO_CUDA_GEMM=cutlass` forced on operands
CUTLASS cannot take): an error, never a fallback.

Adding an op (the gated grouped GEMM, say):
1. its torch twin in `reference/<family>.py` (routing, permute, grouped_linear), exported by
   `reference/__init__.py`: that makes the torch backend provide it;
2. its signature here, in the Protocol of the composition or feature that uses it (`BaseOps` if
   every backend must have it; else an existing or new Protocol, listed in COMPOSITIONS or
   FEATURES_OPS), so `required_ops` and the contract test know it;
3. its custom op in `ops/<family>.py` (fake, autograd, a backward op if it has one), calling
   `dispatch.implementation(backend).<op>` (or `dispatch.op(backend, "<op>")` for an op that not
   every backend provides, which names the backend and the contract when it is missing);
4. the op in every backend module that must provide it (triton/<family>.py, cuda.py), or that
   backend's COMPOSITION / FEATURES stay without it; the contract test says which backend lacks
   what;
5. opcheck samples in tests/test_ops.py (the test that every `cumo::` op has samples fails until
   then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Unsupported(RuntimeError):
    """Raised by a backend's op function, before it launches anything, for operands it cannot
    take and that its `not_supported_reasons` could not see from the call's description. Never a
    fallback: the call fails with the reason (choose the backend by `not_supported_reasons`)."""


@dataclass(frozen=True)
class Call:
    """What a call asks of a backend, described without touching tensor data.

    device: the operands' device (index included on CUDA).
    dtype: the activation dtype; None: any (a question about the device alone).
    num_experts: E; None: any.
    op: the one op a public op function runs ("route", "permute", "unpermute", "grouped_linear",
        "grouped_linear_glu");
        None: a whole layer (`moe_mlp`), every op of the backend's composition.
    """

    device: torch.device
    dtype: torch.dtype | None = None
    num_experts: int | None = None
    op: str | None = None

    def describe(self) -> str:
        """The call in words, for error messages."""
        what = f"{self.op} on" if self.op else "moe_mlp on"
        parts = [f"{what} {self.device.type} tensors"]
        if self.dtype is not None:
            parts.append(str(self.dtype).removeprefix("torch."))
        if self.num_experts is not None:
            parts.append(f"E={self.num_experts}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------- the op table


class BaseOps(Protocol):
    """The ops every backend provides (shapes: T tokens, k = top_k, E experts, M = T*k grouped rows;
    index tensors int64; statistics float32, float64 for float64 inputs)."""

    def route(self, logits: Tensor, top_k: int, num_samples: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """logits [T, E] -> weights [T, k], expert_ids [T, k], prob_sums [B, E], first_counts [B, E], z_sums [B]."""
        ...

    def route_backward(
        self, grad_weights: Tensor, grad_prob_sums: Tensor, grad_z_sums: Tensor, logits: Tensor, expert_ids: Tensor
    ) -> Tensor:
        """-> grad_logits [T, E]."""
        ...

    def permute(self, x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, H], expert_ids [T, k] -> x_sorted [M, H], sort_idx [M], offsets [E+1]."""
        ...

    def permute_backward(self, grad_sorted: Tensor, sort_idx: Tensor, top_k: int) -> Tensor:
        """grad_sorted [M, H] -> grad_x [T, H]."""
        ...

    def unpermute(self, y_sorted: Tensor, sort_idx: Tensor, weights: Tensor) -> Tensor:
        """y_sorted [M, N], sort_idx [M], weights [T, k] -> out [T, N]."""
        ...

    def unpermute_backward(
        self, grad_out: Tensor, y_sorted: Tensor, sort_idx: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> grad_y_sorted [M, N], grad_weights [T, k]."""
        ...

    def grouped_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, activation: str = "none"
    ) -> tuple[Tensor, Tensor]:
        """x [M, K], weight [E, N, K], bias [E, N]?, offsets [E+1] -> y [M, N], pre [M, N] (or [0])."""
        ...

    def grouped_linear_backward(
        self,
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        offsets: Tensor,
        pre: Tensor,
        activation: str,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> grad_x [M, K], grad_weight [E, N, K], grad_bias [E, N] or None."""
        ...

    def grouped_linear_glu(
        self,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        offsets: Tensor,
        activation: str,
        interleaved: bool = False,
        save_pre: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Gated experts' first layer (issue 23): x [M, in], w1 [E, 2H, in] (any strides; gate and up
        rows concatenated, or alternating when `interleaved`), b1 [E, 2H]? -> h [M, H] =
        act(gate) * up, pre [M, 2H] (columns in w1's row order; [0] unless save_pre)."""
        ...

    def grouped_linear_glu_backward(
        self,
        grad_h: Tensor,
        x: Tensor,
        w1: Tensor,
        offsets: Tensor,
        pre: Tensor,
        activation: str,
        interleaved: bool,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> grad_x [M, in], grad_w1 [E, 2H, in], grad_b1 [E, 2H] or None."""
        ...


class FusedOps(Protocol):
    """The ops of the fused composition: routing from x, the sort order alone, the first GEMM
    reading x's rows through the sort order, the second GEMM with the weighted combine."""

    def route_x(
        self, x: Tensor, gate_weight: Tensor, top_k: int, num_samples: int = 1
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [T, in], gate_weight [E, in] -> route's five outputs + logits [T, E] (x.dtype)."""
        ...

    def route_x_backward(
        self,
        grad_weights: Tensor,
        grad_prob_sums: Tensor,
        grad_z_sums: Tensor,
        x: Tensor,
        gate_weight: Tensor,
        logits: Tensor,
        expert_ids: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """-> grad_x [T, in], grad_gate [E, in]."""
        ...

    def sort_experts(self, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
        """expert_ids [T, k] -> sort_idx [M], offsets [E+1]."""
        ...

    def grouped_linear_gather(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        sort_idx: Tensor,
        offsets: Tensor,
        top_k: int,
        activation: str = "none",
        save_pre: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """x [T, K] in token order -> y [M, N] grouped, pre [M, N] (or [0])."""
        ...

    def grouped_linear_gather_backward(
        self,
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        sort_idx: Tensor,
        offsets: Tensor,
        pre: Tensor,
        top_k: int,
        activation: str,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> grad_x [T, K] in token order, grad_weight, grad_bias or None."""
        ...

    def grouped_linear_combine(
        self, h: Tensor, weight: Tensor, bias: Tensor | None, sort_idx: Tensor, offsets: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        """h [M, K] grouped, weights [T, k] -> out [T, N] (weighted combine), y_slot [M, N] (slot order)."""
        ...

    def grouped_linear_combine_backward(
        self,
        grad_out: Tensor,
        h: Tensor,
        weight: Tensor,
        sort_idx: Tensor,
        offsets: Tensor,
        weights: Tensor,
        y_slot: Tensor,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """-> grad_h [M, K], grad_weight, grad_bias or None, grad_weights [T, k]."""
        ...

    def grouped_linear_glu_gather(
        self,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        sort_idx: Tensor,
        offsets: Tensor,
        top_k: int,
        activation: str,
        interleaved: bool = False,
        save_pre: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Gated first layer, x [T, in] in token order read through sort_idx // k -> h [M, H], pre [M, 2H] (or [0])."""
        ...

    def grouped_linear_glu_gather_backward(
        self,
        grad_h: Tensor,
        grad_pre: Tensor,
        x: Tensor,
        w1: Tensor,
        sort_idx: Tensor,
        offsets: Tensor,
        pre: Tensor,
        top_k: int,
        activation: str,
        interleaved: bool,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """grad_h [M, H] (through the gated derivative) and grad_pre [M, 2H], either [0] when absent ->
        grad_x [T, in], grad_w1, grad_b1 or None."""
        ...

    def grouped_linear_glu_combine(
        self,
        h: Tensor,
        pre: Tensor,
        w2: Tensor,
        b2: Tensor | None,
        sort_idx: Tensor,
        offsets: Tensor,
        weights: Tensor,
        activation: str,
        interleaved: bool,
    ) -> tuple[Tensor, Tensor]:
        """fc2 + the weighted combine over h = glu(pre) -> out [T, N], y_slot [M, N]."""
        ...

    def grouped_linear_glu_combine_backward(
        self,
        grad_out: Tensor,
        h: Tensor,
        pre: Tensor,
        w2: Tensor,
        sort_idx: Tensor,
        offsets: Tensor,
        weights: Tensor,
        y_slot: Tensor,
        activation: str,
        interleaved: bool,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """-> grad_pre [M, 2H] (the gated derivative applied), grad_w2, grad_b2 or None, grad_weights [T, k]."""
        ...


class ExpertMLPOps(Protocol):
    """Feature "expert_mlp": both expert layers in one inference-only op, which the unfused
    composition runs on CPU tensors when no gradient is needed (blocks of rows, so the [M, hidden]
    activations never go to memory)."""

    def expert_mlp(
        self,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        offsets: Tensor,
        activation: str,
    ) -> Tensor:
        """x [M, in] grouped -> [M, out]: act(x W1_e^T + b1_e) W2_e^T + b2_e per expert's rows."""
        ...

    def expert_mlp_glu(
        self,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        offsets: Tensor,
        activation: str,
        interleaved: bool = False,
    ) -> Tensor:
        """Gated experts, x [M, in] grouped -> [M, out]: (act(gate) * up) W2_e^T + b2_e per expert's rows."""
        ...


def _ops_of(protocol: type) -> tuple[str, ...]:
    return tuple(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_"))


BASE_OPS: tuple[str, ...] = _ops_of(BaseOps)
FUSED_OPS: tuple[str, ...] = _ops_of(FusedOps)
EXPERT_MLP_OPS: tuple[str, ...] = _ops_of(ExpertMLPOps)

COMPOSITIONS: dict[str, tuple[type, ...]] = {
    # route -> permute -> grouped_linear (fc1, fc2) -> unpermute
    "unfused": (BaseOps,),
    # route_x -> sort_experts -> grouped_linear_gather (fc1) -> grouped_linear_combine (fc2)
    "fused": (BaseOps, FusedOps),
}
"""Each composition of `moe_mlp` and the op Protocols a backend with it provides."""

FEATURES_OPS: dict[str, tuple[type, ...]] = {"expert_mlp": (ExpertMLPOps,)}
"""Each optional feature and the op Protocols a backend with it provides."""

PROTOCOLS: tuple[type, ...] = (BaseOps, FusedOps, ExpertMLPOps)
"""Every op Protocol: the whole op table."""


def required_ops(composition: str, features: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The op names a backend with `composition` and `features` provides."""
    if composition not in COMPOSITIONS:
        raise ValueError(f"COMPOSITION: unknown {composition!r}; accepted: {', '.join(COMPOSITIONS)}")
    unknown = set(features) - set(FEATURES_OPS)
    if unknown:
        raise ValueError(f"FEATURES: unknown {sorted(unknown)}; accepted: {', '.join(FEATURES_OPS)}")
    protocols = COMPOSITIONS[composition] + tuple(p for f in sorted(features) for p in FEATURES_OPS[f])
    return tuple(dict.fromkeys(op for p in protocols for op in _ops_of(p)))


def protocol_of(op: str) -> type:
    """The Protocol that declares `op`."""
    for p in PROTOCOLS:
        if op in _ops_of(p):
            return p
    raise KeyError(f"{op!r} is no op of the backend contract")
