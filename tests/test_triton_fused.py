"""The fused ops (route_x, sort_experts, grouped_linear_gather, grouped_linear_combine) against
the float64 oracle on every backend that runs here, their
opcheck samples, and the Triton backend's own properties: refusal messages, the number of kernel
launches of the layer's forward and backward, no host sync in its source, and (on GPUs) the layer
at DESIGN.md's shapes in bf16/fp16/fp32."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import oracle
import pytest
import torch
from conftest import DTYPES, HAS_CUDA, NO_CUDA_REASON, make_moe_inputs, poison, seeded, skip_unsupported

import cumo_kernels
from cumo_kernels.testing import assert_close_rel, make_routing_inputs

F32 = torch.float32
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)


def _routing(
    t: int, e: int, k: int, seed: int, kind: str = "random"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_ids [t,k], sort_idx [t*k], offsets [E+1]) from float64 logits (oracle order)."""
    logits = make_routing_inputs(kind, t, e, seed=seed, dtype=torch.float64)
    ids = oracle.choose(torch.softmax(logits, -1), k)
    _, sort_idx, offsets = oracle.permute_oracle(torch.zeros(t, 1), ids, e)
    return ids, sort_idx, offsets


def fused_op_samples(backend: str) -> dict[str, list[tuple]]:
    """opcheck samples of the fused ops (tests/test_ops.py merges them into its table)."""
    g = seeded(11)
    t, e, k, d, n, o = 7, 4, 2, 13, 11, 5
    x = torch.randn(t, d, generator=g).requires_grad_()
    gate = (0.3 * torch.randn(e, d, generator=g)).requires_grad_()
    w, ids, _, _, _, logits = torch.ops.cumo.route_x(x.detach(), gate.detach(), k, 1, backend)
    sort_idx, offsets = torch.ops.cumo.sort_experts(ids, e, backend)
    w1 = torch.randn(e, n, d, generator=g).requires_grad_()
    b1 = torch.randn(e, n, generator=g).requires_grad_()
    h, pre = torch.ops.cumo.grouped_linear_gather(
        x.detach(), w1.detach(), b1.detach(), sort_idx, offsets, k, "gelu", True, backend
    )
    hs = h.detach().clone().requires_grad_()
    w2 = torch.randn(e, o, n, generator=g).requires_grad_()
    b2 = torch.randn(e, o, generator=g).requires_grad_()
    wts = w.detach().clone().requires_grad_()
    _, y_slot = torch.ops.cumo.grouped_linear_combine(
        h.detach(), w2.detach(), b2.detach(), sort_idx, offsets, w, backend
    )
    x15 = torch.randn(15, d, generator=g).requires_grad_()
    return {
        "route_x": [(x, gate, k, 1, backend), (x15, gate, 3, 3, backend)],
        "route_x_backward": [
            (
                torch.randn(t, k, generator=g),
                torch.randn(1, e, generator=g),
                torch.randn(1, generator=g),
                x.detach(),
                gate.detach(),
                logits,
                ids,
                backend,
            )
        ],
        "sort_experts": [(ids, e, backend)],
        "grouped_linear_gather": [
            (x, w1, b1, sort_idx, offsets, k, "gelu", True, backend),
            (x, w1, None, sort_idx, offsets, k, "none", True, backend),
            (x.detach(), w1.detach(), b1.detach(), sort_idx, offsets, k, "quick_gelu", False, backend),
        ],
        "grouped_linear_gather_backward": [
            (
                torch.randn(t * k, n, generator=g),
                x.detach(),
                w1.detach(),
                sort_idx,
                offsets,
                pre,
                k,
                "gelu",
                True,
                backend,
            )
        ],
        "grouped_linear_combine": [
            (hs, w2, b2, sort_idx, offsets, wts, backend),
            (hs, w2, None, sort_idx, offsets, wts, backend),
        ],
        "grouped_linear_combine_backward": [
            (torch.randn(t, o, generator=g), h.detach(), w2.detach(), sort_idx, offsets, w, y_slot, True, backend)
        ],
    }


