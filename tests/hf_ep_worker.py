"""One rank of the expert-parallel test of `cumo_kernels.hf` (tests/test_hf.py starts two).

    python hf_ep_worker.py OUT_FILE MODEL_DIR:EP_IMPLEMENTATION ...
    (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them)

For each model directory: loads it with transformers' own expert parallelism over gloo and
experts_implementation "cumo", runs the forward and backward of the batch saved beside it
(batch.pt: input_ids and the probe the loss multiplies the logits by), and records the logits,
every parameter's gradient (whole: sharded ones are gathered), the cumo ops that ran and how many
routing slots reached the experts as sentinels (ids >= the local expert count). Saves all of it
to OUT_FILE.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cumo":
            self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


def _distributed_config(world: int, implementation: str):
    from transformers.distributed.configuration_utils import DistributedConfig

    if "ep_size" in getattr(DistributedConfig, "__dataclass_fields__", {}):
        # transformers >= 5.21: the experts split by expert over ep_size ranks, the dense modules by
        # the model's tp_plan; ep_implementation "all_reduce" hands every rank the whole batch with
        # the other rank's slots as sentinels, "all_to_all" sends each rank only its slots.
        return DistributedConfig(tp_size=world, ep_size=world, ep_implementation=implementation)
    # 5.17 - 5.20, as their documentation shows (sentinels, then an all-reduce)
    return DistributedConfig(tp_size=world, enable_expert_parallel=True)


def _whole(t):
    if t is not None and hasattr(t, "full_tensor"):
        return t.full_tensor()  # a collective: every rank walks the same tensors in the same order
    return t


def run(model_dir: str, implementation: str) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ExpertsInterface

    import cumo_kernels.hf

    slots = {"sentinel": 0, "all": 0}

    def counting(self, hidden_states, top_k_index, top_k_weights):
        slots["sentinel"] += int((top_k_index >= self.num_experts).sum())
        slots["all"] += top_k_index.numel()
        return cumo_kernels.hf.experts_forward(self, hidden_states, top_k_index, top_k_weights)

    ExpertsInterface.register("cumo", counting)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            distributed_config=_distributed_config(dist.get_world_size(), implementation),
            experts_implementation="cumo",
            dtype=torch.float32,
        )
        batch = torch.load(f"{model_dir}/batch.pt")
        with _Record() as rec:
            logits = _whole(model(batch["input_ids"]).logits)
            (logits * batch["probe"]).sum().backward()
        grads = {n: _whole(p.grad) for n, p in model.named_parameters()}
    finally:
        cumo_kernels.hf.register()
    return {
        "logits": logits.detach(),
        "grads": {n: None if g is None else g.detach().clone() for n, g in grads.items()},
        "ops": sorted(rec.ops),
        "slots": slots,
        "local_experts": [m.num_experts for m in model.modules() if hasattr(m, "has_gate")],
        "transformers": transformers.__version__,
    }


def main(out: str, jobs: list[str]) -> None:
    dist.init_process_group("gloo")
    results = {}
    for job in jobs:
        model_dir, implementation = job.rsplit(":", 1)
        results[job] = run(model_dir, implementation)
    torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
