"""Timers and the two ceilings.

CUDA: triton.testing.do_bench (CUDA events, its own warm-up, L2 flushed between runs), median.
CPU: one warm-up call, then the median of `reps` time.perf_counter runs (no triton needed);
the CLI interleaves the providers of one (shape, pass) round-robin (`bench_interleaved`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, reps: int = 3, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() on `device`, after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        fn()  # first call outside: compilation and autotuning stay out of do_bench's estimate
        sync(device)
        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_interleaved(fns: list[Callable[[], object]], reps: int = 3) -> list[float]:
    """CPU: median milliseconds of each fn (already warmed up), timed round-robin.

    Round r runs the callables in an order rotated by r, so that a slow spell caused by other
    processes on the machine is spread over all of them instead of landing on one.
    """
    times: list[list[float]] = [[] for _ in fns]
    n = len(fns)
    for r in range(max(reps, 1)):
        for j in range(n):
            i = (j + r) % n
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def peak_mem_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """CUDA: torch.cuda.max_memory_allocated during one call, above what was allocated before it
    (the inputs). CPU: None (not measured: no allocator statistics without extra dependencies)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**30


def matmul_tflops(device: torch.device, dtype: torch.dtype, reps: int = 3) -> tuple[float, str]:
    """A large torch.mm (CUDA: 8192^3 bf16; CPU: 2048^3 in `dtype`) on random data, TFLOP/s."""
    if device.type == "cuda":
        n, dt = 8192, torch.bfloat16
    else:
        n, dt = 2048, dtype
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    ms = bench_ms(lambda: torch.mm(a, b), device, reps=reps, rep_ms=200)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12, f"torch.mm {n}x{n}x{n} {str(dt).removeprefix('torch.')}"


def copy_gbps(device: torch.device, reps: int = 3) -> tuple[float, str]:
    """A large device-to-device copy (CUDA: 1 GiB; CPU: 256 MiB), GB/s counting bytes read + written."""
    nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.randint(0, 255, (nbytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, reps=reps, rep_ms=200)
    return 2.0 * nbytes / (ms * 1e-3) / 1e9, f"copy of {nbytes // 2**20} MiB, read + write counted"