# ------------------------------------------------------------------------------------- route_x

# (T, B, E, k, in)
ROUTE_X_CASES = [(7, 1, 4, 2, 13), (15, 3, 4, 1, 13), (33, 1, 8, 3, 37), (7, 1, 4, 4, 13), (5, 1, 1, 1, 13)]


@pytest.mark.parametrize("case", ROUTE_X_CASES, ids=lambda c: "T{}-B{}-E{}-k{}-in{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route_x(device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
    t, b, e, k, d = case
    g = seeded(t * e + k)
    x = torch.randn(t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    gate = (0.3 * torch.randn(e, d, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    poison(device)
    w, ids, ps, fc, zs, logits = torch.ops.cumo.route_x(x, gate, k, b, backend)
    assert logits.dtype == dtype and w.dtype == dtype and ps.dtype == F32 and zs.dtype == F32
    # The logits are the router GEMM in the activation dtype; routing is compared on them.
    assert_close_rel(logits, oracle.up(x) @ oracle.up(gate).t(), dtype, "logits")
    x64, g64 = oracle.up(x, True), oracle.up(gate, True)
    l64 = x64 @ g64.t()
    rw, rids, rps, rfc, rzs = oracle.route_oracle(logits.detach(), k, b, logits64=l64, expert_ids=ids)
    # Routing fed the backend's own logits: the ids compare exactly, in every dtype.
    own = oracle.route_oracle(logits.detach(), k, b)[1]
    assert torch.equal(ids.cpu(), own.cpu()), "expert ids differ from the oracle's on the backend's logits"
    assert torch.equal(fc.cpu().double(), rfc.cpu())
    assert_close_rel(w, rw, dtype, "weights")
    assert_close_rel(ps, rps, dtype, "prob_sums")
    assert_close_rel(zs, rzs, dtype, "z_sums")
    gw = torch.randn(t, k, generator=g).to(device=device, dtype=dtype)
    gp = torch.randn(b, e, generator=g).to(device)
    gz = torch.randn(b, generator=g).to(device)
    loss = (w * gw).sum() + (ps * gp).sum() + (zs * gz).sum()
    ref = (rw * gw.double()).sum() + (rps * gp.double()).sum() + (rzs * gz.double()).sum()
    for name, got, want in zip(("grad x", "grad gate"), _grads(loss, [x, gate]), _grads(ref, [x64, g64])):
        assert got.dtype == dtype
        assert_close_rel(got, want, dtype, name)


# ------------------------------------------------------------------------- sort / gather / combine

# (T, E, k, kind)
GROUP_CASES = [
    (7, 4, 2, "random"),
    (33, 8, 3, "random"),
    (33, 4, 2, "one_expert"),
    (7, 4, 1, "empty_expert"),
    (5, 1, 1, "random"),
]


def _case_id(c):
    return "T{}-E{}-k{}-{}".format(*c)


@pytest.mark.parametrize("case", GROUP_CASES, ids=_case_id)
def test_sort_experts(device, backend, case):
    t, e, k, kind = case
    ids, ridx, roff = _routing(t, e, k, seed=t + e, kind=kind)
    sort_idx, offsets = torch.ops.cumo.sort_experts(ids.to(device), e, backend)
    assert torch.equal(sort_idx.cpu(), ridx) and torch.equal(offsets.cpu(), roff)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu", "none"])
@pytest.mark.parametrize("case", GROUP_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_linear_gather(device, backend, dtype, case, activation):
    skip_unsupported(device, backend, dtype)
    t, e, k, kind = case
    d, n = 13, 19
    _, sort_idx, offsets = _routing(t, e, k, seed=t * 7 + e, kind=kind)
    g = seeded(t + k)
    x = torch.randn(t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(e, n, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(e, n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    poison(device)
    y, _ = torch.ops.cumo.grouped_linear_gather(
        x, w, b, sort_idx.to(device), offsets.to(device), k, activation, True, backend
    )
    with torch.no_grad():  # inference keeps no pre-activation, and computes the same y
        y_inf, pre_inf = torch.ops.cumo.grouped_linear_gather(
            x, w, b, sort_idx.to(device), offsets.to(device), k, activation, False, backend
        )
    assert pre_inf.numel() == 0 and torch.equal(y_inf, y.detach())
    leaves = [x, w, b]
    l64 = [oracle.up(v, True) for v in leaves]
    ref = oracle.grouped_linear_oracle(l64[0][sort_idx // k], l64[1], l64[2], offsets, activation)
    assert y.dtype == dtype
    assert_close_rel(y, ref, dtype, "y")
    gy = torch.randn(t * k, n, generator=g).to(device=device, dtype=dtype)
    for name, got, want in zip(
        ("grad x", "grad weight", "grad bias"), _grads((y * gy).sum(), leaves), _grads((ref * gy.double()).sum(), l64)
    ):
        assert got.dtype == dtype
        assert_close_rel(got, want, dtype, name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", GROUP_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_linear_combine(device, backend, dtype, case, bias):
    skip_unsupported(device, backend, dtype)
    t, e, k, kind = case
    d, n = 19, 11
    _, sort_idx, offsets = _routing(t, e, k, seed=t * 5 + e, kind=kind)
    g = seeded(t * k)
    h = torch.randn(t * k, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(e, n, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(e, n, generator=g).to(device=device, dtype=dtype).requires_grad_() if bias else None
    wts = torch.rand(t, k, generator=g).to(device=device, dtype=dtype).requires_grad_()
    poison(device)
    out, _ = torch.ops.cumo.grouped_linear_combine(h, w, b, sort_idx.to(device), offsets.to(device), wts, backend)
    leaves = [h, w, wts] + ([b] if bias else [])
    l64 = [oracle.up(v, True) for v in leaves]
    ys = oracle.grouped_linear_oracle(l64[0], l64[1], l64[3] if bias else None, offsets, "none")
    ref = oracle.unpermute_oracle(ys, sort_idx, l64[2])
    assert out.shape == (t, n) and out.dtype == dtype
    assert_close_rel(out, ref, dtype, "out")
    go = torch.randn(t, n, generator=g).to(device=device, dtype=dtype)
    names = ("grad h", "grad weight", "grad routing weights", "grad bias")
    for name, got, want in zip(names, _grads((out * go).sum(), leaves), _grads((ref * go.double()).sum(), l64)):
        assert got.dtype == dtype
        assert_close_rel(got, want, dtype, name)


# ------------------------------------------------------------------------ the triton backend itself


def _triton():
    pytest.importorskip("triton")
    import cumo_kernels.triton as tb

    return tb


def test_triton_refusal_messages(monkeypatch):
    tb = _triton()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = tb.refusal("cpu")
    assert why is not None and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.refusal("cpu") is None
    assert (tb.refusal("cuda") is None) == torch.cuda.is_available()
    assert "mps" in tb.refusal("mps")


def test_triton_refuses_float64():
    tb = _triton()
    from cumo_kernels.dispatch import Unsupported

    with pytest.raises(Unsupported, match="float64"):  # so that backend="auto" falls back
        tb.route(torch.zeros(3, 4, dtype=torch.float64), 2, 1)


def test_triton_source_has_no_host_sync():
    """No .item(), .tolist(), .cpu(), nonzero or data-dependent shapes in the backend's code."""
    root = Path(cumo_kernels.__file__).parent / "triton"
    pattern = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|nonzero|\.numpy\(|torch\.cuda\.synchronize|bincount|unique")
    bad = []
    for path in sorted(root.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code):
                bad.append(f"{path.name}:{i}: {line.strip()}")
    assert not bad, "host syncs in the triton backend:\n" + "\n".join(bad)


def test_triton_launchers_set_the_tensors_device():
    """Triton launches on the current CUDA device, not the tensors': every function that launches
    a kernel sets the device from its tensors (a layer on cuda:1 while cuda:0 is current, as with
    device_map="auto", would otherwise run its kernels on the wrong GPU)."""
    import importlib
    import inspect

    launch = re.compile(r"_kernel\[|\blaunch\(|_fwd_tma\b|\b_(fwd|dx|dw)\b,")
    missing = []
    for name in ("grouped_linear", "grouped_linear_tma", "routing", "permute"):
        mod = importlib.import_module(f"cumo_kernels.triton.{name}")
        for fname, fn in vars(mod).items():
            if not inspect.isfunction(fn) or fn.__module__ != mod.__name__:
                continue
            src = inspect.getsource(inspect.unwrap(fn))
            if launch.search(src) and not getattr(fn, "sets_tensor_device", False):
                missing.append(f"{name}.{fname}")
    assert not missing, "launchers that do not set the tensors' CUDA device: " + ", ".join(missing)


FORWARD_LAUNCHES = [
    "_route_x_kernel",
    "_route_reduce_kernel",
    "_hist_kernel",
    "_sort_scatter_kernel",
    "_grouped_linear_kernel",
    "_grouped_linear_kernel",
    "_slot_sum_kernel",
]
BACKWARD_LAUNCHES = [
    "_grouped_linear_dx_kernel",  # fc2: d h, with grad_out gathered and scaled on load, + d routing weights
    "_grouped_linear_dw_kernel",  # fc2: d w2, d b2
    "_act_grad_kernel",  # fc1: d pre = d h * act'(pre), once
    "_grouped_linear_dx_kernel",  # fc1: d x in slot order
    "_grouped_linear_dw_kernel",  # fc1: d w1, d b1, x gathered on load
    "_slot_sum_kernel",  # fc1: sum over each token's k slots
    "_route_x_bwd_kernel",  # d logits and the router's share of d x
    "_dgate_kernel",  # d gate: float32 partials over token splits
    "_dgate_reduce_kernel",  # d gate: sum of the splits in order
]


@pytest.mark.skipif(not INTERPRET, reason="counts launches through the Triton interpreter (TRITON_INTERPRET=1)")
def test_triton_layer_launches(monkeypatch):
    """moe_mlp with backend='triton' runs a fixed list of Triton launches, forward and backward."""
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    run = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting)
    inp = make_moe_inputs((3, 5), 13, 19, 11, 4)
    leaves = {n: v.requires_grad_() for n, v in inp.items()}
    y, bal, z = cumo_kernels.moe_mlp(**leaves, top_k=2, activation="gelu", backend="triton")
    assert launched == FORWARD_LAUNCHES, launched
    launched.clear()
    (y.sum() + bal + z).backward()
    assert sorted(launched) == sorted(BACKWARD_LAUNCHES), launched


# ------------------------------------------------------------------------- on GPUs, real shapes

# name: (B, N, in, hidden, out, E, k, activation): DESIGN.md's shapes up to a few thousand tokens
# (the float64 oracle runs every expert densely over all tokens, four backward passes).
GPU_SHAPES = {
    "connector-infer": (1, 576, 2048, 4096, 4096, 4, 2, "gelu"),
    "connector-train": (4, 576, 2048, 4096, 4096, 4, 2, "gelu"),
    "clip-infer": (10, 577, 1024, 4096, 1024, 4, 2, "quick_gelu"),
    "clip-train-whole": (4, 577, 1024, 4096, 1024, 4, 2, "quick_gelu"),
}


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_cuda_design_shapes(dtype, shape):
    import test_moe_mlp

    b, n, d_in, hidden, d_out, e, k, act = GPU_SHAPES[shape]
    inputs = make_moe_inputs((b, n), d_in, hidden, d_out, e, dtype=dtype, device="cuda", seed=1)
    test_moe_mlp.check_moe(inputs, k, act, dtype, "cuda", "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_mlp_multiblock(device, backend, dtype):
    """A layer larger than one block of every kernel under the interpreter's fixed config (rows,
    columns, the reduction dim, token chunks per sample, sort blocks): E=6, k=2, two samples of 40
    tokens, dims 36 / 40 / 35."""
    skip_unsupported(device, backend, dtype)
    import test_moe_mlp

    inputs = make_moe_inputs((2, 40), 36, 40, 35, 6, dtype=dtype, device=device, seed=5)
    test_moe_mlp.check_moe(inputs, 2, "gelu", dtype, device, backend, seed=5)


def _autotune_configs() -> list:
    try:
        grouped_linear = importlib.import_module("cumo_kernels.triton.grouped_linear")
    except ImportError:  # no triton: the backend-parametrised tests are not generated either
        return []
    return grouped_linear._configs()


@pytest.mark.parametrize("cfg", _autotune_configs(), ids=lambda c: "BM{BM}-BN{BN}-BK{BK}".format(**c.kwargs))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_every_autotune_config(device, backend, dtype, cfg):
    """Each config of the GEMM kernels' autotune set, forced, gives the layer (forward and every
    gradient) against the float64 oracle: the autotuner may pick any of them on a GPU, and tests
    otherwise run one (the interpreter's small tiles, or CUMO_TRITON_AUTOTUNE=0's). Ragged dims
    below and above the tiles (E=6, 160 rows, dims 36 / 40 / 35), TMA forward included where on.
    A config the autotuner prunes for this dtype (shared memory estimate over the device's limit;
    sm90's in the interpreter) is skipped: forced, it would fail to launch."""
    if backend != "triton":
        pytest.skip("the triton backend's autotune set")
    skip_unsupported(device, backend, dtype)
    import test_moe_mlp

    from cumo_kernels.triton import _common

    grouped_linear = importlib.import_module("cumo_kernels.triton.grouped_linear")

    limit = _common.smem_limit(torch.device(device)) if device == "cuda" else _common.SMEM_SM90
    pruned = grouped_linear.smem_pruned(cfg, dtype, limit)
    if pruned:
        pytest.skip(f"{cfg.kwargs} ({cfg.num_stages} stages) is pruned from the autotune set: {pruned}")

    inputs = make_moe_inputs((2, 40), 36, 40, 35, 6, dtype=dtype, device=device, seed=6)
    with _common.forced_config(cfg):
        assert _common.explicit_meta({}) == _common.config_meta(cfg)
        test_moe_mlp.check_moe(inputs, 2, "quick_gelu", dtype, device, backend, seed=6)
    assert _common._forced is None


def test_triton_autotune_smem_prune():
    """The autotuner's early_config_prune keeps, per launch dtype, the configs whose shared memory
    estimate fits (sm90 here: no GPU): fp32 loses the BM128 x BN128 configs of dX and dW, fp16
    keeps all; it takes Triton's call (configs, named_args, **kwargs) and never returns none.
    Outside the interpreter, the autotuned kernels carry it and Triton's own prune step runs it."""
    _triton()
    from triton.runtime.autotuner import Autotuner

    from cumo_kernels.triton import _common, grouped_linear_tma

    grouped_linear = importlib.import_module("cumo_kernels.triton.grouped_linear")

    configs = grouped_linear._configs()
    limit = _common.SMEM_SM90
    # fp32: dX loses its BM128 x BN128 x BK64 config (a 128 x 64 gradient tile per stage), dW both
    # BM128 x BN128 configs (its 128 x 128 gradient tiles)
    big_dx = [c for c in configs if grouped_linear.smem_dx(_common.config_meta(c), 4) > limit]
    big_dw = [c for c in configs if c.kwargs["BM"] == c.kwargs["BN"] == 128]
    assert [c.kwargs for c in big_dx] == [{"BM": 128, "BN": 128, "BK": 64}]
    prune = _common.smem_pruner(grouped_linear.smem_dx)
    f32 = prune(configs, {"g_ptr": torch.empty(2), "N": 16}, extra=1)
    assert f32 == [c for c in configs if c not in big_dx]
    assert prune(configs, {"g_ptr": torch.empty(2, dtype=torch.float16)}) == configs
    assert prune(configs, named_args={"g_ptr": torch.empty(2)}) == f32
    assert prune(configs, {}) == f32  # no tensor: 4-byte elements
    f32_dw = _common.smem_pruner(grouped_linear.smem_dw)(configs, {"g_ptr": torch.empty(2)})
    assert f32_dw == [c for c in configs if c not in big_dw]
    smallest = _common.smem_fits(configs, grouped_linear.smem_dw, 4, 1024)
    assert smallest == [configs[0]]
    for cfg in big_dw:
        reason = grouped_linear.smem_pruned(cfg, torch.float32, limit)
        assert reason and ("dX" in reason or "dW" in reason) and str(limit) in reason
        assert grouped_linear.smem_pruned(cfg, torch.bfloat16, limit) is None
    if _common.AUTOTUNE:
        for kernel in (grouped_linear._fwd, grouped_linear_tma._fwd_tma, grouped_linear._dx, grouped_linear._dw):
            assert isinstance(kernel, Autotuner) and kernel.early_config_prune is not None
        grouped_linear._dx.nargs = {"g_ptr": torch.empty(2)}
        try:
            assert [c.kwargs for c in grouped_linear._dx.prune_configs({})] == [c.kwargs for c in f32]
        finally:
            grouped_linear._dx.nargs = None


@pytest.mark.skipif(not INTERPRET, reason="checks the TMA variant in the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_tma_forward_matches_default(monkeypatch, dtype):
    """The Hopper TMA forward (off by default, CUMO_TRITON_TMA=1) gives the default kernel's
    results bit for bit, gathered and not, on 16-byte aligned dims; unaligned dims fall back."""
    tb = _triton()
    t, e, k, d, n, o = 37, 4, 2, 16, 24, 8
    _, sort_idx, offsets = _routing(t, e, k, seed=4)
    g = seeded(4)
    x = torch.randn(t, d, generator=g).to(dtype)
    w1, b1 = torch.randn(e, n, d, generator=g).to(dtype), torch.randn(e, n, generator=g).to(dtype)
    w2, b2 = torch.randn(e, o, n, generator=g).to(dtype), torch.randn(e, o, generator=g).to(dtype)
    wts = torch.rand(t, k, generator=g).to(dtype)

    def run():
        h, pre = tb.grouped_linear_gather(x, w1, b1, sort_idx, offsets, k, "gelu")
        out, y_slot = tb.grouped_linear_combine(h, w2, b2, sort_idx, offsets, wts)
        return h, pre, out, y_slot

    monkeypatch.setenv("CUMO_TRITON_TMA", "0")
    want = run()
    monkeypatch.setenv("CUMO_TRITON_TMA", "1")
    from cumo_kernels.triton import grouped_linear_tma

    assert grouped_linear_tma.tma_usable(x, w1)
    assert not grouped_linear_tma.tma_usable(x[:, :13].contiguous(), w1[:, :, :13].contiguous())
    got = run()
    for name, a, b in zip(("h", "pre", "out", "y_slot"), got, want):
        assert torch.equal(a, b), f"{name} differs between the TMA and the default forward"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_triton_layer_no_sync_and_cuda_graph():
    """On a GPU: the layer's forward + backward make no host sync (torch's sync debug mode raises on
    one), and a CUDA graph of them replays to the eager results bit for bit (deterministic kernels)."""
    inp = make_moe_inputs((4, 577), 1024, 512, 1024, 4, dtype=torch.bfloat16, device="cuda", seed=2)
    leaves = {n: v.requires_grad_() for n, v in inp.items()}
    g = torch.randn(4, 577, 1024, generator=seeded(3)).to(device="cuda", dtype=torch.bfloat16)

    def step():
        y, bal, z = cumo_kernels.moe_mlp(**leaves, top_k=2, activation="quick_gelu", backend="triton")
        loss = (y * g).sum() + 0.1 * bal + 0.01 * z
        return (y, bal, z, *torch.autograd.grad(loss, list(leaves.values())))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotuning and the first compile happen here, before any capture
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(captured, eager)):
        assert torch.equal(a, b), f"output {i} of the CUDA graph replay differs from eager"
