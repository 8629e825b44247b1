"""Gated experts on the CPU (issue 23): the torch backend's `moe_mlp(..., glu=True)` against a dense
GEMM of the same FLOPs and against transformers' eager per-expert loop on the same weights, timed
round-robin in one process.

    python -m benchmarks.glu_cpu --shapes olmoe,qwen3-moe --reps 3

Providers (forward, under torch.no_grad, fp32):
- cumo-torch: the whole block (router GEMM, routing, aux losses, both gated expert layers, combine).
- hf-eager: transformers' experts module of that model (OlmoeExperts, Qwen3MoeExperts, ...) with
  its eager implementation, its `gate_up_proj` / `down_proj` the very tensors cumo-torch reads,
  given the routing (top-k ids and weights, computed once outside the timing: the router is not
  in its time, which favours it slightly).
- dense: torch.mm with M = T*k rows through one gate-up [in, 2H] and one down [H, out] matrix: the
  same FLOPs as the experts, the CPU's ceiling.
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F

from .shapes import GLU_SHAPES, NAMED, Shape
from .timing import bench_interleaved

# shape -> (transformers module, experts class, config class)
_HF = {
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeExperts", "OlmoeConfig"),
    "qwen3-moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeConfig"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts", "MixtralConfig"),
}


def _inputs(shape: Shape, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    e, d, h, o = shape.experts, shape.d_in, shape.hidden, shape.d_out
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    return {
        "x": r(shape.tokens, d),
        "gate_weight": r(e, d, scale=d**-0.5),
        "w1": r(e, 2 * h, d, scale=d**-0.5),
        "b1": r(e, 2 * h, scale=0.1) if shape.bias else None,
        "w2": r(e, o, h, scale=h**-0.5),
        "b2": r(e, o, scale=0.1) if shape.bias else None,
    }


def _hf_experts(shape: Shape, inp: dict):
    """transformers' experts module of the shape's model, eager, holding inp's w1 and w2 as its
    parameters (no copy); None where transformers lacks it."""
    if shape.name not in _HF:
        return None
    mod_name, cls_name, cfg_name = _HF[shape.name]
    mod = importlib.import_module(mod_name)
    cfg = getattr(importlib.import_module("transformers"), cfg_name)(
        hidden_size=shape.d_in,
        intermediate_size=shape.hidden,
        moe_intermediate_size=shape.hidden,
        num_experts=shape.experts,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        hidden_act="silu",
    )
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "eager"
    with torch.device("meta"):
        experts = getattr(mod, cls_name)(cfg)
    experts.gate_up_proj = torch.nn.Parameter(inp["w1"], requires_grad=False)
    experts.down_proj = torch.nn.Parameter(inp["w2"], requires_grad=False)
    return experts


def _routing(shape: Shape, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(F.linear(inp["x"], inp["gate_weight"]), dim=-1)
    w, ids = torch.topk(probs, shape.top_k, dim=-1)
    return ids, w / w.sum(dim=-1, keepdim=True)


def time_shape(name: str, reps: int) -> dict:
    """One shape's forward by the three providers, timed round-robin: a row of ms and ratios."""
    import cumo_kernels

    shape = NAMED[name]
    inp = _inputs(shape)
    ids, wts = _routing(shape, inp)
    hf = _hf_experts(shape, inp)
    m, hidden = shape.tokens * shape.top_k, shape.hidden
    xd = torch.randn(m, shape.d_in)
    w1d = torch.randn(shape.d_in, 2 * hidden) * shape.d_in**-0.5
    w2d = torch.randn(hidden, shape.d_out) * hidden**-0.5
    hd = torch.empty(m, 2 * hidden)
    yd = torch.empty(m, shape.d_out)
    kw = {"top_k": shape.top_k, "activation": shape.activation, "glu": True, "backend": "torch"}

    def ours():
        return cumo_kernels.moe_mlp(**inp, **kw)

    def dense():
        torch.mm(xd, w1d, out=hd)
        torch.mm(hd[:, :hidden], w2d, out=yd)

    fns = {"cumo-torch": ours, "dense": dense}
    if hf is not None:
        fns["hf-eager"] = lambda: hf(inp["x"], ids, wts)
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
        if hf is not None:  # the same experts compute the same numbers (torch.topk's routing: ties aside)
            y, ref = ours()[0], hf(inp["x"], ids, wts)
            rel = float((y - ref).norm() / ref.norm())
            assert rel < 1e-4, f"{name}: cumo-torch and hf-eager differ (relative {rel:.2e})"
        ms = dict(zip(fns, bench_interleaved(list(fns.values()), reps=reps)))
    row = {"shape": name, "pass": "fwd", "gflop": shape.flops("fwd") / 1e9, **{f"{k}_ms": v for k, v in ms.items()}}
    row["torch/dense"] = ms["cumo-torch"] / ms["dense"]
    if "hf-eager" in ms:
        row["hf-eager/torch"] = ms["hf-eager"] / ms["cumo-torch"]
    print(
        f"{name} fwd ({shape.describe()} glu, {row['gflop']:.0f} GFLOP): "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
        + f"; cumo-torch/dense {row['torch/dense']:.2f}"
        + (f", hf-eager/cumo-torch {row['hf-eager/torch']:.2f}" if "hf-eager/torch" in row else ""),
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="olmoe,qwen3-moe", help=f"comma-separated, of {', '.join(GLU_SHAPES)}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in GLU_SHAPES]
    if bad:
        raise SystemExit(f"--shapes: not gated shapes: {', '.join(bad)}; accepted: {', '.join(GLU_SHAPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward, median of {args.reps}")
    for name in shapes:
        time_shape(name, args.reps)


if __name__ == "__main__":
    main()
