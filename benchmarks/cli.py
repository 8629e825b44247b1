"""python -m benchmarks: time the MoE MLP block of cumo_kernels against CuMo's loop,
sorted dispatch + grouped_mm and dense GEMMs of the same FLOPs. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

import torch

from . import report, schema
from .providers import ALL_NAMES, PASSES, Inputs, loop_forward, make_call, make_inputs, providers_for
from .shapes import DEFAULT_CPU, DEFAULT_GPU, NAMED, Shape, parse_shape, quick, with_tokens
from .timing import bench_interleaved, bench_ms, copy_gbps, matmul_tflops, peak_mem_gib, sync

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark cumo_kernels.moe_mlp against CuMo's loop, sorted dispatch + grouped_mm and dense GEMMs.",
    )
    p.add_argument(
        "--shapes",
        help=f"comma-separated named shapes: {', '.join(NAMED)}, or 'all' "
        f"(default: GPU {','.join(DEFAULT_GPU)}; CPU {','.join(DEFAULT_CPU)})",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="T,in,hidden,out,E,k,act",
        help="an extra shape (repeatable); with --samples B, x is [B, T/B, in]",
    )
    p.add_argument("--samples", type=int, default=1, help="samples B of each --shape (default 1)")
    p.add_argument("--providers", help=f"comma-separated, of: {', '.join(ALL_NAMES)} (default: all that can run)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (default both)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default cuda when available)")
    p.add_argument("--out", help="write the result JSON here (rewritten after every row)")
    p.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    p.add_argument("--reps", type=int, default=3, help="CPU: timed runs after one warm-up, median (default 3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before anything runs (default: torch's)")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench's rep in ms (default 100)")
    p.add_argument("--quick", action="store_true", help="tiny scaled versions of the shapes (smoke test)")
    p.add_argument(
        "--tokens",
        type=int,
        help="run the shapes at this many tokens T (widths, experts, top-k kept; named <shape>@T<tokens>)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the forward error against cumo-loop")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the matmul and copy ceilings")
    p.add_argument("--time-budget", type=float, help="seconds; start no new measurement after this")
    p.add_argument("--tests-json", help="a JSON {passed, failed, skipped, ...} to record as 'tests'")
    p.add_argument("--tests-junit", help="a pytest junit XML to record as 'tests'")
    p.add_argument("--sanitizer-json", help="a JSON {tool: {status, ...}} to record as 'sanitizer'")
    p.add_argument("--validate", metavar="FILE", help="validate a result JSON and exit (0 valid, 1 not)")
    p.add_argument("--seed", type=int, default=0)
    return p


def junit_counts(path: str) -> dict[str, Any]:
    """{passed, failed, skipped, errors, total} from a pytest junit XML (failed counts errors too)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
    failed = tot["failures"] + tot["errors"]
    return {
        "passed": max(tot["tests"] - failed - tot["skipped"], 0),
        "failed": failed,
        "skipped": tot["skipped"],
        "errors": tot["errors"],
        "total": tot["tests"],
        "source": os.path.basename(path),
    }


def _git_commit() -> tuple[str, bool | None]:
    """(commit, dirty). A copy of the tree without .git (the device's) names them in CUMO_COMMIT
    and CUMO_COMMIT_DIRTY ("0"/"1"; dirty is null when that is unset)."""
    env = os.environ.get("CUMO_COMMIT")
    if env:
        flag = os.environ.get("CUMO_COMMIT_DIRTY")
        return env, None if flag not in ("0", "1") else flag == "1"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head or "unknown", bool(dirty)
    except Exception:
        return "unknown", None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model} ({torch.get_num_threads()} threads)"


def _machine() -> dict[str, Any]:
    """The GPU driver, the kernel and the sandbox runtime it implies, the extension's build."""
    out: dict[str, Any] = {"kernel": platform.release(), "driver": None, "runtime": None, "cuda_ext_build": None}
    rel = out["kernel"]
    # The device tool's machines: Firecracker kernels are named "...-fc-..."; gVisor reports 4.4.0.
    out["runtime"] = "firecracker" if "-fc-" in rel else "gvisor" if rel.startswith("4.4.0") else "unknown"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            out["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from cumo_kernels import _cuda

        out["cuda_ext_build"] = _cuda.build_info()
    except Exception as exc:
        out["cuda_ext_build"] = f"not importable ({type(exc).__name__}: {exc})"[:300]
    return out


def _versions() -> dict[str, Any]:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    try:
        import cumo_kernels

        ck = {"version": cumo_kernels.__version__, "backends": list(cumo_kernels.available_backends())}
    except Exception as exc:
        ck = {"error": f"{type(exc).__name__}: {exc}"}
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda, "cumo_kernels": ck}


