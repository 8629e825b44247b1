"""What "auto" tries first on a GPU, from benchmark measurements.

`auto` on CUDA tensors tries the backends in a static order (dispatch._AUTO_ORDER) unless a
measurement table says otherwise for the workload at hand. The table is a JSON file: the one
shipped in the package (`auto_table.json`, made by `python -m benchmarks.auto_table` from the
committed GPU result files), or the file named by $CUMO_KERNELS_AUTO_TABLE (measure your own GPU:
`python -m benchmarks --out r.json`, then `python -m benchmarks.auto_table r.json --out t.json`).

Each entry is one measured (device, dtype, layer shape, pass) with the cumo backends fastest
first:

    {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "dtype": "bfloat16",
     "pass": "fwd+bwd", "tokens": 23080, "in": 1024, "hidden": 4096, "out": 1024,
     "experts": 4, "top_k": 2, "order": ["cuda", "triton", "torch"],
     "ms": {"cuda": 4.1, "triton": 4.6, "torch": 9.9}, "source": "benchmarks/results/..."}

A layer call matches the entries of its GPU (same device name; else same compute capability),
dtype and pass ("fwd+bwd" when autograd will need gradients, else "fwd"), and takes the order of
the entry nearest in FLOPs per call, preferring one with the same E, top_k and layer widths, if
that entry is within a factor of 8 in FLOPs; otherwise the static order. The choice is per layer
shape and pass (the benchmarks time whole layers, not single ops); backends a measured order
leaves out are tried after it, in the static order.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "CUMO_KERNELS_AUTO_TABLE"
TABLE_FILE = Path(__file__).with_name("auto_table.json")
SCHEMA = "cumo-kernels-auto-table/1"
PASSES = ("fwd", "fwd+bwd")
BACKENDS = ("cuda", "triton", "torch")
# An entry further than this factor in FLOPs per call from the workload is not used.
MAX_FLOPS_RATIO = 8.0


@dataclass(frozen=True)
class Workload:
    """One MoE layer call: tokens T, widths in -> hidden -> out, E experts, top_k, dtype name
    ("bfloat16", ...) and pass ("fwd" or "fwd+bwd")."""

    tokens: int
    d_in: int
    hidden: int
    d_out: int
    experts: int
    top_k: int
    dtype: str
    pass_: str

    @property
    def flops(self) -> float:
        """Forward FLOPs of the two expert layers (fwd+bwd: three times), as the benchmarks count."""
        f = 2.0 * self.tokens * self.top_k * (self.d_in * self.hidden + self.hidden * self.d_out)
        return 3 * f if self.pass_ == "fwd+bwd" else f


def check_table(doc: object, where: str = "auto table") -> list[dict]:
    """The entries of a table document, checked; raises ValueError naming the first bad field."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{where}: expected {{'schema': {SCHEMA!r}, 'entries': [...]}}")
    out = []
    for i, e in enumerate(doc["entries"]):
        at = f"{where}: entries[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{at}: expected an object")
        for key in ("device", "dtype"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise ValueError(f"{at}.{key}: expected a non-empty string, got {e.get(key)!r}")
        if e.get("pass") not in PASSES:
            raise ValueError(f"{at}.pass: expected one of {PASSES}, got {e.get('pass')!r}")
        for key in ("tokens", "in", "hidden", "out", "experts", "top_k"):
            v = e.get(key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{at}.{key}: expected a positive integer, got {v!r}")
        order = e.get("order")
        if (
            not isinstance(order, list)
            or not order
            or any(b not in BACKENDS for b in order)
            or len(set(order)) != len(order)
        ):
            raise ValueError(f"{at}.order: expected distinct backends from {BACKENDS}, got {order!r}")
        if e.get("capability") is not None and not isinstance(e["capability"], str):
            raise ValueError(f"{at}.capability: expected a string such as '9.0' or null")
        out.append(e)
    return out


@functools.lru_cache(maxsize=8)
def _load(path: str) -> tuple[dict, ...]:
    p = Path(path)
    if not p.exists():
        if path == str(TABLE_FILE):
            return ()  # no measured table shipped: the static order
        raise FileNotFoundError(f"{ENV_VAR}={path}: no such file")
    return tuple(check_table(json.loads(p.read_text()), where=str(p)))


def reload() -> None:
    """Forget the tables read and the lookups made so far (after the file changed on disk)."""
    _load.cache_clear()
    _order_for.cache_clear()


def table() -> tuple[dict, ...]:
    """The measurement table in use ($CUMO_KERNELS_AUTO_TABLE, else the packaged file)."""
    return _load(os.environ.get(ENV_VAR) or str(TABLE_FILE))


def _entry_flops(e: dict) -> float:
    w = Workload(e["tokens"], e["in"], e["hidden"], e["out"], e["experts"], e["top_k"], e["dtype"], e["pass"])
    return w.flops


def lookup(entries: tuple[dict, ...] | list[dict], device: str, capability: str | None, w: Workload) -> dict | None:
    """The entry whose measured order applies to workload `w` on GPU `device` (its name) with
    compute capability `capability` ("9.0"), or None (see the module docstring)."""
    fitting = [e for e in entries if e["dtype"] == w.dtype and e["pass"] == w.pass_]
    cands = [e for e in fitting if e["device"] == device]
    if not cands and capability is not None:
        cands = [e for e in fitting if e.get("capability") == capability]
    if not cands or w.flops <= 0:
        return None

    def distance(e: dict) -> tuple[float, int]:
        same_layer = (e["in"], e["hidden"], e["out"], e["experts"], e["top_k"]) == (
            w.d_in,
            w.hidden,
            w.d_out,
            w.experts,
            w.top_k,
        )
        return abs(math.log(_entry_flops(e) / w.flops)), 0 if same_layer else 1

    best = min(cands, key=lambda e: (distance(e)[1], distance(e)[0]))
    if distance(best)[0] > math.log(MAX_FLOPS_RATIO):
        best = min(cands, key=lambda e: distance(e)[0])
        if distance(best)[0] > math.log(MAX_FLOPS_RATIO):
            return None
    return best


@functools.lru_cache(maxsize=16)
def device_key(index: int) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device `index`."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def measured_order(device: torch.device, w: Workload) -> tuple[str, ...] | None:
    """The backends in measured order for workload `w` on CUDA device `device`, or None where the
    table has no entry that applies (then auto's static order stands)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _order_for(os.environ.get(ENV_VAR) or str(TABLE_FILE), index, w)


@functools.lru_cache(maxsize=1024)
def _order_for(path: str, index: int, w: Workload) -> tuple[str, ...] | None:
    """measured_order's lookup, once per (table file, device, workload): a layer called every step
    with the same shape does not scan the table again."""
    entries = _load(path)
    if not entries:
        return None
    name, cap = device_key(index)
    e = lookup(entries, name, cap, w)
    return None if e is None else tuple(e["order"])
