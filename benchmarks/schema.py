"""The result file's schema (DESIGN.md, "Result file") and its validator.

`validate(doc) -> list[str]` returns the problems found (empty: valid). Required:
device, torch, triton, cuda (versions; triton and cuda may be null on a CPU run), commit,
date (ISO 8601), ceilings {matmul_tflops, copy_gbps}, tests ({passed, failed, skipped} or null),
sanitizer (per tool {status, ...} or null), results: rows {shape, pass, provider, ms, tflops,
peak_mem_gib}. Extra fields are allowed.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

PASSES = ("fwd", "fwd+bwd")
SANITIZER_STATUS = ("clean", "errors", "skipped", "not run", "timeout", "failed")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(doc: Any) -> list[str]:
    p: list[str] = []
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    for key in ("device", "torch", "commit", "date"):
        if not isinstance(doc.get(key), str) or not doc.get(key):
            p.append(f"{key}: expected a non-empty string, got {doc.get(key)!r}")
    for key in ("triton", "cuda"):
        if key not in doc:
            p.append(f"{key}: missing (a version string, or null when absent)")
        elif doc[key] is not None and not isinstance(doc[key], str):
            p.append(f"{key}: expected a string or null, got {doc[key]!r}")
    if isinstance(doc.get("date"), str):
        try:
            _dt.datetime.fromisoformat(doc["date"])
        except ValueError:
            p.append(f"date: not ISO 8601: {doc['date']!r}")
    ceil = doc.get("ceilings")
    if not isinstance(ceil, dict):
        p.append("ceilings: expected an object {matmul_tflops, copy_gbps}")
    else:
        for key in ("matmul_tflops", "copy_gbps"):
            v = ceil.get(key, "missing")
            if v is not None and not (_num(v) and v > 0):
                p.append(f"ceilings.{key}: expected a positive number or null, got {v!r}")
    if "tests" not in doc:
        p.append("tests: missing (an object {passed, failed, skipped}, or null when not run)")
    elif doc["tests"] is not None:
        t = doc["tests"]
        if not isinstance(t, dict):
            p.append("tests: expected an object or null")
        else:
            for key in ("passed", "failed", "skipped"):
                v = t.get(key)
                if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                    p.append(f"tests.{key}: expected a non-negative integer, got {v!r}")
    if "sanitizer" not in doc:
        p.append("sanitizer: missing (per tool {status, ...}, or null when not run)")
    elif doc["sanitizer"] is not None:
        s = doc["sanitizer"]
        if not isinstance(s, dict):
            p.append("sanitizer: expected an object or null")
        else:
            for tool, rec in s.items():
                if not isinstance(rec, dict) or rec.get("status") not in SANITIZER_STATUS:
                    p.append(f"sanitizer.{tool}: expected {{status: one of {', '.join(SANITIZER_STATUS)}}}")
                elif rec["status"] in ("skipped", "not run", "failed", "timeout") and not rec.get("reason"):
                    p.append(f"sanitizer.{tool}: status {rec['status']!r} needs a reason")
    rows = doc.get("results")
    if not isinstance(rows, list):
        p.append("results: expected a list of rows")
        return p
    seen = set()
    for i, r in enumerate(rows):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            p.append(f"{where}: expected an object")
            continue
        for key in ("shape", "provider"):
            if not isinstance(r.get(key), str) or not r.get(key):
                p.append(f"{where}.{key}: expected a non-empty string, got {r.get(key)!r}")
        if r.get("pass") not in PASSES:
            p.append(f"{where}.pass: expected one of {PASSES}, got {r.get('pass')!r}")
        if not (_num(r.get("ms")) and r["ms"] > 0):
            p.append(f"{where}.ms: expected a positive number, got {r.get('ms')!r}")
        if not (_num(r.get("tflops")) and r["tflops"] >= 0):
            p.append(f"{where}.tflops: expected a non-negative number, got {r.get('tflops')!r}")
        if "peak_mem_gib" not in r:
            p.append(f"{where}.peak_mem_gib: missing (a number, or null where not measured)")
        elif r["peak_mem_gib"] is not None and not _num(r["peak_mem_gib"]):
            p.append(f"{where}.peak_mem_gib: expected a number or null, got {r['peak_mem_gib']!r}")
        key = (r.get("shape"), r.get("pass"), r.get("provider"))
        if key in seen:
            p.append(f"{where}: duplicate row {key}")
        seen.add(key)
    return p
