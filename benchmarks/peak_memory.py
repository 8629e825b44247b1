"""Peak memory of one forward+backward call per provider, measured on the CPU.

    python -m benchmarks.peak_memory [--shapes clip-train,connector-train] [--providers ...] [--scale 8]

What it measures is what the GPU benchmark's `peak_mem_gib` measures (torch.cuda.max_memory_allocated
during one call, less what was allocated before it): the most bytes the call holds at once, its
outputs (the gradients) included. Here the allocations are those of torch's CPU allocator, read from
the profiler's memory events (`torch.profiler.profile(profile_memory=True)`) and summed in order.

Scaling: every dim of the named shape (tokens, in, hidden, out) is divided by --scale, so that the
Triton interpreter can run it; the bytes of every [rows, width] and [width, width] tensor then
shrink by scale^2 and the figures are multiplied back by scale^2. Tensors that do not scale that
way ([T, E] router logits, biases) are below 1% of the total at these shapes; runs at scale 4 and
8 agree to within 1.5% (NOTES.md). Sizes that cap a transient buffer (the torch backend's row
blocks and chunks) are divided by scale^2 too, so they cut the scaled run where they cut the
full one.

What makes the CPU stand in for the GPU here:
- The Triton backend runs its real launchers in the interpreter; the kernels allocate nothing,
  so the allocations are those of a GPU run. The interpreter leaves each launch's arguments in a
  reference cycle until Python's garbage collector runs (triton's `_init_args_hst` closure), which
  GPU launches do not: a collection follows every interpreted launch here. The GEMM tiles are
  forced to 128x128x64 (fewer interpreted programs; allocations do not depend on the tile).
- The torch backend runs the strategy it uses on CUDA in bf16 (grouped_mm; --torch-gemm to
  change), not its CPU one.
- The cuda backend runs its Python side (cumo_kernels/cuda.py: every output and workspace is a
  torch allocation there, the extension allocates nothing) with the extension's kernel calls
  replaced by no-ops and its device checks lifted, so its tensors hold garbage that nothing on
  the host reads. The CUTLASS GEMM workspace size needs a device: the SIMT path's is used (a few
  bytes against GiB of activations, but CUTLASS's own share is not measured).
- float16 stands in for bfloat16 (same size; the interpreter cannot run bfloat16 dots).
Not modelled: the CUDA caching allocator's rounding (to 512 B) and any workspace a CUDA library
allocates on first use (the GPU benchmark warms up first, so neither is in its figure either).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import replace

DEFAULT_SHAPES = ("clip-train", "connector-train")
DEFAULT_PROVIDERS = ("cumo-triton", "cumo-cuda", "cumo-torch", "grouped_mm", "cumo-loop")
CUDA_KERNEL_CALLS = (
    "route_forward",
    "route_backward",
    "permute_forward",
    "permute_backward",
    "unpermute_forward",
    "unpermute_backward",
    "grouped_linear_forward",
    "grouped_linear_backward",
)
TRITON_TILE = {"BM": 128, "BN": 128, "BK": 64}


def peak_bytes(fn: Callable[[], object]) -> tuple[int, int, object]:
    """(peak, held at the end, fn's result): CPU bytes allocated by torch during fn() above what
    was allocated before it, at their most and when fn returns (its result still held). Frees of
    memory allocated before fn() are not seen (the profiler does not know their sizes): where fn
    frees earlier tensors (a backward alone frees the saved ones) the peak is an upper bound."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as exc:  # a private attribute: say so plainly if a torch release moves it
        raise RuntimeError(
            f"torch {torch.__version__}: the profiler's memory events are not where this tool reads "
            "them (prof.profiler.kineto_results.events())"
        ) from exc
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for e in memory:
        held += e.nbytes()
        peak = max(peak, held)
    return peak, held, out


def scaled_shape(full, scale: int):
    """The named shape with tokens and widths divided by `scale` (samples of the same length where
    the scaled token count allows, else one sample)."""
    for name in ("tokens", "d_in", "hidden", "d_out"):
        if getattr(full, name) % scale:
            raise ValueError(f"--scale {scale}: {full.name}'s {name} = {getattr(full, name)} is not a multiple")
    t = full.tokens // scale
    samples = t // full.tokens_per_sample if t % full.tokens_per_sample == 0 else 1
    return replace(
        full,
        tokens=t,
        samples=samples,
        d_in=full.d_in // scale,
        hidden=full.hidden // scale,
        d_out=full.d_out // scale,
    )


@contextlib.contextmanager
def cpu_stand_in(scale: int, torch_gemm: str) -> Iterator[None]:
    """The settings of the module docstring, undone on exit: scaled buffer caps, the torch
    backend's CUDA strategy, large Triton tiles, a garbage collection after each interpreted launch."""
    import triton
    from triton.runtime import interpreter

    gl = importlib.import_module("cumo_kernels.reference.grouped_linear")  # the module: the package's name is the op
    from cumo_kernels.triton._common import forced_config

    caps = {"_BLOCK_BYTES": gl._BLOCK_BYTES, "_CHUNK_ELEMS": gl._CHUNK_ELEMS}
    launch = interpreter.GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        result = launch(self, *args, **kwargs)
        gc.collect()
        return result

    old_env = os.environ.get("CUMO_KERNELS_TORCH_GEMM")
    try:
        for name, value in caps.items():
            setattr(gl, name, max(1, value // scale**2))
        os.environ["CUMO_KERNELS_TORCH_GEMM"] = torch_gemm
        interpreter.GridExecutor.__call__ = launch_then_collect
        with forced_config(triton.Config(TRITON_TILE, num_warps=4, num_stages=1)):
            yield
    finally:
        interpreter.GridExecutor.__call__ = launch
        for name, value in caps.items():
            setattr(gl, name, value)
        if old_env is None:
            os.environ.pop("CUMO_KERNELS_TORCH_GEMM", None)
        else:
            os.environ["CUMO_KERNELS_TORCH_GEMM"] = old_env


@contextlib.contextmanager
def cuda_backend_stand_in() -> Iterator[None]:
    """The cuda backend on CPU tensors with no-op kernels (module docstring), undone on exit.
    Raises RuntimeError where the extension is not built."""
    from cumo_kernels import cuda

    ext = cuda._cuda
    if ext is None:
        raise RuntimeError("the extension cumo_kernels._cuda is not built (python setup.py build_ext --inplace)")
    needed = (*CUDA_KERNEL_CALLS, "permute_workspace_bytes", "gemm_workspace_bytes")
    missing = [n for n in needed if not hasattr(ext, n)]
    if missing:
        raise RuntimeError(f"cumo_kernels._cuda lacks {missing}: this stand-in is out of date")

    def no_op(*args, **kwargs) -> None:
        return None

    def simt_workspace(m, k, n, e, code, use_cutlass, device):  # the SIMT path's: no device query
        return ext.gemm_workspace_bytes(m, k, n, e, code, False, 0)

    fake = types.SimpleNamespace(**{n: no_op for n in CUDA_KERNEL_CALLS})
    fake.permute_workspace_bytes = ext.permute_workspace_bytes
    fake.gemm_workspace_bytes = simt_workspace
    fake.build_info = ext.build_info
    patches = {
        "_cuda": fake,
        "_check": lambda name, t, device, dtype=None: None,
        "_stream": lambda device: 0,
        "_use_cutlass": lambda *args: False,
        "refusal": lambda device_type: None,
    }
    saved = {name: getattr(cuda, name) for name in patches}
    try:
        for name, value in patches.items():
            setattr(cuda, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(cuda, name, value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS))
    p.add_argument("--scale", type=int, default=8, help="divide tokens and widths by this (default 8)")
    p.add_argument(
        "--torch-gemm",
        default="grouped_mm",
        help="the torch backend's strategy (default grouped_mm, its CUDA bf16 one; per_expert is its CPU one)",
    )
    args = p.parse_args(argv)
    if "cumo-triton" in args.providers.split(","):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors only here

    from cumo_kernels.reference.grouped_linear import STRATEGIES

    from .providers import _cumo_provider, _grads_of
    from .saved_bytes import shapes_and_providers, training_inputs
    from .shapes import NAMED

    if args.scale < 1:
        print(f"--scale: expected a positive integer, got {args.scale}", file=sys.stderr)
        return 2
    if args.torch_gemm not in STRATEGIES:
        print(f"--torch-gemm: unknown {args.torch_gemm!r}; accepted: {', '.join(STRATEGIES)}", file=sys.stderr)
        return 2
    asked = [s for s in args.providers.split(",") if s]
    # cumo-cuda is not available on the CPU: it runs under cuda_backend_stand_in, added here
    chosen = shapes_and_providers(args.shapes, ",".join(n for n in asked if n != "cumo-cuda"))
    if chosen is None:
        return 2
    wanted, providers = chosen
    if "cumo-cuda" in asked:
        try:
            with cuda_backend_stand_in():
                pass
            providers.insert(0, _cumo_provider("cuda"))
        except RuntimeError as exc:
            print(f"skip cumo-cuda: {exc}")
    print(
        f"peak memory of one fwd+bwd call (gradients included, inputs not), measured on the CPU at "
        f"tokens and widths / {args.scale}, float16, x {args.scale**2} to the named shape; torch backend "
        f"strategy {args.torch_gemm}"
    )
    factor = args.scale**2
    for sname in wanted:
        try:
            small = scaled_shape(NAMED[sname], args.scale)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        rows = {}
        for prov in providers:
            inp = training_inputs(small)

            def call(prov=prov, inp=inp, small=small):
                return _grads_of(prov.forward(inp, small), inp)

            print(f"  measuring {prov.name} at {sname} ...", file=sys.stderr, flush=True)  # Triton: minutes
            t0 = time.perf_counter()
            cuda_side = cuda_backend_stand_in() if prov.name == "cumo-cuda" else contextlib.nullcontext()
            with cpu_stand_in(args.scale, args.torch_gemm), cuda_side:
                call()  # warm-up: compiled/interpreted code, caches
                gc.collect()
                peak, _, out = peak_bytes(call)
            grads = sum(g.numel() * g.element_size() for g in out if g is not None)
            rows[prov.name] = (peak * factor, grads * factor, time.perf_counter() - t0)
            del out
        base = rows.get("grouped_mm", (None,))[0]
        for name, (peak, grads, secs) in rows.items():
            ratio = f"{peak / base:5.2f}x grouped_mm" if base else ""
            print(
                f"{sname:<16} {name:<12} peak {peak / 2**30:7.3f} GiB  {ratio}  "
                f"(gradients {grads / 2**30:.3f} GiB; {secs:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
