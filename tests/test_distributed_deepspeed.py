"""CuMo's engine: a tiny CuMo-shaped model (a converted CLIP tower of 2 layers and the MoE connector)
trains under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (`DS_ACCELERATOR=cpu`, gloo).

One spawn of 2 processes (tests/_dist_harness.py) runs both stages: three steps whose losses and
final parameters equal one process running the same steps (the mean of the ranks' losses, fp32:
relative error 1e-5 per tensor), a DeepSpeed checkpoint saved and loaded into a fresh engine, and the
consolidated fp32 state dict (`deepspeed.utils.zero_to_fp32`) converted by `cumo.checkpoint.to_cumo`
into CuMo's keys and loaded back with `from_cumo`. Skipped where DeepSpeed is not installed.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch
from torch import nn

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip(
        "deepspeed is not installed (CI: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)",
        allow_module_level=True,
    )
pytest.importorskip("transformers")

import _dist_harness  # noqa: E402

STEPS = 3
CHANNELS = 16


class TinyCuMo(nn.Module):
    """CuMo's shape in miniature: CLIP-MoE tower (penultimate hidden state as features, its aux losses),
    MoE connector, CuMo's aux-loss sum; a regression loss stands in for the LLM."""

    def __init__(self, seed: int) -> None:
        from test_cumo_vision import perturb_experts, scramble_gates, tiny_clip

        import cumo

        super().__init__()
        tower = cumo.convert_clip_to_moe(tiny_clip(seed))
        scramble_gates(tower, seed + 1)
        perturb_experts(tower, seed + 2)
        self.vision_tower = tower.train()
        torch.manual_seed(seed + 3)
        self.mm_projector = cumo.MLPMoE(4, 2, tower.config.hidden_size, CHANNELS)

    def forward(self, pixel_values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import cumo

        feats = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        tower_aux = cumo.collect_aux_losses(self.vision_tower)
        y, balance, z = self.mm_projector(feats)
        return ((y - target) ** 2).mean() + cumo.aux_loss(tower_aux, (balance, z))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from test_cumo_vision import pixels

    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return pixels(2, seed=10 * step + rank), torch.randn(2, 10, CHANNELS, generator=g)


def _relerr(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, the norm floored at 1e-3: the attention's k_proj.bias gets gradients
    of float noise only (softmax is invariant to it), so it stays near its initial 0, ~1e-10."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-3)).item()


def _zero_stage(stage: int, rank: int, world: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import sys

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cumo.checkpoint import from_cumo, to_cumo

    # DeepSpeed's CPU backend JIT-compiles a C++ shared-memory all-reduce (for inference) at init: a
    # compiler run per fresh machine that ZeRO's training path does not use (it runs on gloo)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default: none of this tiny
        # model's would be partitioned
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,  # DeepSpeed's default (0.19), and CuMo's (transformers' max_grad_norm)
        "steps_per_print": 10_000,
    }
    model = TinyCuMo(seed=11)
    ref = copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), config=config
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    errors: list[str] = []
    for step in range(STEPS):
        loss = engine(*_batch(step, rank))
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        ref_losses = [ref(*_batch(step, p)) for p in range(world)]
        (sum(ref_losses) / world).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        if _relerr(loss.detach(), ref_losses[rank].detach()) > 1e-5:
            errors.append(f"step {step}: loss {loss.item()} != {ref_losses[rank].item()}")

    def full_params(eng) -> dict[str, torch.Tensor]:
        params = dict(eng.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
            return {k: v.detach().clone() for k, v in params.items()}

    trained = full_params(engine)
    want = dict(ref.named_parameters())
    assert sorted(trained) == sorted(want)
    errors += [f"{k}: {_relerr(v, want[k]):.3g}" for k, v in trained.items() if _relerr(v, want[k]) > 1e-5]

    root = _dist_harness.shared_dir(f"zero{stage}")
    engine.save_checkpoint(root, tag="t")
    fresh = TinyCuMo(seed=99)
    engine2, *_ = deepspeed.initialize(
        model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.05), config=config
    )
    engine2.load_checkpoint(root, tag="t")
    loaded = full_params(engine2)
    errors += [f"checkpoint load: {k}" for k, v in loaded.items() if not torch.equal(v, trained[k])]
    # one more step of each engine: the same loss (the optimizer state came back too)
    a, b = engine(*_batch(STEPS, rank)), engine2(*_batch(STEPS, rank))
    errors += [] if torch.equal(a, b) else [f"after load: loss {a.item()} != {b.item()}"]

    dist.barrier()
    if rank == 0:  # zero_to_fp32's consolidation, in CuMo's keys
        consolidated = get_fp32_state_dict_from_zero_checkpoint(root, tag="t")
        cumo_sd = to_cumo(consolidated)
        want_sd = to_cumo({k: v.detach() for k, v in ref.state_dict().items()})
        if sorted(cumo_sd) != sorted(want_sd):
            errors.append(f"CuMo keys differ: {sorted(set(cumo_sd) ^ set(want_sd))[:6]}")
        for k in ("vision_tower.vision_model.encoder.layers.1.experts.3.fc2.bias", "mm_projector.experts.0.0.weight"):
            if k not in cumo_sd:
                errors.append(f"missing CuMo key {k}")
        errors += [
            f"consolidated {k}: {_relerr(v, want_sd[k]):.3g}"
            for k, v in cumo_sd.items()
            if k in want_sd and _relerr(v, want_sd[k]) > 1e-5
        ]
        back = TinyCuMo(seed=98)
        back.load_state_dict(from_cumo(cumo_sd), strict=True)
        errors += [f"from_cumo: {k}" for k, v in back.state_dict().items() if not torch.equal(v, trained[k])]
    assert not errors, f"ZeRO-{stage}: " + "; ".join(errors[:12])


def zero2(rank: int, world: int) -> None:
    _zero_stage(2, rank, world)


def zero3(rank: int, world: int) -> None:
    _zero_stage(3, rank, world)


SUITE = [zero3, zero2]


@functools.cache
def _results() -> dict[str, str | None]:
    return _dist_harness.run(2, (__name__, "SUITE"), timeout=300)


@pytest.mark.parametrize("check", [c.__name__ for c in SUITE])
def test_deepspeed(check: str) -> None:
    results = _results()
    assert "<setup>" not in results, results["<setup>"]
    assert check in results, f"{check} did not run: {sorted(results)}"
    assert results[check] is None, results[check]
