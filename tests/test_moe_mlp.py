"""The composed layer `moe_mlp` / `MoEMLP` against the float64 oracle: forward values, the expert
choice, every gradient through y, balance and z separately and combined; the upcycling identity;
the tie rule; the module."""

from __future__ import annotations

import importlib

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import ACTIVATIONS, DTYPES, LOW, make_moe_inputs, poison, seeded, skip_unsupported

import cumo_kernels
from cumo_kernels.nn import MoEMLP
from cumo_kernels.testing import assert_close_rel, near_tie_tokens

# The torch backend's grouped linear module, monkeypatched below (the package's attribute of that
# name is the op function).
REF_GROUPED_LINEAR = importlib.import_module("cumo_kernels.reference.grouped_linear")
F32 = torch.float32
D_IN, HIDDEN, D_OUT = 13, 19, 11  # not multiples of 4, 8 or 16
PARAMS = ("x", "gate_weight", "w1", "b1", "w2", "b2")


def _run(inputs, top_k, activation, backend, g, glu=None):
    """moe_mlp on fresh leaves: outputs, the backend's expert ids and the gradients per loss.
    (Leaves keep the inputs' strides: clone() preserves a transposed w1's.)"""
    leaves = {n: (None if t is None else t.detach().clone().requires_grad_()) for n, t in inputs.items()}
    kw = {} if glu is None else {"glu": glu}
    y, balance, z = cumo_kernels.moe_mlp(**leaves, top_k=top_k, activation=activation, backend=backend, **kw)
    ids = layer_ids(leaves["x"], leaves["gate_weight"], top_k, backend)
    grads = _loss_grads(y, balance, z, g, leaves)
    return {"y": y, "balance": balance, "z": z}, ids, grads


def layer_ids(x, gate_weight, top_k, backend):
    """The expert ids [T, k] the layer itself routes by: a fused backend's routing from x
    (cumo::route_x, the layer's first op), else route() of F.linear's logits, as moe_mlp does.
    (Re-routing F.linear's logits for a fused backend is not the layer's choice: on a GPU, cuBLAS's
    reduced-precision reductions round some logits otherwise than the fused kernel's float32
    accumulation, and where rounded logits tie the order differs: the first GPU run.)"""
    from cumo_kernels import dispatch

    samples = x.shape[0] if x.dim() == 3 else 1
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    name = dispatch.choose(backend, x.device, x.dtype, gate_weight.shape[0])
    with torch.no_grad():
        if dispatch.composition(name) == "fused":
            return torch.ops.cumo.route_x(x2, gate_weight.detach().contiguous(), top_k, samples, name)[1]
        logits = F.linear(x2, gate_weight.detach())
        return cumo_kernels.route(logits, top_k, samples, backend=backend)[1]


def _loss_grads(y, balance, z, g, leaves):
    names = [n for n in PARAMS if leaves[n] is not None]
    ts = [leaves[n] for n in names]
    losses = {
        "y": (y * g).sum(),
        "balance": balance,
        "z": z,
        "combined": (y * g).sum() + 0.1 * balance + 0.01 * z,
    }
    out = {}
    for lname, loss in losses.items():
        gr = torch.autograd.grad(loss, ts, retain_graph=True, allow_unused=True, materialize_grads=True)
        out.update({(lname, n): v for n, v in zip(names, gr)})
    return out


