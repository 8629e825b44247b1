"""Helpers of benchmarks/gpu_suite.sh: turn the pytest and compute-sanitizer logs into the
`tests` and `sanitizer` objects of the result JSON.

    python -m benchmarks.suite_tools tests JUNIT_XML PYTEST_LOG RC OUT_JSON
    python -m benchmarks.suite_tools sanitizer LOG_DIR OUT_JSON   (reads LOG_DIR/sanitizer-<tool>.log, .rc)
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
    if len(argv) == 5 and argv[0] == "tests":
        rec = tests_record(argv[1], argv[2], int(argv[3]))
        out = argv[4]
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
