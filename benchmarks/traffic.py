"""Count the Triton layer's kernels, launch by launch: FLOPs, HBM bytes under the launch order,
act' evaluations, and the time they predict at given ceilings. No GPU needed.

    python -m benchmarks.traffic [--shapes clip-train,connector-train] [--schedule before,after]
        [--tflops 701] [--tbps 4.25] [--programs 132]

The model (benchmarks/NOTES.md, "Counting the Triton schedule"):
- Rows split evenly over the experts (T*k/E each); bf16 (2-byte) operands.
- A GEMM program streams its operand panels: the forward's A panel is BM rows x the whole K, its
  B panel the whole K x BN columns of its expert's weight; dX likewise (A = the gradient rows, B =
  the weight's columns); a dW program (expert e, N block, K block) streams e's rows of the gradient
  (M_e x BN) and of x (M_e x BK).
- Programs run in waves of `--programs` (one per SM) in launch order; L2 keeps the panels of the
  running wave and of the wave before it, so a panel is read from HBM when neither used it. Output
  tiles are written once.
- Time per launch: max(FLOPs at the matmul ceiling, bytes at the copy ceiling), plus act'
  evaluations at 2 special-function operations each (an exp and a reciprocal) on 132 SMs x 16 per
  clock x 1.98 GHz, added (a Triton main loop does not hide them behind the MMAs: an upper bound).
- "before": the schedule of commit ae22325 as the first GPU run chose it (2-D grids with the row
  tile on the fast axis, act'(pre) recomputed on every load in fc1's dX and dW, dX output tiles
  BK = 64 wide; tiles 128x128x64 forward, 64x64x64 dX and dW). "after": grouped one-dimensional
  order (GROUP = 8), act' once in its own pass, dX output tiles BN wide; tiles 128x128x64 for all.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from .shapes import NAMED, Shape

MUFU_OPS_PER_S = 132 * 16 * 1.98e9
ACT_MUFU = 2  # special-function operations per act' evaluation (exp and a reciprocal)


@dataclass
class Launch:
    name: str
    flops: float = 0.0
    bytes: float = 0.0
    act_evals: float = 0.0
    note: str = ""

    def ms(self, tflops: float, tbps: float) -> float:
        core = max(self.flops / (tflops * 1e12), self.bytes / (tbps * 1e12))
        return (core + self.act_evals * ACT_MUFU / MUFU_OPS_PER_S) * 1e3


@dataclass
class Schedule:
    name: str
    grouped: bool
    act_once: bool
    fwd_tile: tuple[int, int, int]  # BM, BN, BK
    dx_tile: tuple[int, int]  # BM, output width
    dw_tile: tuple[int, int, int]  # BM (row step), BN, BK
    group: int = 8
    launches: list[Launch] = field(default_factory=list)


SCHEDULES = {
    "before": Schedule("before", grouped=False, act_once=False, fwd_tile=(128, 128, 64), dx_tile=(64, 64),
                       dw_tile=(64, 64, 64)),
    "after": Schedule("after", grouped=True, act_once=True, fwd_tile=(128, 128, 64), dx_tile=(128, 128),
                      dw_tile=(128, 128, 64)),
}  # fmt: skip


def _order(num_m: int, num_n: int, grouped: bool, group: int) -> list[tuple[int, int]]:
    """(row tile, column tile) of each program in launch order."""
    if not grouped:  # 2-D grid, axis 0 (rows) fastest
        return [(m, n) for n in range(num_n) for m in range(num_m)]
    out = []
    for first in range(0, num_m, group):
        size = min(group, num_m - first)
        out += [(first + i, n) for n in range(num_n) for i in range(size)]
    return out


def _panel_bytes(programs: list, a_key, b_key, a_bytes, b_bytes, wave: int) -> float:
    """HBM bytes of the operand panels under the wave model: a panel is read when neither the
    running wave nor the one before it used it."""
    total, prev = 0.0, set()
    for i in range(0, len(programs), wave):
        cur = set()
        for p in programs[i : i + wave]:
            cur.add(("a", a_key(p)))
            cur.add(("b", b_key(p)))
        for key in cur - prev:
            total += a_bytes(key[1]) if key[0] == "a" else b_bytes(key[1])
        prev = cur
    return total


def _gemm_launch(
    name: str,
    rows_per_expert: list[int],
    n: int,
    k: int,
    bm: int,
    bn: int,
    sched: Schedule,
    wave: int,
    elt: int,
    a_elems_per_row: float,
    extra_out: float = 0.0,
    act_on_load: bool = False,
) -> Launch:
    """A forward-shaped grouped GEMM (forward, or dX): out[M, n] = A[M, k] @ B_e[k, n]. Row tiles
    per expert; `a_elems_per_row` elements of A (and what rides with it, e.g. pre) per row and k."""
    tiles = []  # (expert, rows in tile)
    for e, me in enumerate(rows_per_expert):
        tiles += [(e, min(bm, me - r)) for r in range(0, me, bm)]
    num_n = math.ceil(n / bn)
    progs = _order(len(tiles), num_n, sched.grouped, sched.group)
    a_bytes = lambda mt: tiles[mt][1] * k * a_elems_per_row * elt  # noqa: E731
    b_bytes = lambda eb: k * min(bn, n - eb[1] * bn) * elt  # noqa: E731
    byts = _panel_bytes(progs, lambda p: p[0], lambda p: (tiles[p[0]][0], p[1]), a_bytes, b_bytes, wave)
    m = sum(rows_per_expert)
    byts += m * n * elt + extra_out
    act = sum(tiles[mt][1] * k for mt, _ in progs) if act_on_load else 0.0
    return Launch(name, 2.0 * m * n * k, byts, act)


def _dw_launch(
    name: str, rows_per_expert: list[int], n: int, k: int, bn: int, bk: int, sched: Schedule, wave: int, elt: int,
    g_elems_per_row: float, act_on_load: bool = False,
) -> Launch:  # fmt: skip
    """dW[e] (n x k) = G_e^T X_e over e's rows: programs (e, N block, K block)."""
    num_n, num_k = math.ceil(n / bn), math.ceil(k / bk)
    progs = []
    if sched.grouped:
        for e in range(len(rows_per_expert)):
            progs += [(e, nb, kb) for nb, kb in _order(num_n, num_k, True, sched.group)]
    else:  # grid (E, N blocks, K blocks), axis 0 fastest
        progs = [(e, nb, kb) for kb in range(num_k) for nb in range(num_n) for e in range(len(rows_per_expert))]
    g_bytes = lambda key: rows_per_expert[key[0]] * min(bn, n - key[1] * bn) * g_elems_per_row * elt  # noqa: E731
    x_bytes = lambda key: rows_per_expert[key[0]] * min(bk, k - key[1] * bk) * elt  # noqa: E731
    byts = _panel_bytes(progs, lambda p: (p[0], p[1]), lambda p: (p[0], p[2]), g_bytes, x_bytes, wave)
    e = len(rows_per_expert)
    byts += e * n * k * elt
    m = sum(rows_per_expert)
    act = sum(rows_per_expert[p[0]] * min(bn, n - p[1] * bn) for p in progs) if act_on_load else 0.0
    return Launch(name, 2.0 * m * n * k, byts, act)


