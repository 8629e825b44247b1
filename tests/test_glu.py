"""Gated experts (issue 23): `moe_mlp(..., glu=...)`, `MoEMLP(..., glu=...)` and the public gated
first GEMM `grouped_linear_glu` against the float64 oracle (tests/oracle.py, `gated` and
`split_gate_up`, written from the issue's definition): forward, both losses and every gradient,
every gated activation, both row layouts, weights stored transposed (read through strides), biases
and none, E in {4, 64, 128} with top_k up to 8, the ragged and empty-expert cases; the non-gated
`relu2`; no copy of w1 per call; inference without a [T*k, 2*hidden] tensor on the CPU."""

from __future__ import annotations

import os
import sys

import oracle
import pytest
import torch
import triton
import triton.language as tl
from conftest import DTYPES, make_moe_inputs, seeded, skip_unsupported
from test_moe_mlp import CASES, REF_GROUPED_LINEAR, check_moe

import cumo_kernels
from cumo_kernels.nn import MoEMLP
from cumo_kernels.testing import assert_close_rel
from cumo_kernels.triton.grouped_linear import _find_tile, _tile_of, row_tiles

F32 = torch.float32
D_IN, HIDDEN, D_OUT = 13, 19, 11  # not multiples of 4, 8 or 16
GLU_ACTS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "relu2", "gpt_oss_swiglu")
# layout name -> (glu argument, w1 stored transposed [E, in, 2H] and passed as a view)
LAYOUTS = {
    "concat": ("concat", False),
    "interleaved": ("interleaved", False),
    "concat_T": ("concat", True),
    "interleaved_T": ("interleaved", True),
}


def skip_cuda_strided(backend: str, layout: str) -> None:
    """The cuda backend reads contiguous weights only: a transposed w1 is refused there (Unsupported,
    test_cuda_refuses_a_strided_w1); auto runs Triton for it."""
    if backend == "cuda" and LAYOUTS[layout][1]:
        pytest.skip("the cuda backend refuses a non-contiguous w1 (Unsupported); auto runs triton")


def glu_inputs(shape, e, *, layout="concat", bias=True, kind="random", dtype=F32, device="cpu", seed=0, scale=1.0):
    """moe_mlp inputs of gated experts: w1 [E, 2H, in] (a transposed view of [E, in, 2H] storage for
    the *_T layouts), b1 [E, 2H], w2 [E, out, H]. `scale` widens w1 (GPT-OSS's clamp at 7 must bite)."""
    inp = make_moe_inputs(shape, D_IN, 2 * HIDDEN, D_OUT, e, bias=bias, kind=kind, seed=seed)
    g = seeded(seed + 99)
    inp["w1"] = inp["w1"] * scale
    inp["w2"] = torch.randn(e, D_OUT, HIDDEN, generator=g) / HIDDEN**0.5
    out = {k: (None if v is None else v.to(device=device, dtype=dtype)) for k, v in inp.items()}
    if LAYOUTS[layout][1]:
        out["w1"] = out["w1"].transpose(1, 2).contiguous().transpose(1, 2)
        assert not out["w1"].is_contiguous()
    return out


