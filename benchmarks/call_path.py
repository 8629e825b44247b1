"""The path of one layer call from `MoEMLP.forward` to the fc1 kernel, measured (issue 20).

    TRITON_INTERPRET=1 python -m benchmarks.call_path

Runs one forward of a small MoEMLP on the triton backend (CPU tensors in Triton's interpreter, or
CUDA tensors on a GPU) and prints the cumo_kernels frames on the stack when the first grouped
GEMM (fc1) launches, the files they are in, and every cumo_kernels function entered before that
launch (`sys.setprofile`). benchmarks/NOTES.md compares the output before and after issue 20.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections import Counter

import torch


def measure(device: str = "cpu") -> dict:
    """{"kernel": name, "stack": [(file, function)], "entered": [(file, function)]} of one forward."""
    import cumo_kernels
    from cumo_kernels.nn import MoEMLP

    root = os.path.dirname(os.path.dirname(os.path.abspath(cumo_kernels.__file__)))
    pkg = os.path.join(root, "cumo_kernels")
    gl = importlib.import_module("cumo_kernels.triton.grouped_linear")
    real = gl.launch
    got: dict = {}
    entered: list[tuple[str, str]] = []

    def rel(path: str) -> str:
        return os.path.relpath(path, root)

    def profile(frame, event, arg):
        if event == "call" and "stack" not in got and frame.f_code.co_filename.startswith(pkg):
            entered.append((rel(frame.f_code.co_filename), frame.f_code.co_name))

    def launch(kernel, grid, args, fixed):
        if "stack" not in got:
            frames = traceback.extract_stack()[:-1]
            got["stack"] = [(rel(f.filename), f.name) for f in frames if f.filename.startswith(pkg)]
            got["kernel"] = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        return real(kernel, grid, args, fixed)

    torch.manual_seed(0)
    layer = MoEMLP(16, 24, 16, num_experts=4, top_k=2, activation="gelu", backend="triton").to(device)
    x = torch.randn(8, 16, device=device)
    with torch.no_grad():
        layer(x)  # imports and first-call work out of the way
        gl.launch = launch
        try:
            sys.setprofile(profile)
            layer(x)
        finally:
            sys.setprofile(None)
            gl.launch = real
    return {"kernel": got["kernel"], "stack": got["stack"], "entered": entered}


def files_on_path(stack: list[tuple[str, str]]) -> list[str]:
    """The files of the stack, a file repeated only when the path leaves it and comes back."""
    return [f for i, (f, _) in enumerate(stack) if i == 0 or stack[i - 1][0] != f]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("CPU tensors need Triton's interpreter: run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    m = measure(args.device)
    print(f"fc1 kernel: {m['kernel']}")
    print("cumo_kernels frames on the stack at its launch:")
    for f, name in m["stack"]:
        print(f"    {f}  {name}")
    files = files_on_path(m["stack"])
    print(f"{len(m['stack'])} frames, {len(set(files))} files: " + " -> ".join(files))
    by_file = Counter(f for f, _ in m["entered"])
    print(f"cumo_kernels functions entered before the launch: {len(m['entered'])}; by file: {dict(by_file)}")
    print("dispatch.py functions entered:", ", ".join(n for f, n in m["entered"] if f.endswith("dispatch.py")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
