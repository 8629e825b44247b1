"""Make auto's measurement table (cumo_kernels/tuning.py) from GPU benchmark result files.

    python -m benchmarks.auto_table RESULTS.json [RESULTS.json ...] [--out FILE]

For every (shape, pass) of each CUDA result file, the cumo backends that were timed
(cumo-cuda, cumo-triton, cumo-torch) become one entry, fastest first. The output (default:
cumo_kernels/auto_table.json, which the package ships) is what `auto` reads on a GPU; point
$CUMO_KERNELS_AUTO_TABLE at another file to use your own measurements.

A CUDA result file is refused unless its run is known good: auto should not prefer a backend on
the strength of a run in which something was wrong or that checked nothing. Its `tests` record
(benchmarks/suite_tools.py) must be present, not `interrupted`, with pytest's exit code 0 (not 1,
failures; 2-4; nor 5, no tests collected), `failed` 0 and at least one test passed; and no
`sanitizer` tool may have status "errors", "failed" or "timeout" ("clean", "skipped", "not run",
or no sanitizer record at all, are fine). --allow-failed-tests takes the timings anyway (the
reasons are printed). CPU result files are skipped (auto on CPU tensors is always the torch
backend). Where several files measured the same (device, dtype, pass, shape), the newest (by its
`date`) wins.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from cumo_kernels import tuning

from .schema import validate

PROVIDERS = {"cumo-cuda": "cuda", "cumo-triton": "triton", "cumo-torch": "torch"}
DEFAULT_OUT = Path(tuning.__file__).with_name("auto_table.json")


def entries_of(doc: dict, source: str) -> list[dict]:
    """The table entries of one (valid, CUDA) result document."""
    timed: dict[tuple[str, str], dict[str, float]] = {}
    for row in doc["results"]:
        backend = PROVIDERS.get(row.get("provider"))
        ms = row.get("ms")
        if backend is None or not isinstance(ms, (int, float)) or ms <= 0:
            continue
        timed.setdefault((row["shape"], row["pass"]), {})[backend] = float(ms)
    out = []
    for (shape, pass_), ms in sorted(timed.items()):
        dims = doc["shapes"].get(shape)
        if dims is None:
            raise ValueError(f"{source}: results name shape {shape!r}, which `shapes` does not describe")
        if dims.get("glu"):
            # Gated shapes stay out: moe_mlp's gated calls take auto's static order, and a gated
            # entry would steer plain calls of similar widths (lookup matches by FLOPs and widths).
            continue
        out.append(
            {
                "device": doc["device"],
                "capability": doc.get("capability"),
                "dtype": doc["dtype"],
                "pass": pass_,
                "shape": shape,
                "tokens": int(dims["tokens"]),
                "in": int(dims["in"]),
                "hidden": int(dims["hidden"]),
                "out": int(dims["out"]),
                "experts": int(dims["experts"]),
                "top_k": int(dims["top_k"]),
                "activation": dims.get("activation"),
                "samples": dims.get("samples"),
                "order": sorted(ms, key=ms.__getitem__),
                "ms": {b: round(v, 4) for b, v in sorted(ms.items(), key=lambda kv: kv[1])},
                "source": source,
                "commit": doc["commit"],
                "date": doc["date"],
            }
        )
    return out


SANITIZER_BAD = ("errors", "failed", "timeout")
RC_MEANING = {1: "tests failed", 2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


def _count(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def run_problems(doc: dict) -> list[str]:
    """Why a result document's test and sanitizer records do not show a good run (empty: they do)."""
    problems = []
    tests = doc.get("tests")
    if not isinstance(tests, dict):
        problems.append("it records no test run (`tests` is null or missing): run the tests with the benchmarks")
    else:
        rc = tests.get("exit_code")
        if tests.get("interrupted"):
            problems.append(f"its test run was interrupted ({tests['interrupted']})")
        if rc is None:
            problems.append(
                "its test record has no pytest exit code (`tests.exit_code`), so it cannot show a finished run"
            )
        elif rc != 0:
            why = RC_MEANING.get(rc, "killed at the suite's time limit" if rc in (124, 130, 137) else "unknown")
            problems.append(f"its test run exited {rc} ({why}), not 0")
        failed = _count(tests.get("failed"))
        if failed is None or failed > 0:
            problems.append(f"its test run had {tests.get('failed')} failures")
        passed = _count(tests.get("passed"))
        if passed is None or passed < 1:
            problems.append(f"its test run passed {tests.get('passed')} tests (at least one must pass)")
    sanitizer = doc.get("sanitizer")
    if isinstance(sanitizer, dict):
        for tool, rec in sorted(sanitizer.items()):
            status = rec.get("status") if isinstance(rec, dict) else None
            if status in SANITIZER_BAD:
                reason = rec.get("reason") or (f"{rec.get('errors')} errors" if status == "errors" else "")
                problems.append(f"sanitizer {tool}: {status}" + (f" ({reason})" if reason else ""))
    return problems


def _when(date: str) -> dt.datetime:
    """A result file's ISO date, as UTC where it names no zone (so that dates compare)."""
    d = dt.datetime.fromisoformat(date)
    return d if d.tzinfo is not None else d.replace(tzinfo=dt.timezone.utc)


def build(paths: list[Path], allow_failed_tests: bool = False) -> tuple[dict, list[str]]:
    """(table document, notes on what was skipped). Raises ValueError on a file it must refuse."""
    notes: list[str] = []
    merged: dict[tuple, dict] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        problems = validate(doc)
        if problems:
            raise ValueError(f"{path}: not a valid result file: " + "; ".join(problems[:3]))
        if doc.get("device_type") != "cuda":
            notes.append(f"{path}: skipped, a {doc.get('device_type')} run (auto on CPU tensors is the torch backend)")
            continue
        problems = run_problems(doc)
        if problems and not allow_failed_tests:
            raise ValueError(
                f"{path}: refused: " + "; ".join(problems) + ". Fix that and rerun, or pass "
                "--allow-failed-tests to take its timings anyway"
            )
        for problem in problems:
            notes.append(f"{path}: taken despite: {problem} (--allow-failed-tests)")
        for e in entries_of(doc, str(path)):
            key = (e["device"], e["dtype"], e["pass"], e["tokens"], e["in"], e["hidden"], e["out"], e["experts"])
            key += (e["top_k"], str(e["activation"]), str(e["samples"]))
            old = merged.get(key)
            if old is None or _when(e["date"]) >= _when(old["date"]):
                merged[key] = e
    doc = {"schema": tuning.SCHEMA, "entries": [merged[k] for k in sorted(merged, key=str)]}
    tuning.check_table(doc)
    return doc, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.auto_table", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="result files of python -m benchmarks (GPU runs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"table to write (default {DEFAULT_OUT})")
    p.add_argument(
        "--allow-failed-tests",
        action="store_true",
        help="take timings from runs whose tests or sanitizer were not clean (absent, interrupted, failed)",
    )
    args = p.parse_args(argv)
    try:
        doc, notes = build(args.results, args.allow_failed_tests)
    except (OSError, ValueError) as exc:
        print(f"auto_table: {exc}", file=sys.stderr)
        return 2
    for n in notes:
        print(n)
    if not doc["entries"]:
        print("auto_table: no CUDA timings of the cumo backends in these files; nothing written", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(doc['entries'])} entries -> {args.out}")
    for e in doc["entries"]:
        times = ", ".join(f"{b} {ms:.3f} ms" for b, ms in e["ms"].items())
        print(f"  {e['device']} {e['dtype']} {e['shape']:<18} {e['pass']:<8} {' > '.join(e['order'])}  ({times})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