def layer_launches(shape: Shape, sched: Schedule, wave: int = 132, elt: int = 2) -> dict[str, list[Launch]]:
    """The Triton layer's launches for one call of `shape`: {"fwd": [...], "bwd": [...]}."""
    t, k_top, e = shape.tokens, shape.top_k, shape.experts
    d_in, hid, d_out = shape.d_in, shape.hidden, shape.d_out
    m = t * k_top
    rows = [m // e + (1 if i < m % e else 0) for i in range(e)]
    bm, bn, _ = sched.fwd_tile
    fwd = [
        Launch("route_x (x @ gate, softmax, top-k, statistics)", 2.0 * t * d_in * e, t * d_in * elt + m * 12),
        Launch("sort_experts", 0.0, m * 8 * 3),
        _gemm_launch("fc1 forward (x gathered, bias + act, pre stored)", rows, hid, d_in, bm, bn, sched, wave, elt,
                      1.0, extra_out=m * hid * elt),
        _gemm_launch("fc2 forward (rows scattered to slot order)", rows, d_out, hid, bm, bn, sched, wave, elt, 1.0),
        Launch("slot_sum (weighted sum over k)", 0.0, m * d_out * elt + t * d_out * elt + m * elt),
    ]  # fmt: skip
    dbm, dbn = sched.dx_tile
    _, wbn, wbk = sched.dw_tile
    bwd = [
        _gemm_launch("fc2 dX (grad_out gathered x weight; d routing weights)", rows, hid, d_out, dbm, dbn, sched,
                      wave, elt, 1.0, extra_out=m * d_out * elt * 2 / max(1, math.ceil(hid / dbn))),
        _dw_launch("fc2 dW (grad_out gathered, h)", rows, d_out, hid, wbn, wbk, sched, wave, elt, 1.0),
    ]  # fmt: skip
    if sched.act_once:
        bwd.append(Launch("act' pass (d pre = d h * act'(pre))", 0.0, 3.0 * m * hid * elt, float(m * hid)))
        bwd.append(_gemm_launch("fc1 dX (d pre x W1, slot order)", rows, d_in, hid, dbm, dbn, sched, wave, elt, 1.0))
        bwd.append(_dw_launch("fc1 dW (d pre, x gathered)", rows, hid, d_in, wbn, wbk, sched, wave, elt, 1.0))
    else:
        bwd.append(
            _gemm_launch(
                "fc1 dX (d h * act'(pre) on load)", rows, d_in, hid, dbm, dbn, sched, wave, elt, 2.0, act_on_load=True
            )
        )
        bwd.append(_dw_launch("fc1 dW (d h * act'(pre) on load, x gathered)", rows, hid, d_in, wbn, wbk, sched, wave,
                               elt, 2.0, act_on_load=True))  # fmt: skip
    bwd += [
        Launch("slot_sum of d x over k", 0.0, m * d_in * elt + t * d_in * elt),
        Launch("route_x backward (d logits, d x += d logits @ gate)", 2.0 * t * d_in * e, 2 * t * d_in * elt),
        Launch("d gate (x^T d logits, split + reduce)", 2.0 * t * d_in * e, t * d_in * elt),
    ]
    return {"fwd": fwd, "bwd": bwd}


def report(shape: Shape, sched: Schedule, tflops: float, tbps: float, wave: int) -> tuple[str, float, float]:
    """The table of one shape and schedule; (text, fwd ms, fwd+bwd ms)."""
    ls = layer_launches(shape, sched, wave)
    lines = [f"{shape.name} [{sched.name}]  ({shape.describe()})"]
    lines.append(f"  {'launch':<58} {'GFLOP':>8} {'HBM GB':>8} {'act G':>7} {'ms':>7}")
    totals = {}
    for part in ("fwd", "bwd"):
        tot = 0.0
        for launch in ls[part]:
            ms = launch.ms(tflops, tbps)
            tot += ms
            lines.append(
                f"  {part} {launch.name:<54} {launch.flops / 1e9:8.1f} {launch.bytes / 1e9:8.2f} "
                f"{launch.act_evals / 1e9:7.2f} {ms:7.3f}"
            )
        totals[part] = tot
    dense_fwd = shape.flops("fwd") / (tflops * 1e12) * 1e3
    fb = totals["fwd"] + totals["bwd"]
    lines.append(
        f"  predicted: fwd {totals['fwd']:.3f} ms ({dense_fwd / totals['fwd']:.2f} of dense), "
        f"fwd+bwd {fb:.3f} ms ({3 * dense_fwd / fb:.2f} of dense); dense fwd {dense_fwd:.3f} ms"
    )
    return "\n".join(lines), totals["fwd"], fb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="clip-train,connector-train")
    p.add_argument("--schedule", default="before,after")
    p.add_argument("--tflops", type=float, default=701.0, help="matmul ceiling (default: the H200 run's 701)")
    p.add_argument("--tbps", type=float, default=4.25, help="copy ceiling in TB/s (default: the H200 run's 4.25)")
    p.add_argument("--programs", type=int, default=132, help="programs per wave (default 132: one per SM)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    # The model counts the plain layer's kernels: gated shapes are counted in NOTES.md instead.
    bad = [n for n in names if n not in NAMED or NAMED[n].unsupported or NAMED[n].glu]
    if bad:
        print(f"--shapes: unknown, unsupported or gated (not modelled here) {', '.join(bad)}", file=sys.stderr)
        return 2
    scheds = [s.strip() for s in args.schedule.split(",") if s.strip()]
    if any(s not in SCHEDULES for s in scheds):
        print(f"--schedule: one of {', '.join(SCHEDULES)}", file=sys.stderr)
        return 2
    for n in names:
        for s in scheds:
            text, _, _ = report(NAMED[n], SCHEDULES[s], args.tflops, args.tbps, args.programs)
            print(text)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
