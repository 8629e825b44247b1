"""Expert parallelism for `MoEMLP`, in the form torch.distributed defines it: a `ParallelStyle`.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from cumo_kernels.distributed import ExpertParallel

    mesh = init_device_mesh("cuda", (8,), mesh_dim_names=("ep",))
    parallelize_module(layer, mesh, ExpertParallel())        # or {"encoder.layers.*.mlp": ExpertParallel()}

What it does to an `MoEMLP` (or a subclass: `cumo.MLPMoE`, `cumo.CLIPMoEMLP`) over a 1-D mesh of R ranks:

- `w1`, `b1`, `w2`, `b2` become DTensors `Shard(0)` over the mesh: rank p holds experts
  [p*E/R, (p+1)*E/R) (scattered from the mesh's first rank, torch's `distribute_tensor` convention).
  E not divisible by R is an error.
- `gate.weight` stays a plain parameter, broadcast from the mesh's first rank (replicated): each rank
  routes its own tokens. Its gradient is this rank's (from its own tokens); the data-parallel wrapper
  that runs over these ranks (FSDP2, DDP) reduces it like any other replicated parameter.
- forward(x) on each rank, x its own tokens ([T, in] or [B, N, in], sizes may differ between ranks,
  T = 0 included):
  1. `logits = gate(x)` (a module call: an FSDP2 group on `gate` unshards it), `route` on the local
     tokens: the balance statistics stay per sample of this rank, as CuMo computes them on each GPU;
  2. `permute` groups the token slots by expert; the slots of rank p's experts are one contiguous block;
  3. the per-expert counts go to their owners (`all_to_all_single` of R x E/R int64 on the device),
     then **one host sync**: the 2R split sizes (what this rank sends to and receives from each rank)
     are read with one `.tolist()`, because `all_to_all_single` takes its split sizes as Python ints.
     It is the only sync of the layer (forward and backward: the backward reuses those sizes);
  4. the token rows go to their experts' ranks (`all_to_all_single`, uneven splits, autograd), are
     grouped by local expert (`permute`; stable, so per source rank), run through the local experts
     with the same `grouped_linear` ops as one GPU, put back in arrival order (`unpermute` with
     weight 1) and returned (`all_to_all_single`, the splits swapped);
  5. `unpermute` combines each token's k results with its routing weights; `aux_losses` gives the
     balance and z losses of this rank's samples.
  The backward runs the same path in reverse (the all-to-alls' adjoints are all-to-alls).

Gradients after each rank's `backward()` of its own loss L_r: `gate.weight` holds the gradient of L_r
(a replicated parameter: the data-parallel wrapper that runs over these ranks, FSDP2 or DDP,
averages it like any other); the expert shards hold the mean over the R ranks of the gradients of
their L_r, (1/R) sum_r dL_r/dw (token rows of every rank reach them; the backward divides by R), which
is what a data-parallel average would give them if they were replicated. So nothing else divides
them: FSDP2 over a `dp` mesh dimension on top averages over dp and the result is the mean over all
dp x ep data ranks, with no `set_gradient_divide_factor` (torchtitan's experts take one because
its expert parallelism sums instead). A training loop that sums gradients over data ranks instead of
averaging multiplies the expert gradients by R.

Composition with FSDP2 over a 2-D (dp, ep) mesh, as torchtitan composes them (README, "Training at
scale"): ExpertParallel over `mesh["ep"]`, then `fully_shard(layer.gate, mesh=<all data ranks>)`,
`fully_shard(layer, mesh=mesh["dp"])` (the experts: FSDP2 shards each rank's expert shard further
over dp), then FSDP2 on the rest of the model over all data ranks.

`torch.compile`: the split sizes read on the host make the expert-parallel layer not `fullgraph`
compilable, unlike the single-device one (dynamo: "Could not guard on data-dependent expression");
with graph breaks allowed it compiles and gives the eager output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .nn import MoEMLP
from .ops import aux_losses, grouped_linear, permute, route, unpermute

__all__ = ["ExpertParallel"]

_EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _ExpertParallelState:
    """What `MoEMLP.forward` needs to run the expert-parallel path (stored on the module)."""

    mesh: DeviceMesh
    ranks: int  # R, the mesh's size
    local_experts: int  # E / R

    def forward(self, module: MoEMLP, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _forward(module, self, x)


class ExpertParallel(ParallelStyle):
    """Shard an `MoEMLP`'s experts over a 1-D device mesh (expert parallelism); see the module docstring.

    Apply with `torch.distributed.tensor.parallel.parallelize_module(module, mesh, ExpertParallel())`,
    or as the value of a plan dict. `module` must be an `MoEMLP` (or subclass) whose E is divisible
    by the mesh's size. A 2-D mesh is refused: pass the expert dimension, `mesh["ep"]`.

    Args:
        src_data_rank: the rank (within the mesh) whose full weights are scattered (experts) and
            broadcast (gate) to the others, as `distribute_tensor` does; None skips the
            communication and takes each rank's own slice and gate (they must then already agree,
            e.g. the same seed on every rank).
    """

    def __init__(self, *, src_data_rank: int | None = 0) -> None:
        super().__init__()
        self.src_data_rank = src_data_rank

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoEMLP):
            raise TypeError(
                f"ExpertParallel: expected a cumo_kernels.nn.MoEMLP (or subclass), got {type(module).__name__}; "
                "point the plan at the MoE block (e.g. {'encoder.layers.*.mlp': ExpertParallel()})"
            )
        if device_mesh.ndim != 1:
            raise ValueError(
                f"ExpertParallel: device_mesh: expected a 1-D mesh over the expert-parallel ranks, got a "
                f"{device_mesh.ndim}-D mesh {tuple(device_mesh.shape)}; pass its expert dimension, e.g. mesh['ep']"
            )
        if getattr(module, "_expert_parallel", None) is not None:
            raise ValueError("ExpertParallel: this module is already expert-parallel")
        ranks = device_mesh.size()
        e = module.num_experts
        if e % ranks:
            raise ValueError(
                f"ExpertParallel: num_experts={e} is not divisible by the mesh size {ranks}: every rank must own "
                f"the same number of experts (choose a mesh size that divides {e})"
            )
        gate = module.gate.weight
        for name, p in [(n, getattr(module, n)) for n in _EXPERT_PARAMS] + [("gate.weight", gate)]:
            if isinstance(p, DTensor):  # checked for all before any is changed
                raise ValueError(
                    f"ExpertParallel: {name} is already a DTensor ({p.placements}); apply ExpertParallel to a "
                    "module of plain parameters, before fully_shard or other parallel styles"
                )
        for name in _EXPERT_PARAMS:
            p = getattr(module, name)
            if p is not None:
                d = distribute_tensor(p.data, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                module.register_parameter(name, nn.Parameter(d, requires_grad=p.requires_grad))
        if self.src_data_rank is not None and gate.device.type != "meta":
            full = distribute_tensor(gate.data, device_mesh, [Replicate()], src_data_rank=self.src_data_rank)
            with torch.no_grad():
                gate.copy_(full.to_local())
        module._expert_parallel = _ExpertParallelState(device_mesh, ranks, e // ranks)
        return module


def _autocast(tensors: list[Tensor | None], device_type: str) -> list[Tensor | None]:
    """As `moe_mlp` does: under torch.autocast, floating inputs (float64 excepted) in its dtype."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return [t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors]
    return tensors


