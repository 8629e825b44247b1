"""Derived figures, the terminal table, the JSON file and the plot."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# The loop and the sorted grouped_mm baselines: CuMo's and ours for moe_mlp's shapes; transformers'
# own "eager" and "grouped_mm" experts (hf-*) for the transformers families' blocks and the gated shapes.
BASELINES = ("cumo-loop", "grouped_mm", "hf-eager", "hf-grouped_mm")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per row: fraction of the dense provider's TFLOP/s, and speed-up over each baseline (same shape, pass)."""
    by = {(r["shape"], r["pass"], r["provider"]): r for r in rows}
    for r in rows:
        dense = by.get((r["shape"], r["pass"], "dense"))
        r["frac_dense"] = None if dense is None or not dense["tflops"] else r["tflops"] / dense["tflops"]
        for base in BASELINES:
            b = by.get((r["shape"], r["pass"], base))
            r[f"speedup_vs_{base}"] = None if b is None else b["ms"] / r["ms"]


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _either(row: dict[str, Any], base: str, hf_base: str) -> float | None:
    """The row's speed-up over `base`, or over `hf_base` where `base` did not run."""
    v = row.get(f"speedup_vs_{base}")
    return v if v is not None else row.get(f"speedup_vs_{hf_base}")


def table(doc: dict[str, Any]) -> str:
    """`vs loop`: over cumo-loop; `vs gmm`: over grouped_mm, else hf-grouped_mm; `vs eager`: over
    hf-eager (transformers' eager experts)."""
    unit = "TFLOP/s" if doc.get("device_type") == "cuda" else "GFLOP/s"
    scale = 1.0 if unit == "TFLOP/s" else 1e3
    w = max([22] + [len(r["shape"]) for r in doc["results"]] + [len(r["shape"]) for r in doc.get("skipped", [])])
    pw = max([13] + [len(r["provider"]) for r in doc["results"]])
    head = f"{'shape':<{w}} {'pass':<8} {'provider':<{pw}} {'ms':>10} {unit:>8} {'x dense':>8} "
    head += f"{'vs loop':>8} {'vs gmm':>7} {'vs eager':>8} {'peak GiB':>9} {'err/loop':>9}"
    lines = [head, "-" * len(head)]
    for r in doc["results"]:
        lines.append(
            f"{r['shape']:<{w}} {r['pass']:<8} {r['provider']:<{pw}} {r['ms']:>10.3f} {r['tflops'] * scale:>8.2f} "
            f"{_f(r.get('frac_dense'), '.2f'):>8} {_f(r.get('speedup_vs_cumo-loop'), '.2f'):>8} "
            f"{_f(_either(r, 'grouped_mm', 'hf-grouped_mm'), '.2f'):>7} {_f(r.get('speedup_vs_hf-eager'), '.2f'):>8} "
            f"{_f(r.get('peak_mem_gib'), '.3f'):>9} {_f(r.get('rel_err_vs_loop'), '.1e'):>9}"
        )
    for s in doc.get("skipped", []):
        lines.append(f"{s['shape']:<{w}} {s['pass']:<8} {s['provider']:<{pw}} skipped: {s['reason']}")
    c = doc.get("ceilings", {})
    if c.get("matmul_tflops") is None and c.get("copy_gbps") is None:
        lines.append("ceilings: not measured")
    else:
        lines.append(
            f"ceilings: matmul {_f(c.get('matmul_tflops'), '.3f')} TFLOP/s ({c.get('matmul_how', '')}), "
            f"copy {_f(c.get('copy_gbps'), '.1f')} GB/s ({c.get('copy_how', '')})"
        )
    for name, info in doc.get("shapes", {}).items():
        fl = info.get("floors") or {}
        if fl:
            lines.append(
                f"floors {name}: fwd FLOPs {info['flops_fwd'] / 1e9:.1f} G -> {_f(fl.get('flops_ms'), '.3f')} ms "
                f"at the matmul ceiling; min bytes {info['min_bytes_fwd'] / 2**20:.1f} MiB -> "
                f"{_f(fl.get('bytes_ms'), '.3f')} ms at the copy ceiling"
            )
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    """Write atomically (a run cut off mid-write leaves the previous complete file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def plot(doc: dict[str, Any], path: str) -> str | None:
    """A bar chart per pass: throughput per shape and provider. Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib is not importable ({type(exc).__name__}: {exc})"
    rows = doc["results"]
    if not rows:
        return "no results to plot"
    cuda = doc.get("device_type") == "cuda"
    scale, unit = (1.0, "TFLOP/s") if cuda else (1e3, "GFLOP/s")
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(
        len(passes), 1, figsize=(max(8, 1.6 * len(shapes) * max(1, len(provs)) / 4), 4 * len(passes))
    )
    if len(passes) == 1:
        axes = [axes]
    width = 0.8 / max(len(provs), 1)
    by = {(r["shape"], r["pass"], r["provider"]): r for r in rows}
    for ax, p in zip(axes, passes):
        for j, prov in enumerate(provs):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                r = by.get((s, p, prov))
                if r is not None:
                    xs.append(i + j * width - 0.4 + width / 2)
                    ys.append(r["tflops"] * scale)
            ax.bar(xs, ys, width, label=prov)
        ceil = doc.get("ceilings", {}).get("matmul_tflops")
        if cuda and ceil:
            ax.axhline(ceil, color="k", ls="--", lw=0.8, label="torch.mm ceiling")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=15, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(f"{p} - {doc['device']} - {doc.get('dtype', '')}", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    # Written beside, then renamed: a run killed while saving leaves the previous plot whole.
    tmp = path + ".part.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done = max(total, 1), 0
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        n = 24 * self.done // self.total
        line = f"[{'#' * n}{'.' * (24 - n)}] {self.done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
