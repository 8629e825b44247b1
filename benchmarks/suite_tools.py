"""Helpers of benchmarks/gpu_suite.sh: turn the pytest and compute-sanitizer logs into the
`tests` and `sanitizer` objects of the result JSON, and put them into the result file.

    python -m benchmarks.suite_tools tests OUT_JSON NAME JUNIT_XML PYTEST_LOG RC [NAME JUNIT_XML PYTEST_LOG RC ...]
    python -m benchmarks.suite_tools sanitizer LOG_DIR OUT_JSON   (reads LOG_DIR/sanitizer-<tool>.log, .rc)
    python -m benchmarks.suite_tools finalize RESULTS_JSON TESTS_JSON SANITIZER_JSON
        (the records into RESULTS_JSON; a valid result file with no rows when the benchmark
        never wrote one; a missing record file leaves that field as it is, or null)
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

TOOLS = ("memcheck", "racecheck", "initcheck")
TIMEOUT_RCS = (124, 137, 130)


def tests_record(junit: str, log: str, rc: int) -> dict[str, Any]:
    from .cli import junit_counts

    rec: dict[str, Any] | None = None
    if os.path.exists(junit):
        try:
            rec = junit_counts(junit)
        except Exception as exc:  # a truncated file: fall back to the log
            print(f"suite_tools: {junit} unreadable ({exc})", file=sys.stderr)
    if rec is None:
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "errors")}
        tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)]
        if tail:
            for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", tail[-1]):
                counts[k] += int(n)
        rec = {
            "passed": counts["passed"],
            "failed": counts["failed"] + counts["error"] + counts["errors"],
            "skipped": counts["skipped"],
            "source": "pytest log summary line" if tail else "nothing readable",
        }
    rec["exit_code"] = rc
    if rc in TIMEOUT_RCS:
        rec["interrupted"] = "the test run hit the suite's time limit: counts cover the tests that finished"
    elif rc not in (0, 1, 5):
        rec["note"] = f"pytest exited {rc} (2 interrupted, 3 internal error, 4 usage error)"
    return rec


BACKENDS = ("cuda", "triton", "torch", "auto")


def backend_of(classname: str, name: str) -> str:
    """The backend a CUDA test exercises, from its junit classname and name: the `cuda-<backend>`
    parameter id, else the GPU-only file it is in (test_cuda_* the extension, test_triton_* Triton)."""
    m = re.search(r"\bcuda-(cuda|triton|torch|auto)\b", name)
    if m:
        return m.group(1)
    if "test_cuda" in classname:
        return "cuda"
    if "test_triton" in classname:
        return "triton"
    return "other"


def junit_by_backend(path: str) -> dict[str, dict[str, int]]:
    """{backend: {passed, failed, skipped}} over the testcases of a junit XML."""
    import xml.etree.ElementTree as ET

    out: dict[str, dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        b = backend_of(case.get("classname", ""), case.get("name", ""))
        rec = out.setdefault(b, {"passed": 0, "failed": 0, "skipped": 0})
        kids = {c.tag for c in case}
        if kids & {"failure", "error"}:
            rec["failed"] += 1
        elif "skipped" in kids:
            rec["skipped"] += 1
        else:
            rec["passed"] += 1
    return out


def tests_phases(phases: list[tuple[str, str, str, int]]) -> dict[str, Any]:
    """The `tests` record of several pytest runs (name, junit, log, rc), in the order they ran:
    the sums, each phase's own record, counts per backend, and `interrupted` when any phase hit its
    time limit. `exit_code` is 0 only when every phase exited 0."""
    total: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "phases": {}, "by_backend": {}}
    worst = 0
    for name, junit, log, rc in phases:
        rec = tests_record(junit, log, rc)
        total["phases"][name] = rec
        for k in ("passed", "failed", "skipped"):
            total[k] += rec[k]
        if rc != 0 and worst == 0:
            worst = rc
        if "interrupted" in rec:
            total["interrupted"] = f"phase {name}: {rec['interrupted']}"
        if os.path.exists(junit):
            try:
                for b, c in junit_by_backend(junit).items():
                    acc = total["by_backend"].setdefault(b, {"passed": 0, "failed": 0, "skipped": 0})
                    for k in acc:
                        acc[k] += c[k]
            except Exception as exc:
                print(f"suite_tools: {junit}: no per-backend counts ({exc})", file=sys.stderr)
    total["exit_code"] = worst
    total["total"] = total["passed"] + total["failed"] + total["skipped"]
    return total


def finalize(results: str, tests_json: str, sanitizer_json: str) -> dict[str, Any]:
    """Put the tests and sanitizer records into the result file (written atomically); when the
    benchmark never wrote one, write a valid file with no rows that says why."""
    from . import report
    from .cli import _device_name, _git_commit, _machine, _versions

    if os.path.exists(results):
        with open(results) as fh:
            doc = json.load(fh)
    else:
        import datetime as dt
        import platform

        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        commit, dirty = _git_commit()
        vers = _versions()
        doc = {
            "schema": "cumo-kernels-bench/1",
            "device": _device_name(device),
            "device_type": device.type,
            "torch": vers["torch"],
            "triton": vers["triton"],
            "cuda": vers["cuda"],
            "cumo_kernels": vers["cumo_kernels"],
            "python": platform.python_version(),
            **_machine(),
            "commit": commit,
            "commit_dirty": dirty,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "ceilings": {"matmul_tflops": None, "copy_gbps": None},
            "tests": None,
            "sanitizer": None,
            "shapes": {},
            "results": [],
            "skipped": [],
            "complete": False,
            "note": "the benchmark step did not run or wrote nothing before it was stopped (see logs.tar.gz)",
        }
    for key, path in (("tests", tests_json), ("sanitizer", sanitizer_json)):
        if os.path.exists(path):
            with open(path) as fh:
                doc[key] = json.load(fh)
    report.write_json(doc, results)
    return doc


def sanitizer_record(logdir: str, tool: str) -> dict[str, Any]:
    log = os.path.join(logdir, f"sanitizer-{tool}.log")
    rc_file = os.path.join(logdir, f"sanitizer-{tool}.rc")
    if not os.path.exists(log):
        return {"status": "not run", "reason": "no log (the suite did not reach this step)"}
    text = open(log, errors="replace").read()
    rc = int(open(rc_file).read().strip() or -1) if os.path.exists(rc_file) else None
    if "Device not supported" in text or "device not supported" in text.lower():
        return {
            "status": "skipped",
            "reason": 'compute-sanitizer refused the device ("Device not supported"; seen on gVisor machines)',
            "exit_code": rc,
        }
    if text.startswith("NOT RUN:"):
        return {"status": "not run", "reason": text.splitlines()[0].removeprefix("NOT RUN:").strip(), "exit_code": rc}
    m = re.findall(r"ERROR SUMMARY:\s*(\d+) error", text)
    r = re.findall(r"RACECHECK SUMMARY:.*?\((\d+) errors?, (\d+) warnings?\)", text)
    case_ok = "SANITIZE_CASE OK" in text
    rec: dict[str, Any] = {"exit_code": rc, "case_completed": case_ok}
    if r:
        rec["errors"], rec["warnings"] = int(r[-1][0]), int(r[-1][1])
    elif m:
        rec["errors"] = int(m[-1])
    if rc in TIMEOUT_RCS and not (m or r):
        rec.update(status="timeout", reason="killed at the suite's time limit before the summary")
        return rec
    if "errors" not in rec:
        rec.update(status="failed", reason="no sanitizer summary in the log (see the log in the tarball)")
        return rec
    rec["status"] = "errors" if rec["errors"] else "clean"
    if not case_ok:
        rec["reason"] = "the case itself did not finish cleanly (a backend raised): see the log"
        if rec["status"] == "clean":
            rec["status"] = "failed"
    if rec["status"] == "errors":
        first = [ln for ln in text.splitlines() if ln.startswith("========= ") and "SUMMARY" not in ln][:6]
        rec["first_lines"] = first
    return rec


def main(argv: list[str]) -> int:
    if len(argv) >= 6 and argv[0] == "tests" and (len(argv) - 2) % 4 == 0:
        out = argv[1]
        rest = argv[2:]
        rec = tests_phases([(rest[i], rest[i + 1], rest[i + 2], int(rest[i + 3])) for i in range(0, len(rest), 4)])
    elif len(argv) == 4 and argv[0] == "finalize":
        doc = finalize(argv[1], argv[2], argv[3])
        print(f"{argv[1]}: tests {json.dumps(doc.get('tests'))[:200]}; {len(doc['results'])} result rows")
        return 0
    elif len(argv) == 3 and argv[0] == "sanitizer":
        rec = {tool: sanitizer_record(argv[1], tool) for tool in TOOLS}
        out = argv[2]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    with open(out, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
