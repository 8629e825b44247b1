"""CuMo's per-expert state-dict keys over stacked expert weights.

The kernels want each MoE block's experts stacked (`w1` [E, hidden, in], `b1` [E, hidden],
`w2` [E, out, hidden], `b2` [E, out], as `cumo_kernels.nn.MoEMLP` owns them), while CuMo's
checkpoints hold one `nn.Linear` pair per expert (`experts.{i}.<fc1>.weight`, ...). The modules of
this package keep the stacked parameters as their only storage, and `state_dict()` names exactly
those parameters (`gate.weight`, `w1`, `b1`, `w2`, `b2`): every state-dict key is the path of a real
parameter, which is what transformers' loader, accelerate's `set_module_tensor_to_device`
(device_map, meta-device loading), DeepSpeed ZeRO-3 and FSDP2 walk. CuMo's per-expert keys are a
checkpoint format, converted at the boundary:

- `cumo.checkpoint.to_cumo` / `from_cumo` convert whole dicts both ways;
- transformers' own `save_pretrained` / `from_pretrained` of the CLIP-MoE classes convert through
  transformers' weight-conversion mapping (`cumo._hf`), as transformers does for Mixtral's experts;
- `load_state_dict()` also accepts CuMo's per-expert keys (a load pre-hook, torch's public
  `register_load_state_dict_pre_hook`, stacks them once: the one copy a load makes anyway).

Why not per-expert modules: a parametrisation exposing per-expert `nn.Linear`s would need the
forward to stack them (a copy per forward), or the stacked tensor to be rebuilt from views
(autograd would then give per-expert gradients that the kernels do not produce).

The hooks are module-level functions (torch marks public hooks with an attribute, which bound
methods refuse) that read the module's `_cumo_expert_names`, so modules stay picklable and
deep-copyable.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

# Stacked parameter -> (which of the expert's two linears, weight or bias).
STACKED = {"w1": (0, "weight"), "b1": (0, "bias"), "w2": (1, "weight"), "b2": (1, "bias")}


def expert_key(names: tuple[str, str], e: int, stacked: str) -> str:
    """CuMo's key (relative to the block) of expert e's slice of a stacked parameter."""
    which, kind = STACKED[stacked]
    return f"experts.{e}.{names[which]}.{kind}"


def unstack(sd: dict[str, Any], prefix: str, names: tuple[str, str], num_experts: int) -> None:
    """In place: replace sd[prefix + "w1"|"b1"|"w2"|"b2"] by CuMo's per-expert views, expert by expert.

    An entry that is not a stack of `num_experts` (a placeholder: DeepSpeed ZeRO-3 replaces a
    partitioned parameter's data by an empty tensor, and its engine's checkpoint still calls
    `module.state_dict()`) keeps its stacked name, under which it also loads back.
    """
    stacked = {
        s: sd.pop(prefix + s)
        for s in STACKED
        if prefix + s in sd and _is_stack(sd[prefix + s], 3 if s[0] == "w" else 2, num_experts)
    }
    for s, t in stacked.items():
        for e, v in _experts_here(t, prefix + s):
            sd[prefix + expert_key(names, e, s)] = v


def _experts_here(t: Any, name: str) -> list[tuple[int, Any]]:
    """(e, expert e's slice) for every expert of the stack `t` that this process holds: all of them for
    a tensor (views); for a DTensor sharded along the expert dimension (FSDP2, ExpertParallel, both)
    the experts of the local shard, as views of it. torch.distributed.checkpoint then saves each
    expert's key from the rank that holds it (plain tensors: one writer per key) and loads it in
    place into the shard."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without torch.distributed
        DTensor = ()  # noqa: N806
    if not isinstance(t, DTensor):
        return [(e, t[e]) for e in range(t.shape[0])]
    local = t.to_local()
    if local.numel() == 0:
        return []
    (chunk,) = t.__create_chunk_list__()  # this rank's block: offsets and sizes in the global tensor
    if any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != tuple(t.shape[1:]):
        raise ValueError(
            f"{name}: a DTensor split inside an expert (placements {t.placements}, local block at "
            f"{list(chunk.offsets)} of size {list(chunk.sizes)}): CuMo's per-expert keys need whole experts on "
            "each rank; shard the stacked parameters along dim 0 (FSDP2's default) or save their stacked names"
        )
    return [(chunk.offsets[0] + i, local[i]) for i in range(chunk.sizes[0])]


def _is_stack(t: Any, dim: int, num_experts: int) -> bool:
    return getattr(t, "dim", None) is not None and t.dim() == dim and t.shape[0] == num_experts


def stack(sd: dict[str, Any], prefix: str, names: tuple[str, str], num_experts: int, errors: list[str] | None) -> None:
    """In place: replace CuMo's per-expert entries under `prefix` by the stacked ones.

    A stacked entry is built only when every expert's slice is there, each a tensor of one shape;
    otherwise `errors` (if given) names the keys at fault (missing experts, a value that is not a
    tensor, a slice whose shape differs from expert 0's) and the per-expert entries are consumed,
    so that a strict load reports the stacked name as missing and this error, not the slices as
    unexpected as well. Without `errors` they stay.
    """
    import torch

    pattern = re.compile(re.escape(prefix) + r"experts\.(\d+)\.(" + "|".join(map(re.escape, names)) + r")\.")
    if not any(pattern.match(k) for k in sd):
        return
    for s in STACKED:
        keys = [prefix + expert_key(names, e, s) for e in range(num_experts)]
        present = [k in sd for k in keys]
        if not any(present):
            continue
        why = None
        if not all(present):
            why = f"are incomplete: missing {[k for k, p in zip(keys, present) if not p]}"
        elif any(not isinstance(sd[k], torch.Tensor) for k in keys):
            bad = {k: type(sd[k]).__name__ for k in keys if not isinstance(sd[k], torch.Tensor)}
            why = f"cannot be stacked: values that are not tensors: {bad}"
        elif any(sd[k].shape != sd[keys[0]].shape for k in keys):
            bad = {k: list(sd[k].shape) for k in keys if sd[k].shape != sd[keys[0]].shape}
            why = f"cannot be stacked: shapes differ from {keys[0]!r}'s {list(sd[keys[0]].shape)}: {bad}"
        if why is None:
            sd[prefix + s] = torch.stack([sd.pop(k) for k in keys])
        elif errors is not None:
            errors.append(f"CuMo expert weights for {prefix + s!r} {why}")
            for k in keys:
                sd.pop(k, None)
    extra = sorted(
        k for k in sd if pattern.match(k) and int(k[len(prefix) :].split(".")[1]) >= num_experts
    )  # experts beyond E
    if extra and errors is not None:
        errors.append(f"checkpoint has more experts than the module's num_experts={num_experts}: {extra[:4]}")


def load_state_dict_pre_hook(
    module: nn.Module,
    sd: dict[str, Tensor],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    stack(sd, prefix, module._cumo_expert_names, module.num_experts, error_msgs)


def register(module: nn.Module, names: tuple[str, str]) -> None:
    """Let `module` (a MoEMLP) load CuMo's per-expert keys `experts.{i}.{names[0] | names[1]}.{weight | bias}`."""
    module._cumo_expert_names = tuple(names)
    module.register_load_state_dict_pre_hook(load_state_dict_pre_hook)
