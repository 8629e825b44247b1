"""Routing ops: `cumo::route` (softmax, top-k, renormalisation, balance statistics, z-loss sums)
from given logits, `cumo::route_x` (the router GEMM fused with the routing, for backends with the
fused composition), and `cumo::aux_losses`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import dispatch
from ._common import check_float, check_top_k, grad_or_zeros, guard_autograd, refuse_double_backward


@dataclass(frozen=True)
class Routing:
    """One layer call's routing, as it travels between the ops above the custom-op boundary (the
    custom ops take its fields as tensors and ints: torch.library ops cannot take a record).

    weights: [T, k], the activation dtype: each token's renormalised top-k probabilities.
    expert_ids: [T, k] int64: each slot t*k+j's expert, by descending probability; an id >= E is
        a dropped slot (it belongs to no expert).
    sort_idx: [T*k] int64: the slots in grouped order (by expert, stable; dropped slots last).
    offsets: [E+1] int64: expert e's grouped rows are offsets[e]:offsets[e+1]; offsets[0] = 0,
        non-decreasing, offsets[E] <= T*k.
    top_k: k >= 1. num_experts: E >= 1.

    Built once per call from the routing and sort ops' outputs; its shapes and dtypes are checked
    there (metadata only: no host sync; the values are the ops' own, see `cumo_kernels.ops`
    "Index inputs" for validating a caller's).
    """

    weights: Tensor
    expert_ids: Tensor
    sort_idx: Tensor
    offsets: Tensor
    top_k: int
    num_experts: int

    def __post_init__(self) -> None:
        t, k, e = self.weights.shape[0], self.top_k, self.num_experts
        if (
            self.weights.shape != (t, k)
            or self.expert_ids.shape != (t, k)
            or self.sort_idx.shape != (t * k,)
            or self.offsets.shape != (e + 1,)
            or self.expert_ids.dtype != torch.int64
            or self.sort_idx.dtype != torch.int64
            or self.offsets.dtype != torch.int64
        ):
            raise ValueError(
                f"Routing: expected weights [T, k={k}], expert_ids [T, k] int64, sort_idx [T*k] int64, "
                f"offsets [E+1={e + 1}] int64, got {list(self.weights.shape)}, {self.expert_ids.dtype} "
                f"{list(self.expert_ids.shape)}, {self.sort_idx.dtype} {list(self.sort_idx.shape)}, "
                f"{self.offsets.dtype} {list(self.offsets.shape)}"
            )


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("cumo::route", mutates_args=())
def _route(logits: Tensor, top_k: int, num_samples: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return dispatch.implementation(backend).route(logits, top_k, num_samples)


@_route.register_fake
def _(logits, top_k, num_samples, backend):
    t, e = logits.shape
    f32 = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (
        logits.new_empty(t, top_k),
        logits.new_empty(t, top_k, dtype=torch.int64),
        logits.new_empty(num_samples, e, dtype=f32),
        logits.new_empty(num_samples, e, dtype=f32),
        logits.new_empty(num_samples, dtype=f32),
    )


@torch.library.custom_op("cumo::route_backward", mutates_args=())
def _route_backward(
    grad_weights: Tensor, grad_prob_sums: Tensor, grad_z_sums: Tensor, logits: Tensor, expert_ids: Tensor, backend: str
) -> Tensor:
    impl = dispatch.implementation(backend)
    return impl.route_backward(grad_weights, grad_prob_sums, grad_z_sums, logits, expert_ids)


@_route_backward.register_fake
def _(grad_weights, grad_prob_sums, grad_z_sums, logits, expert_ids, backend):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, _, num_samples, backend = inputs
    _, expert_ids, _, first_counts, _ = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, expert_ids)
    ctx.backend, ctx.num_samples = backend, num_samples
    ctx.mark_non_differentiable(expert_ids, first_counts)


def _route_bwd(ctx, g_weights, g_ids, g_prob_sums, g_counts, g_z_sums):
    logits, expert_ids = ctx.saved_tensors
    b = logits.new_empty(0)
    n_samples = ctx.num_samples
    gw = grad_or_zeros(g_weights, expert_ids.to(logits.dtype))
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    gp = grad_or_zeros(g_prob_sums, b.new_empty(n_samples, logits.shape[1], dtype=acc))
    gz = grad_or_zeros(g_z_sums, b.new_empty(n_samples, dtype=acc))
    return _route_backward(gw, gp, gz, logits, expert_ids, ctx.backend), None, None, None


_route.register_autograd(_route_bwd, setup_context=_route_setup)
guard_autograd(_route)
refuse_double_backward(_route_backward, "route")


def route(
    logits: Tensor, top_k: int, num_samples: int = 1, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Route tokens from router logits with CuMo's rounding points.

    Args:
        logits: [T, E] router logits (x @ gate^T) in the activation dtype; T = B * N and sample
            b owns rows [b*N, (b+1)*N).
        top_k: experts per token, 1 <= top_k <= E.
        num_samples: B, over whose tokens the balance statistics are taken (T % B == 0).
        backend: None | "auto" | "torch" | "triton" | "cuda".

    Returns:
        weights [T, k] logits.dtype (renormalised top-k probabilities),
        expert_ids [T, k] int64 (descending probability; equal scores: lower index first),
        prob_sums [B, E] float32 (per-sample sum of the probabilities rounded to logits.dtype),
        first_counts [B, E] float32 (per-sample count of first choices; no gradient),
        z_sums [B] float32 (per-sample sum of logsumexp(logits)^2).
        Gradients reach logits through weights, prob_sums and z_sums.
    """
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, E], got {list(logits.shape)}")
    t, e = logits.shape
    check_top_k(top_k, e)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1 or t % num_samples:
        raise ValueError(f"num_samples: expected a positive int dividing T={t}, got {num_samples!r}")
    name = dispatch.choose(backend, logits.device, logits.dtype, e, op="route")
    return _route(logits.contiguous(), top_k, num_samples, name)