def check_moe(inputs, top_k, activation, dtype, device, backend, seed=0, glu=None):
    """Compare moe_mlp (values, ids, every gradient) with the float64 oracle, per the numerics
    policy. Returns the backend's expert ids. `glu` ("concat" or "interleaved"): gated experts."""
    x = inputs["x"]
    g = torch.randn(*x.shape[:-1], inputs["w2"].shape[1], generator=seeded(seed + 1)).to(device=device, dtype=dtype)
    poison(device)
    outs, ids, grads = _run(inputs, top_k, activation, backend, g, glu)
    base = None
    if backend != "torch" and dtype != F32:
        base = _run(inputs, top_k, activation, "torch", g, glu)

    y, balance, z = outs["y"], outs["balance"], outs["z"]
    assert y.shape == (*x.shape[:-1], inputs["w2"].shape[1]) and y.dtype == dtype
    assert balance.shape == () and balance.dtype == F32
    assert z.shape == () and z.dtype == dtype

    # (a) the expert choice: exactly the oracle's in float32; in low precision except near ties.
    _, _, _, own_ids = oracle.moe_oracle(**inputs, top_k=top_k, activation=activation, glu=glu)
    if dtype == F32:
        assert torch.equal(ids.cpu(), own_ids.cpu()), "expert ids differ from the oracle's"
    else:
        # near ties of the probabilities CuMo ranks: of the logits rounded to the activation dtype
        xf = inputs["x"].double().reshape(-1, x.shape[-1])
        probs = torch.softmax(oracle.round_to(xf @ inputs["gate_weight"].double().t(), dtype), dim=-1)
        keep = ~near_tie_tokens(probs, top_k, dtype).cpu()
        bad = (ids.cpu() != own_ids.cpu()).any(dim=-1) & keep
        assert not bad.any(), f"expert ids differ from the oracle's on tokens {bad.nonzero().flatten().tolist()}"

    # (b) values and gradients against the oracle evaluated on the backend's own ids.
    leaves64 = {n: oracle.up(t, True) for n, t in inputs.items()}
    y64, bal64, z64, _ = oracle.moe_oracle(
        **leaves64, top_k=top_k, activation=activation, expert_ids=ids, dtype=dtype, glu=glu
    )
    refs = {"y": y64, "balance": bal64, "z": z64}
    ref_grads = _loss_grads(y64, bal64, z64, g.double(), leaves64)
    for name in ("y", "balance", "z"):
        assert_close_rel(outs[name], refs[name], dtype, name, baseline=None if base is None else base[0][name])
    for key, val in grads.items():
        assert val.dtype == dtype, f"grad {key} has dtype {val.dtype}"
        bl = None if base is None else base[2][key]
        assert_close_rel(val, ref_grads[key], dtype, f"grad of {key[1]} through {key[0]}", baseline=bl)
    return ids