def _shapes(args: argparse.Namespace, device: torch.device) -> list[Shape]:
    if args.shapes:
        names = list(NAMED) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [n for n in names if n not in NAMED]
        if unknown:
            raise SystemExit(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(NAMED)}")
    elif args.shape:
        names = []
    else:
        names = list(DEFAULT_GPU if device.type == "cuda" else DEFAULT_CPU)
    shapes = [NAMED[n] for n in names] + [parse_shape(s, args.samples) for s in args.shape]
    if args.tokens is not None:
        shapes = [with_tokens(s, args.tokens) for s in shapes]
    return [quick(s) for s in shapes] if args.quick else shapes


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype] | None:
    """The device (CUDA with its index) and dtype asked for; None (after saying why) when the
    device asked for is not here."""
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available here", file=sys.stderr)
            return None
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _passes(args: argparse.Namespace) -> list[str]:
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise SystemExit(f"--passes: unknown {', '.join(bad)}; accepted: {', '.join(PASSES)}")
    return passes


def _document(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, left_out: list[tuple[str, str]]
) -> dict[str, Any]:
    """The result document before any measurement: device, versions, commit, method, the test and
    sanitizer records given."""
    commit, dirty = _git_commit()
    vers = _versions()
    doc: dict[str, Any] = {
        "schema": "cumo-kernels-bench/1",
        "device": _device_name(device),
        "device_type": device.type,
        "capability": ("{}.{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else None),
        "torch": vers["torch"],
        "triton": vers["triton"],
        "cuda": vers["cuda"],
        "cumo_kernels": vers["cumo_kernels"],
        "python": platform.python_version(),
        **_machine(),
        "commit": commit,
        "commit_dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": bool(args.quick),
        "method": (
            f"triton.testing.do_bench median (warmup 25 ms, rep {args.rep_ms} ms) after one untimed call"
            if device.type == "cuda"
            else f"time.perf_counter median of {args.reps} runs after one warm-up call, the providers of a "
            f"(shape, pass) interleaved round-robin, {torch.get_num_threads()} threads"
        )
        + "; fwd under torch.no_grad(); fwd+bwd = forward + torch.autograd.grad into x and all parameters",
        "peak_mem_method": (
            "torch.cuda.max_memory_allocated during one call minus memory allocated before it (inputs)"
            if device.type == "cuda"
            else "not measured on CPU (null)"
        ),
        "flops": "fwd 2*T*k*(in*hidden + hidden*out), gated shapes 2*T*k*(in*2*hidden + hidden*out); "
        "fwd+bwd 3x (router not counted)",
        "ceilings": {"matmul_tflops": None, "copy_gbps": None},
        "tests": None,
        "sanitizer": None,
        "shapes": {},
        "results": [],
        "skipped": [],
        "left_out": [{"provider": n, "reason": r} for n, r in left_out],
        "complete": False,
    }
    if args.tests_json:
        with open(args.tests_json) as fh:
            doc["tests"] = json.load(fh)
    elif args.tests_junit:
        try:
            doc["tests"] = junit_counts(args.tests_junit)
        except (OSError, ET.ParseError) as exc:
            print(f"--tests-junit {args.tests_junit}: unreadable ({exc}); tests recorded as null")
    if args.sanitizer_json:
        with open(args.sanitizer_json) as fh:
            doc["sanitizer"] = json.load(fh)
    return doc


def _measure_ceilings(doc: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    if not args.no_ceilings:
        try:
            tf, how = matmul_tflops(device, dtype, reps=args.reps)
            doc["ceilings"].update(matmul_tflops=tf, matmul_how=how)
            gb, how = copy_gbps(device, reps=args.reps)
            doc["ceilings"].update(copy_gbps=gb, copy_how=how)
        except Exception as exc:
            print(f"ceilings: not measured ({_first_line(exc)})")
    if device.type == "cpu":
        doc["ceilings"]["note"] = "on CPU the ceiling to compare against is the dense provider (frac_dense)"


def _shape_info(shape: Shape, elem: int, ceilings: dict[str, Any]) -> dict[str, Any]:
    """The shape's entry of the document: its dims, FLOPs, minimal bytes and, with the ceilings
    measured, its floors."""
    info: dict[str, Any] = {
        "describe": shape.describe(),
        "tokens": shape.tokens,
        "samples": shape.samples,
        "in": shape.d_in,
        "hidden": shape.hidden,
        "out": shape.d_out,
        "experts": shape.experts,
        "top_k": shape.top_k,
        "activation": shape.activation,
        "glu": shape.glu,  # gated experts: w1 [E, 2*hidden, in], gate rows then up rows
        "w1_rows": 2 * shape.hidden if shape.glu else shape.hidden,
        "bias": shape.bias,
        "flops_fwd": shape.flops("fwd"),
        "min_bytes_fwd": shape.min_bytes(elem),
        "route_bytes": float(
            (shape.tokens * shape.d_in + shape.experts * shape.d_in) * elem + shape.tokens * shape.top_k * (elem + 8)
        ),
    }
    c = ceilings
    if c.get("matmul_tflops") and c.get("copy_gbps"):
        info["floors"] = {
            "flops_ms": info["flops_fwd"] / (c["matmul_tflops"] * 1e12) * 1e3,
            "bytes_ms": info["min_bytes_fwd"] / (c["copy_gbps"] * 1e9) * 1e3,
            "route_bytes_ms": info["route_bytes"] / (c["copy_gbps"] * 1e9) * 1e3,
        }
    return info


def _skip(doc: dict[str, Any], bar: report.Progress, label: str, skip: dict[str, Any], why: str) -> None:
    bar.step(label + " (skipped)")
    print(f"\n{label}: skipped ({why})" if bar.tty else f"{label}: skipped ({why})", file=sys.stderr)
    doc["skipped"].append({**skip, "reason": why})


class _Run:
    """One benchmark run's state: its arguments, device, result document and progress bar."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        dtype: torch.dtype,
        doc: dict[str, Any],
        bar: report.Progress,
        t_start: float,
    ):
        self.args, self.device, self.dtype, self.doc, self.bar, self.t_start = args, device, dtype, doc, bar, t_start

    def save(self) -> None:
        if self.args.out:
            report.add_ratios(self.doc["results"])
            report.write_json(self.doc, self.args.out)

    def prepare(self, provs: list, shape: Shape, inp: Inputs, pass_: str, ref: torch.Tensor | None) -> list:
        """Every provider of this (shape, pass) made ready and warmed up (its output checked
        against the loop's), or recorded as skipped with the reason."""
        args, doc, bar = self.args, self.doc, self.bar
        ready: list[tuple[Any, Any, dict[str, Any], float | None]] = []
        for prov in provs:
            label = f"{shape.name} {pass_} {prov.name}"
            skip = {"shape": shape.name, "pass": pass_, "provider": prov.name}
            if args.time_budget is not None and time.monotonic() - self.t_start > args.time_budget:
                doc["skipped"].append({**skip, "reason": f"time budget of {args.time_budget:g} s spent"})
                bar.step(label + " (time budget spent)")
                continue
            why = prov.refuses(shape, self.device, self.dtype)
            if why is None:
                try:
                    fn = make_call(prov, shape, inp, pass_)
                    out = fn()  # warm-up (and the output checked below)
                    sync(self.device)
                    err = None
                    if pass_ == "fwd" and ref is not None and not prov.is_dense:
                        err = _rel_err(out[0], ref)  # type: ignore[index]
                    del out
                except Exception as exc:
                    why = _first_line(exc)
            if why is not None:
                _skip(doc, bar, label, skip, why)
                continue
            ready.append((prov, fn, skip, err))
        return ready

    def time(self, ready: list, shape: Shape, pass_: str) -> None:
        """Time the ready providers (on the CPU interleaved round-robin, rotating the order each
        round, so that load from other processes falls on every provider alike) and record rows."""
        args, device, doc, bar = self.args, self.device, self.doc, self.bar
        if device.type == "cpu":
            all_ms = bench_interleaved([fn for _, fn, _, _ in ready], reps=args.reps)
        for i, (prov, fn, skip, err) in enumerate(ready):
            label = f"{shape.name} {pass_} {prov.name}"
            try:
                ms = all_ms[i] if device.type == "cpu" else bench_ms(fn, device, reps=args.reps, rep_ms=args.rep_ms)
                mem = peak_mem_gib(fn, device)
            except Exception as exc:
                _skip(doc, bar, label, skip, _first_line(exc))
                continue
            row = {**skip, "ms": ms, "tflops": shape.flops(pass_) / (ms * 1e-3) / 1e12, "peak_mem_gib": mem}
            if err is not None:
                row["rel_err_vs_loop"] = err
            doc["results"].append(row)
            self.save()
            bar.step(label)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def shape(self, shape: Shape, provs: list, passes: list[str]) -> None:
        """Every pass of one shape: its document entry, inputs, the loop's reference output, and
        each pass's providers prepared, then timed."""
        args, device, dtype, doc = self.args, self.device, self.dtype, self.doc
        if shape.unsupported:
            print(f"shape {shape.name}: skipped ({shape.unsupported})")
            doc["skipped"].append({"shape": shape.name, "pass": "-", "provider": "-", "reason": shape.unsupported})
            return
        doc["shapes"][shape.name] = _shape_info(shape, torch.empty(0, dtype=dtype).element_size(), doc["ceilings"])
        inp: Inputs = make_inputs(shape, dtype, device, seed=args.seed)
        ref = None
        if not args.no_check and not shape.hf_family:  # (hf-*: tests/test_hf.py checks them)
            try:
                with torch.no_grad():
                    ref = loop_forward(inp, shape)[0]
            except Exception as exc:
                print(f"{shape.name}: no cumo-loop reference for the error column ({_first_line(exc)})")
        for pass_ in passes:
            ready = self.prepare(provs, shape, inp, pass_, ref)
            self.time(ready, shape, pass_)
            del ready
        if args.plot and device.type == "cuda":
            report.plot(doc, args.plot)  # after every shape: a run cut off still returns its plot
        for t in inp.params():
            t.grad = None
        del inp, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self) -> None:
        args, doc = self.args, self.doc
        self.bar.close()
        doc["complete"] = True
        doc["wall_s"] = round(time.monotonic() - self.t_start, 1)
        report.add_ratios(doc["results"])
        self.save()
        print(report.table(doc))
        problems = schema.validate(doc)
        if problems:
            print("result JSON has schema problems:\n  " + "\n  ".join(problems))
        if args.out:
            print(f"wrote {args.out}")
        if args.plot:
            why = report.plot(doc, args.plot)
            print(f"plot skipped: {why}" if why else f"wrote {args.plot}")


def run(args: argparse.Namespace) -> int:
    """The benchmark run `args` asks for: the document, the ceilings, then shape by shape."""
    t_start = time.monotonic()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    picked = _device_and_dtype(args)
    if picked is None:
        return 2
    device, dtype = picked
    passes = _passes(args)
    shapes = _shapes(args, device)
    wanted = [p.strip() for p in args.providers.split(",")] if args.providers else None
    provs, left_out = providers_for(device, wanted)
    if device.type == "cpu":
        print(
            f"No CUDA device in use: running the CPU path ({str(dtype).removeprefix('torch.')}, "
            f"{torch.get_num_threads()} threads, time.perf_counter median of {args.reps} runs after warm-up). "
            "GPU figures need a GPU: run benchmarks/gpu_suite.sh on a lent device (benchmarks/README.md)."
        )
    for name, why in left_out:
        print(f"provider {name}: not run ({why})")
    doc = _document(args, device, dtype, left_out)
    _measure_ceilings(doc, args, device, dtype)
    bar = report.Progress(len([s for s in shapes if not s.unsupported]) * len(passes) * len(provs))
    state = _Run(args, device, dtype, doc, bar, t_start)
    state.save()
    for shape in shapes:
        state.shape(shape, provs, passes)
    state.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.validate:
        with open(args.validate) as fh:
            doc = json.load(fh)
        problems = schema.validate(doc)
        for line in problems:
            print(line)
        print(f"{args.validate}: {'valid' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    try:
        return run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