@torch.library.custom_op("cumo::aux_losses", mutates_args=())
def _aux_losses(
    prob_sums: Tensor, first_counts: Tensor, z_sums: Tensor, tokens_per_sample: int
) -> tuple[Tensor, Tensor]:
    from ..reference import aux_losses as ref

    return ref(prob_sums, first_counts, z_sums, tokens_per_sample)


@_aux_losses.register_fake
def _(prob_sums, first_counts, z_sums, tokens_per_sample):
    acc = torch.float64 if prob_sums.dtype == torch.float64 else torch.float32
    return prob_sums.new_empty((), dtype=acc), prob_sums.new_empty((), dtype=acc)


def _aux_setup(ctx, inputs, output):
    prob_sums, first_counts, z_sums, n = inputs
    ctx.save_for_backward(first_counts)
    ctx.n = n
    ctx.b, ctx.e = prob_sums.shape
    ctx.prob_dtype, ctx.z_dtype = prob_sums.dtype, z_sums.dtype


def _aux_bwd(ctx, g_balance, g_z):
    (first_counts,) = ctx.saved_tensors
    n, b, e = float(ctx.n), ctx.b, ctx.e
    gp = gz = None
    if g_balance is not None:
        gp = (g_balance * first_counts * (e * e / (max(b * e, 1) * n * n))).to(ctx.prob_dtype)
    if g_z is not None:
        gz = (g_z / (max(b, 1) * n)).expand(b).to(ctx.z_dtype).contiguous()
    return gp, None, gz, None


_aux_losses.register_autograd(_aux_bwd, setup_context=_aux_setup)
guard_autograd(_aux_losses)