SHAPES = [(1,), (7,), (33,), (3, 5)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_mlp_matches_oracle(device, backend, dtype, shape, activation):
    skip_unsupported(device, backend, dtype)
    if dtype != F32 and shape == (1,):
        # One token's gradient is a single rank-1 term: nothing averages its low-precision
        # rounding, and its relative error hangs on one cancelling difference (measured over 30
        # seeds in bf16: a plain CuMo-style bf16 loop reaches 0.25 on the gate gradient). The
        # 1e-2 policy is a property of many-token tensors; T=1 runs in float32 (1e-5).
        pytest.skip("T=1 is ill-conditioned in low precision; covered in float32")
    inputs = make_moe_inputs(shape, D_IN, HIDDEN, D_OUT, 4, dtype=dtype, device=device, seed=len(shape) * 10 + shape[0])
    check_moe(inputs, 2, activation, dtype, device, backend)


# name: (shape, E, k, bias, kind, activation)
CASES = {
    "k1": ((7,), 4, 1, True, "random", "quick_gelu"),
    "k1_3d": ((3, 5), 4, 1, True, "random", "gelu"),
    "k_eq_E": ((7,), 4, 4, True, "random", "quick_gelu"),
    "k_eq_E_3d": ((3, 5), 4, 4, True, "random", "silu"),
    "E8_k2": ((33,), 8, 2, True, "random", "gelu"),
    "E8_k3_3d": ((3, 5), 8, 3, True, "random", "quick_gelu"),
    "E8_k8": ((7,), 8, 8, True, "random", "gelu_tanh"),
    "E1_k1": ((7,), 1, 1, True, "random", "quick_gelu"),
    "E1_k1_3d": ((3, 5), 1, 1, False, "random", "relu"),
    "no_bias": ((7,), 4, 2, False, "random", "quick_gelu"),
    "no_bias_3d": ((3, 5), 4, 2, False, "random", "gelu"),
    "one_expert": ((33,), 4, 2, True, "one_expert", "quick_gelu"),
    "one_expert_k1": ((7,), 4, 1, True, "one_expert", "gelu"),
    "one_expert_3d": ((3, 5), 4, 2, True, "one_expert", "gelu"),
    "empty_expert": ((33,), 4, 2, True, "empty_expert", "quick_gelu"),
    "empty_expert_k3_3d": ((3, 5), 4, 3, False, "empty_expert", "silu"),
    "ties": ((33,), 4, 2, True, "ties", "quick_gelu"),
    "ties_k1_3d": ((3, 5), 4, 1, True, "ties", "gelu"),
    "zero_gate": ((7,), 4, 2, True, "zero_gate", "quick_gelu"),
    "zero_gate_3d_k3": ((3, 5), 4, 3, True, "zero_gate", "relu"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_mlp_cases(device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
    shape, e, k, bias, kind, act = CASES[case]
    inputs = make_moe_inputs(shape, D_IN, HIDDEN, D_OUT, e, bias=bias, kind=kind, dtype=dtype, device=device, seed=3)
    ids = check_moe(inputs, k, act, dtype, device, backend, seed=3).cpu()
    assert ((ids >= 0) & (ids < e)).all()
    assert all(len(set(row)) == k for row in ids.tolist()), "a token chose one expert twice"
    if kind == "one_expert":
        assert (ids[:, 0] == e - 1).all(), "one_expert inputs: every first choice must be the last expert"
    if kind == "empty_expert":
        assert not (ids == 1).any(), "empty_expert inputs: expert 1 must get no tokens"
    if kind == "zero_gate":
        assert torch.equal(ids, torch.arange(k).expand_as(ids)), "equal logits: ids must be 0..k-1"
    if kind == "ties":
        # Experts 0 and 2 tie exactly in every token: 2 is chosen only together with 0, after it.
        for row in ids.tolist():
            if 2 in row:
                assert 0 in row and row.index(0) < row.index(2), f"tie rule broken: {row}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_mlp_inference_matches_oracle(device, backend, dtype, case, monkeypatch):
    """The forward without autograd (torch.no_grad): the CPU torch path then runs both expert
    layers in one blocked op (cumo::expert_mlp). Blocks of a few rows, so that experts span several
    blocks and a block boundary falls inside every expert."""
    skip_unsupported(device, backend, dtype)
    monkeypatch.setattr(REF_GROUPED_LINEAR, "_BLOCK_BYTES", 5 * HIDDEN * 4)
    shape, e, k, bias, kind, act = CASES[case]
    inputs = make_moe_inputs(shape, D_IN, HIDDEN, D_OUT, e, bias=bias, kind=kind, dtype=dtype, device=device, seed=5)
    with torch.no_grad():
        y, balance, z = cumo_kernels.moe_mlp(**inputs, top_k=k, activation=act, backend=backend)
        x2 = inputs["x"].reshape(-1, D_IN)
        samples = inputs["x"].shape[0] if inputs["x"].dim() == 3 else 1
        ids = cumo_kernels.route(F.linear(x2, inputs["gate_weight"]), k, samples, backend=backend)[1]
    assert not y.requires_grad
    leaves64 = {n: oracle.up(t, False) for n, t in inputs.items()}
    y64, bal64, z64, _ = oracle.moe_oracle(**leaves64, top_k=k, activation=act, expert_ids=ids, dtype=dtype)
    base = None
    if backend != "torch" and dtype != F32:
        with torch.no_grad():
            base = cumo_kernels.moe_mlp(**inputs, top_k=k, activation=act, backend="torch")
    for i, (name, out, ref) in enumerate((("y", y, y64), ("balance", balance, bal64), ("z", z, z64))):
        assert_close_rel(out, ref, dtype, f"{name} (no_grad)", baseline=None if base is None else base[i])


def test_inference_path_uses_one_blocked_op(monkeypatch):
    """On CPU tensors without autograd the torch backend runs cumo::expert_mlp (no [T*k, hidden]
    tensor), with autograd the two grouped_linear ops; both give the same y."""
    inputs = make_moe_inputs((3, 5), D_IN, HIDDEN, D_OUT, 4, seed=7)
    calls = []
    real = cumo_kernels.reference.expert_mlp
    monkeypatch.setattr(cumo_kernels.reference, "expert_mlp", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y0 = cumo_kernels.moe_mlp(**inputs, top_k=2, backend="torch")[0]
    assert calls, "the no_grad CPU forward did not use cumo::expert_mlp"
    calls.clear()
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    y1 = cumo_kernels.moe_mlp(**leaves, top_k=2, backend="torch")[0]
    assert not calls and y1.requires_grad
    assert_close_rel(y0, y1.detach(), F32, "y no_grad vs grad")


@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=str)
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("kind", ["random", "one_expert", "zero_gate"])
def test_upcycling_identity(device, backend, shape, top_k, kind):
    """All experts equal: moe_mlp equals the dense MLP to float32 rounding whatever the gate, and
    each gradient summed over experts equals the dense gradient."""
    act = "quick_gelu"
    inp = make_moe_inputs(shape, D_IN, HIDDEN, D_OUT, 4, kind=kind, device=device, seed=top_k)
    for n in ("w1", "b1", "w2", "b2"):
        inp[n] = inp[n][:1].expand_as(inp[n]).contiguous()
    leaves = {n: t.clone().requires_grad_() for n, t in inp.items()}
    y, _, _ = cumo_kernels.moe_mlp(**leaves, top_k=top_k, activation=act, backend=backend)

    d = {n: oracle.up(inp[n][0] if n in ("w1", "b1", "w2", "b2") else inp[n], True) for n in inp}
    dense64 = oracle.dense_mlp_oracle(d["x"], d["w1"], d["b1"], d["w2"], d["b2"], act)
    dense32 = F.linear(
        oracle.activation(F.linear(inp["x"], inp["w1"][0], inp["b1"][0]), act), inp["w2"][0], inp["b2"][0]
    )
    assert_close_rel(y, dense64, F32, "y vs the float64 dense MLP")
    assert_close_rel(y, dense32, F32, "y vs the float32 dense MLP")

    g = torch.randn(y.shape, generator=seeded(5)).to(device)
    gx, gw1, gb1, gw2, gb2 = torch.autograd.grad((y * g).sum(), [leaves[n] for n in ("x", "w1", "b1", "w2", "b2")])
    rx, rw1, rb1, rw2, rb2 = torch.autograd.grad(
        (dense64 * g.double()).sum(), [d[n] for n in ("x", "w1", "b1", "w2", "b2")]
    )
    assert_close_rel(gx, rx, F32, "grad x")
    for name, got, ref in (("w1", gw1, rw1), ("b1", gb1, rb1), ("w2", gw2, rw2), ("b2", gb2, rb2)):
        assert_close_rel(got.sum(dim=0), ref, F32, f"grad {name} summed over experts")


def test_losses_by_hand(device, backend):
    """balance and z from CUMO.md's formulas on a hand-checkable case: B=2 samples, N=2, E=2, k=1."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]], device=device)
    gate = torch.tensor([[2.0, 0.0], [0.0, 1.0]], device=device)
    w1 = torch.randn(2, 3, 2, generator=seeded(0)).to(device)
    w2 = torch.randn(2, 2, 3, generator=seeded(1)).to(device)
    _, balance, z = cumo_kernels.moe_mlp(x, gate, w1, None, w2, None, top_k=1, activation="relu", backend=backend)
    # logits per token: s0: [2,0], [0,1]; s1: [2,0], [2,0]
    p_a = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    p_b = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    P0, f0 = (p_a + p_b) / 2, torch.tensor([0.5, 0.5], dtype=torch.float64)
    P1, f1 = p_a, torch.tensor([1.0, 0.0], dtype=torch.float64)
    want_balance = ((P0 * f0).sum() + (P1 * f1).sum()) / 4 * 4
    lse = lambda a, b: torch.logsumexp(torch.tensor([a, b], dtype=torch.float64), 0)  # noqa: E731
    want_z = (3 * lse(2.0, 0.0) ** 2 + lse(0.0, 1.0) ** 2) / 4
    assert_close_rel(balance, want_balance, F32, "balance")
    assert_close_rel(z, want_z, F32, "z")
    # A 2-D x is one sample: the statistics pool all four tokens.
    _, bal2, _ = cumo_kernels.moe_mlp(
        x.reshape(4, 2), gate, w1, None, w2, None, top_k=1, activation="relu", backend=backend
    )
    P, f = (3 * p_a + p_b) / 4, torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert_close_rel(bal2, (P * f).sum() / 2 * 4, F32, "balance of a 2-D x")


# ------------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_functional(device, backend, bias):
    torch.manual_seed(0)
    layer = MoEMLP(D_IN, HIDDEN, D_OUT, num_experts=4, top_k=2, activation="gelu", bias=bias, backend=backend).to(
        device
    )
    assert layer.gate.weight.shape == (4, D_IN) and layer.gate.bias is None
    assert layer.w1.shape == (4, HIDDEN, D_IN) and layer.w2.shape == (4, D_OUT, HIDDEN)
    if bias:
        assert layer.b1.shape == (4, HIDDEN) and layer.b2.shape == (4, D_OUT)
    else:
        assert layer.b1 is None and layer.b2 is None
    keys = {"gate.weight", "w1", "w2"} | ({"b1", "b2"} if bias else set())
    assert set(layer.state_dict()) == keys
    # nn.Linear's initialisation bounds per expert: |w| <= 1/sqrt(fan_in).
    assert layer.w1.abs().max() <= 1 / D_IN**0.5 and layer.w2.abs().max() <= 1 / HIDDEN**0.5
    assert layer.w1[0].std() > 0.1 / D_IN**0.5
    assert not torch.equal(layer.w1[0], layer.w1[1]), "experts must be initialised independently"

    x = torch.randn(3, 5, D_IN, device=device)
    y, bal, z = layer(x)
    fy, fbal, fz = cumo_kernels.moe_mlp(
        x, layer.gate.weight, layer.w1, layer.b1, layer.w2, layer.b2, top_k=2, activation="gelu", backend=backend
    )
    assert torch.equal(y, fy) and torch.equal(bal, fbal) and torch.equal(z, fz)
    inputs = {"x": x, "gate_weight": layer.gate.weight, "w1": layer.w1, "b1": layer.b1, "w2": layer.w2, "b2": layer.b2}
    check_moe({n: None if t is None else t.detach() for n, t in inputs.items()}, 2, "gelu", F32, device, backend)


def test_module_defaults(device):
    layer = MoEMLP(6, 10, num_experts=3, top_k=2).to(device)
    assert layer.activation == "quick_gelu" and layer.out_features == 6
    y, bal, z = layer(torch.randn(4, 6, device=device))
    assert y.shape == (4, 6) and bal.dtype == F32 and z.dtype == F32
    assert "num_experts=3" in repr(layer) and "top_k=2" in repr(layer)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_module_low_precision_params(device, backend, dtype):
    """Low-precision parameters training on a frozen input (no requires_grad on x), on every backend."""
    skip_unsupported(device, backend, dtype)
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2, dtype=dtype, backend=backend).to(device)
    y, bal, z = layer(torch.randn(2, 3, 6, device=device, dtype=dtype))
    assert y.shape == (2, 3, 5) and y.dtype == dtype and bal.dtype == F32 and z.dtype == dtype
    (y.float().square().mean() + 0.1 * bal + 0.01 * z).backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), n


def test_autocast_casts_like_linear(device):
    """Under torch.autocast the block behaves like the nn.Linear layers it replaces."""
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2).to(device)
    x = torch.randn(7, 6, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, bal, z = layer(x)
        ref = F.linear(x, layer.gate.weight)
    assert y.dtype == ref.dtype == torch.bfloat16 and bal.dtype == F32 and z.dtype == torch.bfloat16
    (y.float().sum() + bal + z.float()).backward()
    assert layer.w1.grad.dtype == F32 and torch.isfinite(layer.w1.grad).all()
    # Same numbers as the bf16 computation done explicitly.
    inputs = {n: t.detach().to(torch.bfloat16) for n, t in (("x", x),)}
    ey, _, _ = cumo_kernels.moe_mlp(
        inputs["x"],
        *(p.detach().to(torch.bfloat16) for p in (layer.gate.weight, layer.w1, layer.b1, layer.w2, layer.b2)),
        top_k=2,
    )
    assert torch.equal(y.detach(), ey)


# ------------------------------------------------------------------- training with frozen tensors

# name: the inputs that train (the others are frozen: no requires_grad)
FROZEN_CASES = {
    "frozen_x": ("gate_weight", "w1", "b1", "w2", "b2"),  # CuMo's connector on a frozen encoder's output
    "frozen_x_and_fc1": ("gate_weight", "w2", "b2"),  # nothing before fc1's activation needs a gradient
    "frozen_x_and_gate": ("w1", "b1", "w2", "b2"),
    "frozen_x_only_w1": ("w1",),
    "frozen_x_only_b1": ("b1",),
    "frozen_fc1": ("x", "gate_weight", "w2", "b2"),  # the input trains, fc1 does not
}


@pytest.mark.parametrize("case", list(FROZEN_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_with_frozen_tensors_matches_oracle(device, backend, dtype, case):
    """Training where only some inputs need a gradient, on every backend: a frozen x with trainable
    weights is CuMo's first stage (the connector trains on a frozen encoder's output). Whatever a
    backend keeps for the backward (the fused path keeps fc1's pre-activation only when a gradient
    through fc1 can follow) must cover every such split; the gradients of the trainable tensors
    match the float64 oracle's, and the frozen ones get none."""
    skip_unsupported(device, backend, dtype)
    trainable = FROZEN_CASES[case]
    inputs = make_moe_inputs((3, 5), D_IN, HIDDEN, D_OUT, 4, dtype=dtype, device=device, seed=21)
    g = torch.randn(3, 5, D_OUT, generator=seeded(22)).to(device=device, dtype=dtype)

    def run(backend_name):
        leaves = {n: t.detach().clone().requires_grad_(n in trainable) for n, t in inputs.items()}
        y, balance, z = cumo_kernels.moe_mlp(**leaves, top_k=2, activation="gelu", backend=backend_name)
        ((y * g).sum() + 0.1 * balance + 0.01 * z).backward()
        return leaves

    poison(device)
    leaves = run(backend)
    for n, t in leaves.items():
        if n not in trainable:
            assert t.grad is None, f"frozen {n} got a gradient"
    base = run("torch") if backend != "torch" and dtype != F32 else None
    ids = layer_ids(inputs["x"], inputs["gate_weight"], 2, backend)
    leaves64 = {n: oracle.up(t, n in trainable) for n, t in inputs.items()}
    y64, bal64, z64, _ = oracle.moe_oracle(**leaves64, top_k=2, activation="gelu", expert_ids=ids, dtype=dtype)
    ((y64 * g.double()).sum() + 0.1 * bal64 + 0.01 * z64).backward()
    for n in trainable:
        got = leaves[n].grad
        assert got is not None and got.dtype == dtype, f"grad of {n}: {None if got is None else got.dtype}"
        assert_close_rel(got, leaves64[n].grad, dtype, f"grad of {n}", baseline=None if base is None else base[n].grad)


# ---------------------------------------------------------------------------- initialisation


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return (fa - fb).abs().max().item()


def _init_modules():
    from cumo.blocks import CLIPMoEMLP, MLPMoE

    # fan-in and fan-out differ in every layer (by 4x), so a bound from the wrong one shows
    return {
        "MoEMLP": lambda: MoEMLP(40, 160, 10, num_experts=4, top_k=2),
        "MoEMLP_no_bias": lambda: MoEMLP(40, 160, 10, num_experts=4, top_k=2, bias=False),
        "MLPMoE": lambda: MLPMoE(4, 2, 40, 160),
        "CLIPMoEMLP": lambda: CLIPMoEMLP(40, 160, num_experts=4, top_k=2),
    }


@pytest.mark.parametrize("module", list(_init_modules()))
def test_initialisation_is_nn_linears_per_expert(module):
    """Every parameter starts with nn.Linear's distribution for its expert's shape (the gate as a
    bias-free nn.Linear(in, E)): compared with the parameters of freshly built nn.Linear layers of
    the same shapes, by their support (|p| <= nn.Linear's bound 1/sqrt(in_features), reached to
    within 10%) and by a two-sample Kolmogorov-Smirnov test; the experts are independent draws."""
    torch.manual_seed(40)
    layer = _init_modules()[module]()
    e = layer.num_experts
    linears = {
        "gate.weight": (layer.in_features, e, False),
        "w1": (layer.in_features, layer.hidden_features, True),
        "w2": (layer.hidden_features, layer.out_features, True),
    }
    torch.manual_seed(41)
    checked = set()
    for pname, (fan_in, fan_out, per_expert) in linears.items():
        reps = 16 if per_expert else 16 * e  # reference draws: many more than the layer's own
        refs = [torch.nn.Linear(fan_in, fan_out) for _ in range(reps)]
        bound = 1.0 / fan_in**0.5  # nn.Linear's documented U(-sqrt(k), sqrt(k)), k = 1 / in_features
        pairs = [(pname, torch.stack([r.weight for r in refs]))]
        bname = {"w1": "b1", "w2": "b2"}.get(pname)
        if bname is not None and getattr(layer, bname) is not None:
            pairs.append((bname, torch.stack([r.bias for r in refs])))
        for name, ref in pairs:
            p = layer.get_parameter(name).detach()
            checked.add(name)
            assert ref.abs().max() <= bound  # the reference itself, as documented
            assert p.abs().max() <= bound, f"{name}: |p| reaches {p.abs().max():.4f} > nn.Linear's bound {bound:.4f}"
            assert p.abs().max() >= 0.9 * bound, f"{name}: |p| <= {p.abs().max():.4f}, nn.Linear's reach {bound:.4f}"
            n, m = p.numel(), ref.numel()
            crit = 2.7 * ((n + m) / (n * m)) ** 0.5  # alpha ~ 1e-6
            d = _ks_distance(p, ref)
            assert d <= crit, f"{name}: KS distance {d:.3f} from nn.Linear's initialisation > {crit:.3f}"
            if name != "gate.weight":
                assert not torch.equal(p[0], p[1]), f"{name}: experts 0 and 1 start equal"
    assert checked == {n for n, _ in layer.named_parameters()}, "a parameter was not checked"
