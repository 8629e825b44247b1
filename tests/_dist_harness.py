"""Run many checks in one spawn of N gloo processes (the distributed tests' harness).

`run(world, suite)` starts `world` processes once; each joins a gloo group and runs every check of
`suite` (a list of functions `check(rank, world)`, run in order, the same on every rank), catching
what each raises. The result maps each check's name to None (passed on every rank) or the errors of the
ranks where it failed. A check that fails on one rank while the others wait in a collective would
hang them: the group's timeout (30 s) turns that into an error, and the parent gives up after
`timeout` seconds. Tests then assert on one check each, so that one spawn serves many tests.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp

Check = Callable[[int, int], None]


def _worker(rank: int, world: int, root: str, suite_ref: tuple[str, str], queue) -> None:
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["CUMO_DIST_TMP"] = root  # checks write their checkpoints under it (`shared_dir`)
    results: dict[str, str | None] = {}
    try:
        # a file store, not a TCP port: no race with other processes for a port picked free
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(root, 'store')}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        module, name = suite_ref
        suite = getattr(importlib.import_module(module), name)
        for check in suite:
            try:
                check(rank, world)
                results[check.__name__] = None
            except Exception:  # noqa: BLE001 - reported to the test
                results[check.__name__] = f"rank {rank}: {traceback.format_exc(limit=6)}"
            dist.barrier()
    except Exception:  # noqa: BLE001
        results["<setup>"] = f"rank {rank}: {traceback.format_exc(limit=6)}"
    queue.put((rank, results))
    queue.close()
    queue.join_thread()  # the results are out before any teardown (gloo's can abort a process)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - after the results; the parent joins or kills the process
        pass


def run(world: int, suite_ref: tuple[str, str], timeout: float = 240) -> dict[str, str | None]:
    """Run the suite named by (module, attribute) on `world` gloo processes; {check name: None or error}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    root = tempfile.mkdtemp(prefix="cumo-dist-")
    procs = [ctx.Process(target=_worker, args=(r, world, root, suite_ref, queue)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank: dict[int, dict[str, str | None]] = {}
    try:
        for _ in range(world):
            rank, out = queue.get(timeout=timeout)
            per_rank[rank] = out
    except Exception as exc:  # noqa: BLE001 - a rank died or hung
        missing = sorted(set(range(world)) - set(per_rank))
        return {"<setup>": f"ranks {missing} gave no result ({type(exc).__name__}); got {per_rank}"}
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
        shutil.rmtree(root, ignore_errors=True)
    merged: dict[str, str | None] = {}
    for rank in sorted(per_rank):
        for name, err in per_rank[rank].items():
            if err is None:
                merged.setdefault(name, None)
            else:
                merged[name] = err if merged.get(name) is None else merged[name] + "\n" + err
    return merged


def shared_dir(name: str) -> str:
    """A directory that every rank of the running suite sees (removed with the suite's files)."""
    path = os.path.join(os.environ["CUMO_DIST_TMP"], name)
    os.makedirs(path, exist_ok=True)
    return path
