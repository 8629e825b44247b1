"""A small moe_mlp forward + backward on CUDA with each available backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py

Small on purpose (the sanitizer slows kernels 10-100x): 2 samples of 37 tokens, and an aligned
bf16 case (on the cuda backend: the CUTLASS grouped GEMM on sm90/sm80), the same with one expert
that gets no token (the device-built problem list's dummy problems, zero dW and db), an aligned
fp16 case, and a misaligned fp32 case (dims not multiples of 4/8: the fallback paths, on the cuda
backend its SIMT grouped GEMM).
Prints one line per (backend, case) (ok, REFUSED: the backend raised and the CUDA context is
healthy, or FAILED) and "SANITIZE_CASE OK" at the end; exits 1 on a failure, 2 when there is no
CUDA device.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cumo_kernels  # noqa: E402

# "cpu" only to test this script on a machine without a GPU.
DEVICE = os.environ.get("SANITIZE_CASE_DEVICE", "cuda")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


CASES = (
    # name, samples, tokens per sample, in, hidden, out, E, k, activation, dtype
    ("aligned-bf16", 2, 37, 64, 128, 64, 4, 2, "quick_gelu", torch.bfloat16),
    ("empty-expert-bf16", 2, 37, 64, 128, 64, 4, 2, "gelu", torch.bfloat16),
    ("aligned-fp16", 2, 37, 64, 128, 64, 4, 2, "silu", torch.float16),
    ("misaligned-fp32", 2, 37, 30, 62, 34, 4, 2, "gelu", torch.float32),
)


def one(backend: str, case: tuple) -> None:
    name, b, n, d_in, hid, d_out, e, k, act, dtype = case
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size: int, scale: float = 1.0) -> torch.Tensor:
        t = (torch.randn(*size, generator=g) * scale).to(DEVICE, dtype)
        return t.requires_grad_(True)

    x = rnd(b, n, d_in)
    gate, w1, b1 = rnd(e, d_in, scale=d_in**-0.5), rnd(e, hid, d_in, scale=d_in**-0.5), rnd(e, hid, scale=0.1)
    if name.startswith("empty-expert"):
        # A constant input feature and a gate that puts the last expert far below the others:
        # it is nobody's choice (k < E), so its group is empty.
        with torch.no_grad():
            x[..., 0] = 1.0
            gate[:, 0] = 0.0
            gate[-1, 0] = -30.0
    w2, b2 = rnd(e, d_out, hid, scale=hid**-0.5), rnd(e, d_out, scale=0.1)
    y, bal, z = cumo_kernels.moe_mlp(x, gate, w1, b1, w2, b2, top_k=k, activation=act, backend=backend)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad([y, bal, z], [x, gate, w1, b1, w2, b2], [dy, torch.ones_like(bal), torch.ones_like(z)])
    _sync()
    bad = [nm for nm, t in zip(("y", "dx", "dgate", "dw1", "db1", "dw2", "db2"), (y, *grads)) if not t.isfinite().all()]
    if bad:
        raise RuntimeError(f"non-finite values in {', '.join(bad)}")
    print(
        f"{backend:<7} {name:<18} y {tuple(y.shape)} balance {float(bal.detach()):.4f} z {float(z.detach()):.4f} ok",
        flush=True,
    )


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("sanitize_case: no CUDA device is available", flush=True)
        return 2
    backends = [bk for bk in cumo_kernels.available_backends(DEVICE) if bk != "auto"] + ["auto"]
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"sanitize_case: {name} backends {backends}", flush=True)
    failed = 0
    for backend in backends:
        for case in CASES:
            try:
                one(backend, case)
            except Exception as exc:
                # A backend that refuses a case (e.g. fp32 on CUTLASS without tf32) raises before
                # launching anything and leaves the context healthy: not a failure. A kernel fault
                # leaves a sticky error that the next synchronize raises: a failure.
                try:
                    _sync()
                    healthy = True
                except Exception:
                    healthy = False
                word = "REFUSED" if healthy and isinstance(exc, (RuntimeError, ValueError)) else "FAILED"
                failed += word == "FAILED"
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"{backend:<7} {case[0]:<18} {word} {type(exc).__name__}: {msg}", flush=True)
    if failed:
        print(f"SANITIZE_CASE FAILED ({failed})", flush=True)
        return 1
    print("SANITIZE_CASE OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
