"""A small moe_mlp forward + backward on CUDA with each available backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py [--backends cuda,triton]

Small on purpose (the sanitizer slows kernels 10-100x): 2 samples of 37 tokens, and an aligned
bf16 case (on the cuda backend: the CUTLASS grouped GEMM on sm90/sm80), the same with one expert
that gets no token (the device-built problem list's dummy problems, zero dW and db), an aligned
fp16 case, and a misaligned fp32 case (dims not multiples of 4/8: the fallback paths, on the cuda
backend its SIMT grouped GEMM).

Backends: --backends, else $SANITIZE_CASE_BACKENDS, a comma-separated list of cuda, triton, torch
and auto run in the order given (e.g. cuda,triton to run the cuda backend first); by default every
backend available on the device, in auto's static order, then auto. A backend named explicitly
that cannot run on the device is a failure (UNAVAILABLE), not a silent skip.

Prints one line per (backend, case): ok; REFUSED, when an explicitly chosen backend raised
`cumo_kernels.dispatch.Unsupported` (its documented refusal of operands, before launching
anything) and the CUDA context is still healthy; else FAILED (any other exception, e.g. a CUTLASS
"cannot implement" RuntimeError, Unsupported out of auto, which must fall back, or a fault that
the next synchronize reports). Then a summary of the backends and cases that ran, were refused
and failed, and "SANITIZE_CASE OK" or "SANITIZE_CASE FAILED (n)". Exits 1 on a failure, 2 when
there is no CUDA device or the backend list is bad.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cumo_kernels  # noqa: E402
from cumo_kernels import dispatch  # noqa: E402

BACKENDS_ENV = "SANITIZE_CASE_BACKENDS"
KNOWN_BACKENDS = ("cuda", "triton", "torch", "auto")


def device_type() -> str:
    """$SANITIZE_CASE_DEVICE, "cuda" unless set ("cpu" only to test this script without a GPU)."""
    return os.environ.get("SANITIZE_CASE_DEVICE", "cuda")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parse_backends(spec: str) -> list[str]:
    """The backends of a comma-separated list, in its order; ValueError for an unknown, repeated or
    empty list."""
    names = [b.strip() for b in spec.split(",") if b.strip()]
    if not names:
        raise ValueError(f"no backend in {spec!r}; name some of {', '.join(KNOWN_BACKENDS)}")
    unknown = [b for b in names if b not in KNOWN_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; accepted: {', '.join(KNOWN_BACKENDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a backend is named twice in {spec!r}")
    return names


def default_backends(device: str) -> list[str]:
    return [bk for bk in cumo_kernels.available_backends(device) if bk != "auto"] + ["auto"]


def unavailable(backend: str, device: str) -> str | None:
    """Why `backend` cannot run on `device` tensors (None: it can)."""
    try:
        dispatch.choose(backend, torch.device(device))
    except RuntimeError as exc:
        return str(exc)
    return None


def verdict(backend: str, exc: BaseException, healthy: bool) -> str:
    """REFUSED only for Unsupported from an explicitly chosen backend with the context healthy;
    anything else is FAILED (under auto, Unsupported means auto chose a backend whose reasons
    did not show what it refuses)."""
    if healthy and backend != "auto" and isinstance(exc, dispatch.Unsupported):
        return "REFUSED"
    return "FAILED"


CASES = (
    # name, samples, tokens per sample, in, hidden, out, E, k, activation, dtype
    ("aligned-bf16", 2, 37, 64, 128, 64, 4, 2, "quick_gelu", torch.bfloat16),
    ("empty-expert-bf16", 2, 37, 64, 128, 64, 4, 2, "gelu", torch.bfloat16),
    ("aligned-fp16", 2, 37, 64, 128, 64, 4, 2, "silu", torch.float16),
    ("misaligned-fp32", 2, 37, 30, 62, 34, 4, 2, "gelu", torch.float32),
)


def one(backend: str, case: tuple, device: str = "cuda") -> None:
    name, b, n, d_in, hid, d_out, e, k, act, dtype = case
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size: int, scale: float = 1.0) -> torch.Tensor:
        t = (torch.randn(*size, generator=g) * scale).to(device, dtype)
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
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad([y, bal, z], [x, gate, w1, b1, w2, b2], [dy, torch.ones_like(bal), torch.ones_like(z)])
    _sync(device)
    bad = [nm for nm, t in zip(("y", "dx", "dgate", "dw1", "db1", "dw2", "db2"), (y, *grads)) if not t.isfinite().all()]
    if bad:
        raise RuntimeError(f"non-finite values in {', '.join(bad)}")
    print(
        f"{backend:<7} {name:<18} y {tuple(y.shape)} balance {float(bal.detach()):.4f} z {float(z.detach()):.4f} ok",
        flush=True,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/sanitize_case.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backends",
        default=os.environ.get(BACKENDS_ENV),
        help=f"comma-separated, in order, of {', '.join(KNOWN_BACKENDS)} (default ${BACKENDS_ENV}, "
        "else every available backend, then auto)",
    )
    args = p.parse_args(argv)
    device = device_type()
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_case: no CUDA device is available", flush=True)
        return 2
    if args.backends:
        try:
            backends = parse_backends(args.backends)
        except ValueError as exc:
            print(f"sanitize_case: --backends/{BACKENDS_ENV}: {exc}", flush=True)
            return 2
    else:
        backends = default_backends(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"sanitize_case: {name} backends {backends}", flush=True)
    # backend -> {"ok" | "REFUSED" | "FAILED" | "UNAVAILABLE": ["case (why)", ...]}
    outcome: dict[str, dict[str, list[str]]] = {}
    for backend in backends:
        got = outcome.setdefault(backend, {"ok": [], "REFUSED": [], "FAILED": [], "UNAVAILABLE": []})
        why = unavailable(backend, device)
        if why is not None:
            print(f"{backend:<7} {'(every case)':<18} UNAVAILABLE {why}", flush=True)
            got["UNAVAILABLE"].append(why)
            continue
        for case in CASES:
            try:
                one(backend, case, device)
                got["ok"].append(case[0])
            except Exception as exc:
                # A refusal (Unsupported) is raised before launching anything and leaves the
                # context healthy; a kernel fault leaves a sticky error that the next synchronize
                # raises: a failure whatever the exception was.
                try:
                    _sync(device)
                    healthy = True
                except Exception:
                    healthy = False
                word = verdict(backend, exc, healthy)
                msg = _first_line(exc) + ("" if healthy else "; the CUDA context is broken")
                got[word].append(f"{case[0]} ({msg})")
                print(f"{backend:<7} {case[0]:<18} {word} {msg}", flush=True)
    totals = {w: sum(len(o[w]) for o in outcome.values()) for w in ("ok", "REFUSED", "FAILED", "UNAVAILABLE")}
    print(
        f"sanitize_case summary: backends {', '.join(backends)}; {totals['ok']} (backend, case) ran ok, "
        f"{totals['REFUSED']} refused, {totals['FAILED']} failed, {totals['UNAVAILABLE']} backends unavailable",
        flush=True,
    )
    for backend, got in outcome.items():
        parts = [f"{w.lower()} {', '.join(items)}" for w, items in got.items() if items]
        print(f"  {backend}: {'; '.join(parts)}", flush=True)
    bad = totals["FAILED"] + totals["UNAVAILABLE"]
    if bad:
        print(f"SANITIZE_CASE FAILED ({bad})", flush=True)
        return 1
    print("SANITIZE_CASE OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
