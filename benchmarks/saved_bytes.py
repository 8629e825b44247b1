"""Activation memory per provider, counted on any device (the CPU included).

    python -m benchmarks.saved_bytes [--shapes clip-train,connector-train] [--providers ...]

Activation memory here is what autograd keeps between a layer's forward and its backward: the
storages of the tensors saved for backward, each counted once, less the layer's inputs and
parameters (the caller holds those anyway). It depends on the autograd graph, not on the device,
so the CPU counts what a GPU run of the same code keeps (Triton on the CPU runs under
TRITON_INTERPRET=1, which this module sets when no GPU is used).

Each shape runs with its widths divided by --scale (the interpreter is slow) and --tokens tokens,
in float16 (2-byte activations like bfloat16; the interpreter cannot run bfloat16 dots). Every
saved tensor's dims are then mapped back: a dim equal to the scaled in/hidden/out width is
multiplied by the scale, 1, E and k stay, and any other dim is a row count (T, T*k, or one
expert's rows in CuMo's loop) and is scaled by the named shape's T over the run's, so the table
gives the bytes at the named shape. (The scaled dims are checked to be unambiguous.)
This is the saved-tensor part of the peak; the GPU benchmark's `peak_mem_gib` adds the
backward's transient buffers and is the figure issue #7's target is judged by.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace

DEFAULT_SHAPES = ("clip-train", "connector-train")
DEFAULT_PROVIDERS = ("cumo-triton", "cumo-torch", "grouped_mm", "cumo-loop")


def count_saved(fn: Callable[[], object], exclude: list) -> tuple[list[tuple[tuple[int, ...], int, int]], object]:
    """Runs fn() recording the tensors autograd saves: ([(shape, element size, storage bytes)],
    fn's result), one entry per storage, leaving out the storages of `exclude`'s tensors."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, tuple[tuple[int, ...], int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if st.nbytes() and ptr not in skip and ptr not in seen:
            seen[ptr] = (tuple(t.shape), t.element_size(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return list(seen.values()), out


def full_size_bytes(saved: list, small, full, scale: int) -> float:
    """Bytes of the saved tensors at the full shape: dims mapped as the module docstring says."""
    widths = {small.d_in, small.hidden, small.d_out}
    small_ints = {1, small.experts, small.top_k, small.samples}
    row_ratio = full.tokens / small.tokens

    def full_dim(d: int) -> float:
        if d in widths:
            return d * scale
        if d in small_ints:
            return d
        return d * row_ratio  # T, T*k, or one expert's rows (CuMo's loop): rows scale with T

    total = 0.0
    for shape, elem, nbytes in saved:
        if math.prod(shape) * elem != nbytes:
            # a view of a larger storage (CuMo's loop saves slices of its index tensors): the whole
            # storage stays alive; taken as rows, times the scale where the view has a width dim
            total += nbytes * row_ratio * (scale if any(d in widths for d in shape) else 1)
            continue
        total += math.prod(full_dim(d) for d in shape) * elem
    return total


def shapes_and_providers(shapes: str, providers: str) -> tuple[list[str], list] | None:
    """The named shapes and the CPU providers of a comma-separated --shapes / --providers (the
    CPU memory tools': this one and benchmarks.peak_memory); prints the providers skipped and
    why, and returns None (after saying why) for an unknown shape."""
    import torch

    from .providers import providers_for
    from .shapes import NAMED

    wanted = [s for s in shapes.split(",") if s]
    unknown = [s for s in wanted if s not in NAMED]
    if unknown:
        print(f"--shapes: unknown {unknown}; named shapes: {', '.join(NAMED)}", file=sys.stderr)
        return None
    chosen, skipped = providers_for(torch.device("cpu"), [s for s in providers.split(",") if s])
    for name, why in skipped:
        print(f"skip {name}: {why}")
    return wanted, [p for p in chosen if p.forward is not None]


def training_inputs(shape):
    """Float16 CPU inputs of `shape` (float16 stands in for bfloat16: same size, and the Triton
    interpreter cannot run bfloat16 dots), every one requiring grad."""
    import torch

    from .providers import make_inputs

    inp = make_inputs(shape, torch.float16, torch.device("cpu"))
    for t in inp.params():
        t.requires_grad_(True)
    return inp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.saved_bytes", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS))
    p.add_argument("--scale", type=int, default=8, help="divide the widths by this (default 8)")
    p.add_argument("--tokens", type=int, default=72, help="tokens of the scaled run (default 72)")
    p.add_argument("--verbose", action="store_true", help="list every saved tensor (scaled run)")
    args = p.parse_args(argv)
    if "cumo-triton" in args.providers.split(","):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors only here

    from .shapes import NAMED

    chosen = shapes_and_providers(args.shapes, args.providers)
    if chosen is None:
        return 2
    wanted, providers = chosen
    print(
        f"saved-for-backward bytes (activation memory), counted on the CPU at widths / {args.scale} and "
        f"T = {args.tokens}, float16, mapped to the named shape; inputs and parameters not counted"
    )
    for sname in wanted:
        full = NAMED[sname]
        small = replace(
            full,
            tokens=args.tokens,
            samples=1,
            d_in=full.d_in // args.scale,
            hidden=full.hidden // args.scale,
            d_out=full.d_out // args.scale,
        )
        dims = {small.d_in, small.hidden, small.d_out}
        # rows (at most T per expert, T*k in all) must not be mistaken for widths, nor E, k, 1 for rows
        if small.tokens >= min(dims) or small.tokens * small.top_k in dims or small.tokens <= small.experts:
            print(f"--tokens {args.tokens} / --scale {args.scale}: dims of {sname} collide; choose others")
            return 2
        counted = {}
        for prov in providers:
            inp = training_inputs(small)
            saved, _ = count_saved(functools.partial(prov.forward, inp, small), inp.params())
            counted[prov.name] = (full_size_bytes(saved, small, full, args.scale), saved)
        base = counted.get("grouped_mm", (None,))[0]
        rows = full.tokens * full.top_k
        for name, (nbytes, saved) in counted.items():
            ratio = f"  {nbytes / base:.2f}x grouped_mm" if base else ""
            print(f"{sname:<16} {name:<12} {nbytes / 2**30:7.3f} GiB  {nbytes / rows:8.0f} B per routed row{ratio}")
            if args.verbose:
                for shape, elem, nb in sorted(saved, key=lambda r: -r[2]):
                    print(f"{'':<30}{list(shape)} x {elem} B ({nb} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