def aux_losses(
    prob_sums: Tensor, first_counts: Tensor, z_sums: Tensor, tokens_per_sample: int
) -> tuple[Tensor, Tensor]:
    """CuMo's balance loss and router z-loss from `route`'s per-sample statistics.

    prob_sums [B, E], first_counts [B, E], z_sums [B] (float32); N = tokens_per_sample > 0.
    Returns float32 scalars (balance, z):
    balance = mean_{b,e}((prob_sums/N) * (first_counts/N)) * E^2 and z = sum(z_sums) / (B*N).
    A caller that routed several calls at once (the S^2 scales) slices the rows of each call
    and averages per call, as CuMo does.
    """
    for name, t in (("prob_sums", prob_sums), ("first_counts", first_counts), ("z_sums", z_sums)):
        check_float(name, t)
    if prob_sums.dim() != 2 or first_counts.shape != prob_sums.shape or z_sums.shape != prob_sums.shape[:1]:
        raise ValueError(
            "prob_sums, first_counts, z_sums: expected shapes [B, E], [B, E], [B], got "
            f"{list(prob_sums.shape)}, {list(first_counts.shape)}, {list(z_sums.shape)}"
        )
    if isinstance(tokens_per_sample, bool) or not isinstance(tokens_per_sample, int) or tokens_per_sample < 1:
        raise ValueError(f"tokens_per_sample: expected a positive int, got {tokens_per_sample!r}")
    return _aux_losses(prob_sums.contiguous(), first_counts.contiguous(), z_sums.contiguous(), tokens_per_sample)


# ----------------------------------------------------------------------------------- route_x


@torch.library.custom_op("cumo::route_x", mutates_args=())
def _route_x(
    x: Tensor, gate_weight: Tensor, top_k: int, num_samples: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(dispatch.op(backend, "route_x")(x, gate_weight, top_k, num_samples))


@_route_x.register_fake
def _(x, gate_weight, top_k, num_samples, backend):
    t, e = x.shape[0], gate_weight.shape[0]
    acc = _acc(x.dtype)
    return (
        x.new_empty(t, top_k),
        x.new_empty(t, top_k, dtype=torch.int64),
        x.new_empty(num_samples, e, dtype=acc),
        x.new_empty(num_samples, e, dtype=acc),
        x.new_empty(num_samples, dtype=acc),
        x.new_empty(t, e),
    )


@torch.library.custom_op("cumo::route_x_backward", mutates_args=())
def _route_x_backward(
    grad_weights: Tensor,
    grad_prob_sums: Tensor,
    grad_z_sums: Tensor,
    x: Tensor,
    gate_weight: Tensor,
    logits: Tensor,
    expert_ids: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fn = dispatch.op(backend, "route_x_backward")
    return tuple(fn(grad_weights, grad_prob_sums, grad_z_sums, x, gate_weight, logits, expert_ids))


@_route_x_backward.register_fake
def _(grad_weights, grad_prob_sums, grad_z_sums, x, gate_weight, logits, expert_ids, backend):
    return torch.empty_like(x), torch.empty_like(gate_weight)


def _route_x_setup(ctx, inputs, output):
    x, gate_weight, _, num_samples, backend = inputs
    _, expert_ids, _, first_counts, _, logits = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, gate_weight, logits, expert_ids)
    ctx.backend, ctx.num_samples = backend, num_samples
    ctx.mark_non_differentiable(expert_ids, first_counts, logits)


def _route_x_bwd(ctx, g_weights, g_ids, g_prob_sums, g_counts, g_z_sums, g_logits):
    x, gate_weight, logits, expert_ids = ctx.saved_tensors
    n, e = ctx.num_samples, gate_weight.shape[0]
    acc = _acc(x.dtype)
    gw = g_weights.contiguous() if g_weights is not None else x.new_zeros(expert_ids.shape)
    gp = g_prob_sums.contiguous() if g_prob_sums is not None else x.new_zeros(n, e, dtype=acc)
    gz = g_z_sums.contiguous() if g_z_sums is not None else x.new_zeros(n, dtype=acc)
    dx, dg = _route_x_backward(gw, gp, gz, x, gate_weight, logits, expert_ids, ctx.backend)
    return dx, dg, None, None, None


_route_x.register_autograd(_route_x_bwd, setup_context=_route_x_setup)
guard_autograd(_route_x)
refuse_double_backward(_route_x_backward, "route_x")