class _AverageGrad(torch.autograd.Function):
    """Identity forward; the backward divides the gradient by the number of expert-parallel ranks."""

    @staticmethod
    def forward(ctx, t: Tensor, ranks: int) -> Tensor:
        ctx.ranks = ranks
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        return g / ctx.ranks, None


def _local(module: MoEMLP, name: str, ranks: int) -> Tensor | None:
    p = getattr(module, name)
    if p is None:
        return None
    if not isinstance(p, DTensor):
        raise RuntimeError(
            f"ExpertParallel: {name} is no longer a DTensor (was it replaced after parallelize_module?); "
            "rebuild the module and apply ExpertParallel again"
        )
    local = p.to_local()
    return _AverageGrad.apply(local, ranks) if ranks > 1 and local.requires_grad else local


def _forward(module: MoEMLP, ep: _ExpertParallelState, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected shape [T, in] or [B, N, in], got {list(x.shape)}")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"x: expected [..., {module.in_features}] (the layer's in_features), got {list(x.shape)}")
    group = ep.mesh.get_group()
    r, e_loc, e, k = ep.ranks, ep.local_experts, module.num_experts, module.top_k
    w1, b1, w2, b2 = (_local(module, n, r) for n in _EXPERT_PARAMS)
    (x,) = _autocast([x], x.device.type)
    w1, b1, w2, b2 = _autocast([w1, b1, w2, b2], x.device.type)
    backend = module.backend
    lead = x.shape[:-1]
    samples = x.shape[0] if x.dim() == 3 else 1
    x2 = x.reshape(-1, x.shape[-1])
    t = x2.shape[0]

    # 1. local routing: the gate as a module call (FSDP2 hooks), per-sample statistics of this rank
    logits = module.gate(x2)
    if t == 0:  # nothing routed here; the exchange below still runs (the other ranks' tokens)
        weights, expert_ids, *_ = route(logits, k, 1, backend=backend)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        zero = logits.sum()  # exactly 0 (an empty sum), connected to x and the gate
        balance, z = zero.to(acc), zero.to(x.dtype)
    else:
        weights, expert_ids, prob_sums, first_counts, z_sums = route(logits, k, samples, backend=backend)
        balance, z = aux_losses(prob_sums, first_counts, z_sums, t // samples)
        z = z.to(x.dtype)
    # 2. group the k slots of every token by (global) expert; rank p's experts are one block
    x_sorted, sort_idx, offsets = permute(x2, expert_ids, e, backend=backend)

    # 3. counts per expert to the experts' owners, then the one host sync: the 2R split sizes
    send_counts = offsets.diff()  # [E] = [R, E/R] row-major: rank p's experts in row p
    recv_counts = all_to_all_single(send_counts, None, None, group)  # [R * E/R]: from rank p, per local expert
    recv_counts = wait_tensor(recv_counts)
    splits = torch.stack([send_counts.view(r, e_loc).sum(1), recv_counts.view(r, e_loc).sum(1)]).tolist()
    send_splits, recv_splits = splits
    received = sum(recv_splits)

    # 4. rows to the experts' ranks, grouped by local expert, the local experts, back in arrival order
    x_recv = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, group)
    x_recv = wait_tensor(x_recv)
    local_ids = torch.repeat_interleave(
        torch.arange(r * e_loc, device=x.device) % e_loc, recv_counts, output_size=received
    )  # output_size given: no sync for the data-dependent size
    x_loc, sort_loc, offsets_loc = permute(x_recv, local_ids.unsqueeze(1), e_loc, backend=backend)
    h = grouped_linear(x_loc, w1, b1, offsets_loc, module.activation, backend=backend)
    y_loc = grouped_linear(h, w2, b2, offsets_loc, "none", backend=backend)
    ones = y_loc.new_ones(received, 1)
    y_recv = unpermute(y_loc, sort_loc, ones, backend=backend)
    y_sorted = all_to_all_single_autograd(y_recv, send_splits, recv_splits, group)
    y_sorted = wait_tensor(y_sorted)

    # 5. each token's k results, weighted
    y = unpermute(y_sorted, sort_idx, weights, backend=backend)
    # not a view of y (FSDP2 warns on view outputs): the reshape aten's matmul uses for intermediates
    y = torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))
    return y, balance, z