@pytest.mark.parametrize("activation", GLU_ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_activations_match_oracle(device, backend, dtype, activation):
    skip_unsupported(device, backend, dtype)
    scale = 4.0 if activation == "gpt_oss_swiglu" else 1.0
    inputs = glu_inputs((3, 5), 4, dtype=dtype, device=device, seed=1, scale=scale)
    if activation == "gpt_oss_swiglu":  # both clamps are exercised
        pre = inputs["x"].double().reshape(-1, D_IN) @ inputs["w1"].double().reshape(-1, D_IN).t()
        assert (pre > 7).any() and (pre < -7).any()
    check_moe(inputs, 2, activation, dtype, device, backend, glu="concat")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", ("silu", "gpt_oss_swiglu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_layouts_match_oracle(device, backend, dtype, activation, layout):
    skip_unsupported(device, backend, dtype)
    skip_cuda_strided(backend, layout)
    scale = 4.0 if activation == "gpt_oss_swiglu" else 1.0
    inputs = glu_inputs((7,), 4, layout=layout, dtype=dtype, device=device, seed=2, scale=scale)
    check_moe(inputs, 2, activation, dtype, device, backend, glu=LAYOUTS[layout][0])


@pytest.mark.parametrize("case", list(CASES))
def test_glu_cases_match_oracle(device, backend, case):
    """The ragged, empty-expert, one-expert, k == E, tie and zero-gate grid of the plain layer."""
    shape, e, k, bias, kind, _ = CASES[case]
    layout = "interleaved" if backend == "cuda" else "interleaved_T"  # see skip_cuda_strided
    inputs = glu_inputs(shape, e, bias=bias, kind=kind, device=device, seed=3, layout=layout)
    check_moe(inputs, k, "silu", F32, device, backend, seed=3, glu="interleaved")


# (tokens, E, k): many small experts, most of them without rows at these token counts; E = 256
# with top_k = 16 is the largest (on triton in the interpreter the E-bound part is each
# launch's row tiles, row_tiles(M, E, BM): 96 at T6-E256-k16, not the 263 of cdiv(M, BM) + E + 1)
MANY = [(33, 64, 8), (17, 128, 4), (6, 256, 16)]


@pytest.mark.parametrize("case", MANY, ids=lambda c: "T{}-E{}-k{}".format(*c))
def test_glu_many_experts_match_oracle(device, backend, case):
    """Forward values, expert ids, and every gradient of the training loss (y * g + 0.1 balance +
    0.01 z) against the oracle; narrow experts (hidden 7, out 5), so that each GEMM is one column
    tile and the interpreter's time goes to the E-dependent tile schedule, not to the widths."""
    t, e, k = case
    g = seeded(40 + e)
    x = torch.randn(t, D_IN, generator=g)
    inputs = {
        "x": x,
        "gate_weight": 0.5 * torch.randn(e, D_IN, generator=g),
        "w1": torch.randn(e, 14, D_IN, generator=g) / D_IN**0.5,
        "b1": 0.5 * torch.randn(e, 14, generator=g),
        "w2": torch.randn(e, 5, 7, generator=g) / 7**0.5,
        "b2": 0.5 * torch.randn(e, 5, generator=g),
    }
    inputs = {n: v.to(device) for n, v in inputs.items()}
    leaves = {n: v.clone().requires_grad_() for n, v in inputs.items()}
    y, bal, z = cumo_kernels.moe_mlp(**leaves, top_k=k, activation="silu", glu=True, backend=backend)
    gy = torch.randn(y.shape, generator=seeded(41)).to(device)
    ((y * gy).sum() + 0.1 * bal + 0.01 * z).backward()
    leaves64 = {n: oracle.up(v, True) for n, v in inputs.items()}
    y64, bal64, z64, ids = oracle.moe_oracle(**leaves64, top_k=k, activation="silu", glu="concat", dtype=F32)
    ((y64 * gy.double()).sum() + 0.1 * bal64 + 0.01 * z64).backward()
    assert len(set(ids.flatten().tolist())) > e // 8, "the routing must spread over many experts"
    for name, out, ref in (("y", y, y64), ("balance", bal, bal64), ("z", z, z64)):
        assert_close_rel(out, ref, F32, name)
    for n in inputs:
        assert_close_rel(leaves[n].grad, leaves64[n].grad, F32, f"grad {n}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_glu_inference_matches_oracle(device, backend, layout, bias, monkeypatch):
    """Without autograd: the CPU torch path runs both layers block by block (cumo::expert_mlp_glu);
    blocks of a few rows so that block boundaries fall inside experts."""
    skip_cuda_strided(backend, layout)
    monkeypatch.setattr(REF_GROUPED_LINEAR, "_BLOCK_BYTES", 5 * 2 * HIDDEN * 4)
    inputs = glu_inputs((33,), 4, layout=layout, bias=bias, device=device, seed=5, scale=4.0)
    glu = LAYOUTS[layout][0]
    with torch.no_grad():
        y, balance, z = cumo_kernels.moe_mlp(**inputs, top_k=2, activation="gpt_oss_swiglu", glu=glu, backend=backend)
    leaves64 = {n: oracle.up(t) for n, t in inputs.items()}
    y64, bal64, z64, _ = oracle.moe_oracle(**leaves64, top_k=2, activation="gpt_oss_swiglu", glu=glu, dtype=F32)
    for name, out, ref in (("y", y, y64), ("balance", balance, bal64), ("z", z, z64)):
        assert_close_rel(out, ref, F32, f"{name} (no_grad)")


def test_glu_cpu_inference_keeps_no_pre_activation(monkeypatch):
    """On CPU tensors without autograd the torch backend runs cumo::expert_mlp_glu (neither the
    [T*k, 2H] pre-activation nor the [T*k, H] hidden tensor exists); with autograd
    cumo::grouped_linear_glu, whose pre-activation is the one [T*k, 2H] tensor kept."""
    inputs = glu_inputs((3, 5), 4, seed=7)
    calls = []
    real = cumo_kernels.reference.expert_mlp_glu
    monkeypatch.setattr(cumo_kernels.reference, "expert_mlp_glu", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y0 = cumo_kernels.moe_mlp(**inputs, top_k=2, activation="silu", glu=True, backend="torch")[0]
    assert calls, "the no_grad CPU forward did not use cumo::expert_mlp_glu"
    calls.clear()
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    y1 = cumo_kernels.moe_mlp(**leaves, top_k=2, activation="silu", glu=True, backend="torch")[0]
    assert not calls and y1.requires_grad
    assert_close_rel(y0, y1.detach(), F32, "y no_grad vs grad")


def test_glu_w1_read_in_place(device, backend, monkeypatch):
    """A transposed, interleaved w1 (GPT-OSS's storage) reaches the backend as the caller's own
    tensor: same storage, same strides (never copied per call)."""
    skip_cuda_strided(backend, "interleaved_T")
    inputs = glu_inputs((7,), 4, layout="interleaved_T", device=device, seed=8)
    seen = []
    glu_ops = sys.modules["cumo_kernels.ops.grouped_linear_glu"]  # the module, not the function
    real = glu_ops.dispatch.op

    def spy(name, op):
        fn = real(name, op)
        if op.startswith("grouped_linear_glu") and "combine" not in op:  # the ops that read w1
            i = 2 if op.endswith("backward") else 1  # w1's position
            i = 3 if op == "grouped_linear_glu_gather_backward" else i
            return lambda *a: seen.append((op, a[i].data_ptr(), a[i].stride())) or fn(*a)
        return fn

    monkeypatch.setattr(glu_ops.dispatch, "op", spy)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    y, bal, z = cumo_kernels.moe_mlp(**leaves, top_k=2, activation="silu", glu="interleaved", backend=backend)
    (y.sum() + bal + z).backward()
    assert seen, "the gated ops were not called"
    assert {s[0].endswith("backward") for s in seen} == {False, True}, seen
    assert all(s[1:] == (leaves["w1"].data_ptr(), leaves["w1"].stride()) for s in seen), seen
    assert leaves["w1"].grad.shape == leaves["w1"].shape


# ------------------------------------------------------------------------- the public gated op


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", ("silu", "gpt_oss_swiglu", "gelu"))
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_glu_matches_oracle(device, backend, layout, activation, bias):
    """The building block: permuted rows with dropped rows past offsets[E] (zeros in h and grad_x)
    and an expert without rows."""
    skip_cuda_strided(backend, layout)
    g = seeded(9)
    e, m = 4, 23
    offsets = torch.tensor([0, 6, 6, 15, 20], device=device)
    x = torch.randn(m, D_IN, generator=g).to(device).requires_grad_()
    w1 = (4.0 * torch.randn(e, 2 * HIDDEN, D_IN, generator=g) / D_IN**0.5).to(device)
    if LAYOUTS[layout][1]:
        w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w1.requires_grad_()
    b1 = (0.5 * torch.randn(e, 2 * HIDDEN, generator=g)).to(device).requires_grad_() if bias else None
    glu = LAYOUTS[layout][0]
    h = cumo_kernels.grouped_linear_glu(x, w1, b1, offsets, activation, layout=glu, backend=backend)
    assert h.shape == (m, HIDDEN) and h.dtype == F32
    gh = torch.randn(m, HIDDEN, generator=seeded(10)).to(device)
    ins = [t for t in (x, w1, b1) if t is not None]
    grads = torch.autograd.grad((h * gh).sum(), ins)

    ins64 = [oracle.up(t, True) for t in ins]
    x64, w64, b64 = ins64[0], ins64[1], (ins64[2] if bias else None)
    rows = []
    for ex in range(e):
        s, t = int(offsets[ex]), int(offsets[ex + 1])
        wg, wu = oracle.split_gate_up(w64[ex], glu)
        gate, up = x64[s:t] @ wg.t(), x64[s:t] @ wu.t()
        if b64 is not None:
            bg, bu = oracle.split_gate_up(b64[ex], glu)
            gate, up = gate + bg, up + bu
        rows.append(oracle.gated(gate, up, activation))
    rows.append(x64[int(offsets[-1]) :, :1].expand(-1, HIDDEN) * 0.0)  # dropped rows
    h64 = torch.cat(rows)
    refs = torch.autograd.grad((h64 * gh.double()).sum(), ins64)
    assert_close_rel(h, h64, F32, "h")
    assert (h[int(offsets[-1]) :] == 0).all()
    for name, got, ref in zip(("x", "w1", "b1"), grads, refs):
        assert got.shape == ref.shape
        assert_close_rel(got, ref, F32, f"grad {name}")


@pytest.mark.cuda
def test_cuda_refuses_a_strided_w1():
    """backend='cuda' with a transposed w1: an error that names w1 and says what reads it in place."""
    if "cuda" not in cumo_kernels.available_backends("cuda"):
        pytest.skip("the cuda backend cannot run here (no device or no extension)")
    inputs = glu_inputs((7,), 4, layout="concat_T", device="cuda", seed=2)
    with pytest.raises(RuntimeError, match="w1 must be contiguous"):
        cumo_kernels.moe_mlp(**inputs, top_k=2, activation="silu", glu=True, backend="cuda")


def test_grouped_linear_glu_errors():
    x = torch.randn(5, D_IN)
    off = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="w1: a gated"):
        cumo_kernels.grouped_linear_glu(x, torch.randn(2, 7, D_IN), None, off)
    with pytest.raises(ValueError, match="layout"):
        cumo_kernels.grouped_linear_glu(x, torch.randn(2, 8, D_IN), None, off, layout="stacked")
    with pytest.raises(ValueError, match="activation"):
        cumo_kernels.grouped_linear_glu(x, torch.randn(2, 8, D_IN), None, off, "softmax")
    with pytest.raises(ValueError, match="b1"):
        cumo_kernels.grouped_linear_glu(x, torch.randn(2, 8, D_IN), torch.randn(2, 4), off)


def test_moe_mlp_glu_errors():
    inp = glu_inputs((5,), 4)
    with pytest.raises(ValueError, match="glu"):
        cumo_kernels.moe_mlp(**inp, top_k=2, glu="stacked")
    with pytest.raises(ValueError, match="activation"):
        plain = make_moe_inputs((5,), D_IN, HIDDEN, D_OUT, 4)
        cumo_kernels.moe_mlp(**plain, top_k=2, activation="gpt_oss_swiglu")  # gated-only
    with pytest.raises(ValueError, match="w2"):
        cumo_kernels.moe_mlp(**(inp | {"w2": torch.randn(4, D_OUT, 2 * HIDDEN)}), top_k=2, glu=True)
    with pytest.raises(ValueError, match="w1: a gated"):
        cumo_kernels.moe_mlp(**(inp | {"w1": torch.randn(4, 7, D_IN), "b1": None}), top_k=2, glu=True)


def test_glu_false_is_unchanged():
    """glu=False (the default) computes exactly what the layer computed before the argument."""
    inp = make_moe_inputs((3, 5), D_IN, HIDDEN, D_OUT, 4, seed=12)
    a = cumo_kernels.moe_mlp(**inp, top_k=2, backend="torch")
    b = cumo_kernels.moe_mlp(**inp, top_k=2, glu=False, backend="torch")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------------------ relu2, module


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu2_matches_oracle(device, backend, dtype):
    """The non-gated relu(x)^2 (NemotronH)."""
    skip_unsupported(device, backend, dtype)
    inputs = make_moe_inputs((3, 5), D_IN, HIDDEN, D_OUT, 4, dtype=dtype, device=device, seed=13)
    check_moe(inputs, 2, "relu2", dtype, device, backend)


@pytest.mark.parametrize("glu", [True, "interleaved"])
def test_module_glu(device, backend, glu):
    torch.manual_seed(0)
    layer = MoEMLP(D_IN, HIDDEN, D_OUT, num_experts=4, top_k=2, activation="silu", glu=glu, backend=backend)
    layer = layer.to(device)
    assert layer.w1.shape == (4, 2 * HIDDEN, D_IN) and layer.b1.shape == (4, 2 * HIDDEN)
    assert layer.w2.shape == (4, D_OUT, HIDDEN)
    assert layer.w1.abs().max() <= 1 / D_IN**0.5 and layer.w2.abs().max() <= 1 / HIDDEN**0.5
    assert f"glu={glu!r}" in repr(layer)
    x = torch.randn(3, 5, D_IN, device=device)
    y, bal, z = layer(x)
    params = (layer.gate.weight, layer.w1, layer.b1, layer.w2, layer.b2)
    fy, fbal, fz = cumo_kernels.moe_mlp(x, *params, top_k=2, activation="silu", glu=glu, backend=backend)
    assert torch.equal(y, fy) and torch.equal(bal, fbal) and torch.equal(z, fz)
    inputs = {"x": x, "gate_weight": layer.gate.weight, "w1": layer.w1, "b1": layer.b1, "w2": layer.w2, "b2": layer.b2}
    check_moe({n: t.detach() for n, t in inputs.items()}, 2, "silu", F32, device, backend, glu=layout_of(glu))
    with pytest.raises(ValueError, match="gated"):
        MoEMLP(D_IN, HIDDEN, num_experts=4, top_k=2, activation="softmax", glu=True)


def layout_of(glu):
    return "concat" if glu is True else glu


def test_compile_fullgraph_glu():
    """torch.compile(fullgraph=True) of the gated layer, training and inference, on the CPU."""
    torch._dynamo.reset()
    layer = MoEMLP(D_IN, HIDDEN, D_OUT, num_experts=4, top_k=2, activation="silu", glu="interleaved", backend="torch")
    x = torch.randn(2, 5, D_IN)
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, bal, z = fn(x)
    ey, ebal, ez = layer(x)
    assert_close_rel(y, ey, F32, "compiled y")
    (y.sum() + bal + z).backward()
    assert layer.w1.grad is not None and torch.isfinite(layer.w1.grad).all()
    with torch.no_grad():
        assert_close_rel(fn(x)[0], ey.detach(), F32, "compiled no_grad y")


# ----------------------------------------------------------------------------------------- opcheck


def glu_op_samples(backend: str) -> dict[str, list[tuple]]:
    """opcheck samples of the gated ops (tests/test_ops.py merges them into its table): both layouts,
    a transposed w1, biases and none, the clamped activation, save_pre False."""
    g = seeded(31)
    e, m, d, h = 4, 14, 13, 5
    offsets = torch.tensor([0, 3, 3, 9, 12])  # an empty expert, two dropped rows
    x = torch.randn(m, d, generator=g).requires_grad_()
    w1 = (torch.randn(e, 2 * h, d, generator=g) / d**0.5).requires_grad_()
    w1t = (torch.randn(e, d, 2 * h, generator=g) / d**0.5).transpose(1, 2).requires_grad_()
    b1 = torch.randn(e, 2 * h, generator=g).requires_grad_()
    w2 = torch.randn(e, 3, h, generator=g)
    args = (x.detach(), w1.detach(), b1.detach(), offsets, "silu", True, True, backend)
    _, pre = torch.ops.cumo.grouped_linear_glu(*args)
    t, k = 7, 2
    sort_idx = torch.randperm(t * k, generator=g)
    off_g = torch.tensor([0, 4, 4, 10, 14])
    xt = torch.randn(t, d, generator=g).requires_grad_()
    h_g, pre_g = torch.ops.cumo.grouped_linear_glu_gather(
        xt.detach(), w1t.detach(), None, sort_idx, off_g, k, "gpt_oss_swiglu", True, True, backend
    )
    hg = h_g.clone().requires_grad_()
    pre_g = pre_g.clone().requires_grad_()
    w2c = torch.randn(e, 3, h, generator=g).requires_grad_()
    b2c = torch.randn(e, 3, generator=g).requires_grad_()
    wts = torch.rand(t, k, generator=g).requires_grad_()
    _, y_slot = torch.ops.cumo.grouped_linear_glu_combine(
        hg.detach(), pre_g.detach(), w2c.detach(), b2c.detach(), sort_idx, off_g, wts.detach(), "silu", False, backend
    )
    return {
        "grouped_linear_glu": [
            (x, w1, b1, offsets, "silu", False, True, backend),
            (x, w1t, None, offsets, "gpt_oss_swiglu", True, True, backend),
            (x.detach(), w1.detach(), b1.detach(), offsets, "gelu", True, False, backend),
        ],
        "grouped_linear_glu_backward": [
            (torch.randn(m, h, generator=g), x.detach(), w1.detach(), offsets, pre, "silu", True, True, backend),
        ],
        "grouped_linear_glu_gather": [
            (xt, w1t, None, sort_idx, off_g, k, "gpt_oss_swiglu", True, True, backend),
            (xt, w1, b1, sort_idx, off_g, k, "relu2", False, True, backend),
        ],
        "grouped_linear_glu_gather_backward": [
            (
                torch.randn(t * k, h, generator=g),
                torch.randn(t * k, 2 * h, generator=g),
                xt.detach(),
                w1t.detach(),
                sort_idx,
                off_g,
                pre_g.detach(),
                k,
                "gpt_oss_swiglu",
                True,
                False,
                backend,
            ),
            (xt.new_empty(0), torch.randn(t * k, 2 * h, generator=g), xt.detach(), w1.detach(), sort_idx, off_g)
            + (pre_g.detach(), k, "silu", False, True, backend),
        ],
        "grouped_linear_glu_combine": [
            (hg, pre_g, w2c, b2c, sort_idx, off_g, wts, "gpt_oss_swiglu", True, backend),
            (hg, pre_g, w2c, None, sort_idx, off_g, wts, "silu", False, backend),
        ],
        "grouped_linear_glu_combine_backward": [
            (
                torch.randn(t, 3, generator=g),
                hg.detach(),
                pre_g.detach(),
                w2c.detach(),
                sort_idx,
                off_g,
                wts.detach(),
                y_slot,
            )
            + ("gpt_oss_swiglu", True, True, backend),
        ],
        "expert_mlp_glu": [
            (x.detach(), w1t.detach(), None, w2, None, offsets, "silu", True, backend),
            (x.detach(), w1.detach(), b1.detach(), w2, torch.randn(e, 3, generator=g), offsets, "relu", False, backend),
        ],
    }


# -------------------------------------------------------------- many experts on the triton backend


def _schedule_model(off: list[int], e: int, m: int, bm: int, pid: int) -> tuple[int, int, int]:
    """The grouped GEMM's tile schedule, written out serially: expert e's rows run from the previous
    end to offsets[e+1] clamped into [previous end, M]; the rows offsets[E]:M form tiles of 'expert
    E'; (expert, first row, end row) of tile pid, expert -1 past the last tile."""
    s = acc = 0
    for ex in range(e + 1):
        t = min(max(off[ex + 1], s), m) if ex < e else m
        n = (t - s + bm - 1) // bm
        if acc <= pid < acc + n:
            return ex, s + (pid - acc) * bm, t
        acc, s = acc + n, t
    return -1, 0, 0


@triton.jit
def _schedule_probe(off_ptr, out_ptr, E, M, BM: tl.constexpr):
    """Stores `_find_tile`'s answer (expert, first row, end row) for each program."""
    pid = tl.program_id(0)
    e_sel, r0, r1 = _find_tile(off_ptr, E, M, pid, BM)
    tl.store(out_ptr + pid * 3, e_sel)
    tl.store(out_ptr + pid * 3 + 1, r0)
    tl.store(out_ptr + pid * 3 + 2, r1)


def test_triton_tile_schedule_many_experts():
    """`_find_tile` (the experts taken 32 at a time as vectors) against the serial model, at E = 4
    and E = 130 (five chunks), with empty experts, dropped rows and offsets out of order or out of
    range (clamped)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernel in Triton's interpreter (TRITON_INTERPRET=1)")
    g = seeded(50)
    for e, m in ((4, 23), (130, 150)):
        off = [0] + sorted(torch.randint(0, m + 1, (e,), generator=g).tolist())
        off[-1] = min(off[-1], m - 3)  # dropped rows
        if e > 4:
            off[5], off[70] = m + 40, -3  # out of range: clamped
        tiles = row_tiles(m, e, 16)
        out = torch.empty(tiles * 3, dtype=torch.int64)
        _schedule_probe[(tiles,)](torch.tensor(off), out, e, m, BM=16)
        got = [tuple(r) for r in out.view(-1, 3).tolist()]
        for pid, row in enumerate(got):
            want = _schedule_model(off, e, m, 16, pid)
            assert row[0] == want[0] and (want[0] < 0 or row == want), f"E={e} tile {pid}: {row} vs {want}"
        if e == 4:
            assert any(r[0] == e for r in got), "the dropped rows' tile is missing"


def _model_tiles(off: list[int], e: int, m: int, bm: int) -> int:
    """How many tiles the serial model schedules (the first pid it answers -1 for)."""
    pid = 0
    while _schedule_model(off, e, m, bm, pid)[0] >= 0:
        pid += 1
    return pid


def test_row_tiles_bound_every_split():
    """`row_tiles` (the grid of every grouped launch) is at least the tiles the schedule needs for
    any split of M rows, and exactly that in the worst case: random splits with and without dropped
    rows, and min(E + 1, M) - 1 groups of one row each with the rest in the last group (the dropped
    rows where E < M), E above and below M. A grid one short leaves rows unwritten (no error, a
    wrong output); a grid too long launches idle programs."""
    g = seeded(51)
    for e, m, bm in ((4, 23, 16), (256, 96, 16), (128, 300, 64), (64, 64, 32), (300, 7, 16), (1, 1, 16), (3, 40, 1)):
        splits = []
        for _ in range(50):
            cuts = sorted(torch.randint(0, m + 1, (e,), generator=g).tolist())
            splits.append([0, *cuts])
            splits.append([0, *cuts[:-1], min(cuts[-1], max(m - 3, 0))])  # dropped rows
        have = row_tiles(m, e, bm)
        for off in splits:
            need = _model_tiles(off, e, m, bm)
            assert need <= have, f"E={e} M={m} BM={bm}: {need} tiles, grid {have}, offsets {off}"
        groups = min(e + 1, m)
        worst = [0, *range(1, groups), *[m if groups <= e else groups - 1] * (e - groups + 1)]
        assert _model_tiles(worst, e, m, bm) == have, f"E={e} M={m} BM={bm}: offsets {worst}"


@triton.jit
def _order_probe(out_ptr, M, E, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Stores `_tile_of`'s (pid_m, pid_n) for each program."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_of(pid, M, E, N, BM, BN, GROUP_M)
    tl.store(out_ptr + pid * 2, pid_m)
    tl.store(out_ptr + pid * 2 + 1, pid_n)


def test_triton_tile_order_covers_row_tiles():
    """The grid the launches compute on the host (`row_tiles` x column tiles) and the row-tile count
    `_tile_of` computes in the kernel agree: the programs map one to one onto every (row tile,
    column tile) pair, the worst split's last row tile included (a kernel count one short maps two
    programs to one tile and none to the last, silently, where a split needs every tile)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernel in Triton's interpreter (TRITON_INTERPRET=1)")
    for m, e, n, bm, bn, group in ((23, 4, 40, 16, 16, 8), (96, 256, 20, 16, 16, 8), (300, 7, 64, 64, 32, 2)):
        num_m, num_n = row_tiles(m, e, bm), triton.cdiv(n, bn)
        out = torch.empty(num_m * num_n * 2, dtype=torch.int64)
        _order_probe[(num_m * num_n,)](out, m, e, n, BM=bm, BN=bn, GROUP_M=group)
        got = sorted(tuple(r) for r in out.view(-1, 2).tolist())
        assert got == [(i, j) for i in range(num_m) for j in range(num_n)], f"M={m} E={e} N={n}"


def test_triton_route_256_experts(device, backend):
    """The routing from x and the sort at E = 256, top_k = 16 against the oracle (ids exactly)."""
    if backend == "torch":
        pytest.skip("the torch backend's E = 256 runs in test_glu_many_experts_match_oracle")
    g = seeded(60)
    t, e, k = 9, 256, 16
    x = torch.randn(t, D_IN, generator=g).to(device)
    gate = torch.randn(e, D_IN, generator=g).to(device)
    w, ids, ps, fc, zs, _ = torch.ops.cumo.route_x(x, gate, k, 1, backend)
    rw, rids, rps, rfc, rzs = oracle.route_oracle(x @ gate.t(), k, 1, logits64=x.double() @ gate.double().t())
    assert torch.equal(ids.cpu(), rids.cpu())
    assert_close_rel(w, rw, F32, "weights")
    assert_close_rel(ps, rps, F32, "prob_sums")
    sort_idx, offsets = torch.ops.cumo.sort_experts(ids, e, backend)
    _, want_idx, want_off = oracle.permute_oracle(x, ids, e)
    assert torch.equal(sort_idx.cpu(), want_idx.cpu()) and torch.equal(offsets.cpu(), want_off.cpu())
