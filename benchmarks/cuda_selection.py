"""The GPU suite's test selection, seen without a GPU.

    python -m benchmarks.cuda_selection [-m MARKEXPR]

Collects (never runs) `pytest tests --cuda-only` with torch.cuda.is_available() faked to True,
so that the CUDA parametrisations exist, and prints the node ids in the order the suite would
run them, then a count per file. Used by tests/test_benchmarks.py and the suite's dry run to
check that the selection holds no CPU-only test and puts the GPU-only ones first.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Collector:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.gpu_only: list[bool] = []

    def pytest_collection_finish(self, session) -> None:  # noqa: ANN001 (pytest's hook signature)
        for item in session.items:
            self.ids.append(item.nodeid)
            self.gpu_only.append(item.get_closest_marker("cuda") is not None)


def collect(extra: list[str] | None = None) -> tuple[list[str], list[bool]]:
    """(node ids, GPU-only flags) of the suite's selection, in its order. Fakes CUDA in this
    process: call it in a process of its own."""
    import pytest
    import torch

    torch.cuda.is_available = lambda: True  # collection only: no test body runs
    col = _Collector()
    args = ["--collect-only", "-q", "--cuda-only", "-p", "no:cacheprovider", os.path.join(REPO, "tests")]
    rc = pytest.main(args + (extra or []), plugins=[col])
    if rc not in (0, 5):
        raise SystemExit(f"collection failed (pytest exit {rc})")
    return col.ids, col.gpu_only


def main(argv: list[str]) -> int:
    import collections
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ids, gpu_only = collect(argv)
    for nid, g in zip(ids, gpu_only):
        print(("gpu-only " if g else "         ") + nid)
    per_file = collections.Counter(nid.split("::")[0] for nid in ids)
    for f, n in per_file.most_common():
        print(f"{n:6d}  {f}")
    print(f"{len(ids)} tests ({sum(gpu_only)} GPU-only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
