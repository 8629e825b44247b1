"""Argument checking (errors name the argument), backend choice, empty inputs and NaN isolation."""

from __future__ import annotations

import oracle
import pytest
import torch
from conftest import make_moe_inputs, seeded

import cumo_kernels
from cumo_kernels.nn import MoEMLP
from cumo_kernels.testing import assert_close_rel

F32 = torch.float32


def _inputs(**over):
    inp = make_moe_inputs((7,), 6, 10, 5, 4, seed=0)
    inp.update(over)
    return inp


def _call(inp, **kw):
    kw.setdefault("top_k", 2)
    return cumo_kernels.moe_mlp(**inp, **kw)


BAD_SHAPES = {
    "gate_weight": torch.randn(4, 7),  # wrong in
    "w1": torch.randn(3, 10, 6),  # wrong E
    "b1": torch.randn(4, 9),  # wrong hidden
    "w2": torch.randn(4, 5, 9),  # wrong hidden
    "b2": torch.randn(3, 5),  # wrong E
}


@pytest.mark.parametrize("arg", list(BAD_SHAPES))
def test_mismatched_shapes_name_the_argument(arg):
    with pytest.raises(ValueError, match=arg):
        _call(_inputs(**{arg: BAD_SHAPES[arg]}))


def test_w1_in_features_mismatch():
    with pytest.raises(ValueError, match="w1"):
        _call(_inputs(w1=torch.randn(4, 10, 7)))


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_top_k_out_of_range(top_k):
    with pytest.raises(ValueError, match="top_k"):
        _call(_inputs(), top_k=top_k)


@pytest.mark.parametrize("top_k", [2.0, True, "2"])
def test_top_k_wrong_type(top_k):
    with pytest.raises((TypeError, ValueError), match="top_k"):
        _call(_inputs(), top_k=top_k)


@pytest.mark.parametrize("top_k", [0, 5])
def test_module_top_k_out_of_range(top_k):
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(6, 10, num_experts=4, top_k=top_k)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MoEMLP(6, 10, num_experts=4, top_k=2, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        MoEMLP(6, 10, num_experts=4, top_k=2, backend="jax")
    with pytest.raises(ValueError, match="num_experts"):
        MoEMLP(6, 10, num_experts=0, top_k=1)


@pytest.mark.parametrize("arg", ["gate_weight", "w1", "b1", "w2", "b2"])
def test_dtype_mix_names_the_argument(arg):
    inp = _inputs()
    inp[arg] = inp[arg].double()
    with pytest.raises(TypeError, match=arg):
        _call(inp)


def test_dtype_mix_low_precision():
    inp = {n: t.to(torch.bfloat16) for n, t in _inputs().items()}
    inp["w2"] = inp["w2"].half()
    with pytest.raises(TypeError, match="w2"):
        _call(inp)


@pytest.mark.parametrize("arg", ["x", "gate_weight", "w1"])
def test_integer_inputs(arg):
    inp = _inputs()
    inp[arg] = inp[arg].round().long()
    with pytest.raises(TypeError, match=arg):
        _call(inp)


def test_one_dimensional_input():
    with pytest.raises(ValueError, match="x"):
        _call(_inputs(x=torch.randn(6)))
    with pytest.raises(ValueError, match="x"):
        _call(_inputs(x=torch.randn(1, 2, 3, 6)))


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        _call(_inputs(), activation="swish")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation"):
        cumo_kernels.grouped_linear(x, torch.randn(2, 5, 3), None, torch.tensor([0, 2, 4]), "tanh")


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        _call(_inputs(), backend="jax")
    with pytest.raises(ValueError, match="backend"):
        cumo_kernels.route(torch.randn(3, 4), 2, backend="jax")
    monkeypatch.setenv("CUMO_KERNELS_BACKEND", "jax")
    with pytest.raises(ValueError, match="CUMO_KERNELS_BACKEND"):
        _call(_inputs())


def test_env_backend_is_used(monkeypatch):
    inp = _inputs()
    ref = _call(inp, backend="torch")
    monkeypatch.setenv("CUMO_KERNELS_BACKEND", "torch")
    out = _call(inp)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_unavailable_backend_raises_with_reason(name):
    if name in cumo_kernels.available_backends("cpu"):
        pytest.skip(f"backend {name!r} runs on the CPU here")
    with pytest.raises(RuntimeError, match=name) as info:
        _call(_inputs(), backend=name)
    assert len(str(info.value)) > len(name) + 20, f"no reason given: {info.value}"
    with pytest.raises(RuntimeError, match=name):
        cumo_kernels.route(torch.randn(3, 4), 2, backend=name)


def test_available_backends():
    names = cumo_kernels.available_backends()
    assert "torch" in names and set(names) <= {"torch", "triton", "cuda"}
    assert "torch" in cumo_kernels.available_backends("cpu")


def test_auto_backend_runs_and_matches_torch():
    inp = _inputs()
    for a, b in zip(_call(inp, backend="auto"), _call(inp, backend="torch")):
        assert_close_rel(a, b.double(), F32, "auto vs torch")


# ---------------------------------------------------------------------------------- op arguments


def test_op_argument_errors():
    logits = torch.randn(6, 4)
    with pytest.raises(ValueError, match="logits"):
        cumo_kernels.route(torch.randn(6), 2)
    with pytest.raises(ValueError, match="top_k"):
        cumo_kernels.route(logits, 5)
    with pytest.raises(ValueError, match="num_samples"):
        cumo_kernels.route(logits, 2, 4)
    with pytest.raises(TypeError, match="logits"):
        cumo_kernels.route(logits.long(), 2)
    x, ids = torch.randn(6, 3), torch.zeros(6, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="expert_ids"):
        cumo_kernels.permute(x, ids.float(), 4)
    with pytest.raises(ValueError, match="expert_ids"):
        cumo_kernels.permute(x, ids[:5], 4)
    with pytest.raises(ValueError, match="num_experts"):
        cumo_kernels.permute(x, ids, 0)
    w = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match="offsets"):
        cumo_kernels.grouped_linear(x, w, None, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="weight"):
        cumo_kernels.grouped_linear(x, torch.randn(4, 5, 2), None, torch.tensor([0, 1, 2, 3, 6]))
    with pytest.raises(ValueError, match="bias"):
        cumo_kernels.grouped_linear(x, w, torch.randn(4, 4), torch.tensor([0, 1, 2, 3, 6]))
    with pytest.raises(TypeError, match="weight"):
        cumo_kernels.grouped_linear(x, w.half(), None, torch.tensor([0, 1, 2, 3, 6]))
    with pytest.raises(ValueError, match="sort_idx|weights"):
        cumo_kernels.unpermute(torch.randn(12, 5), torch.arange(12), torch.rand(5, 2))
    with pytest.raises(ValueError, match="prob_sums"):
        cumo_kernels.aux_losses(torch.rand(2, 4), torch.rand(2, 3), torch.rand(2), 5)
    with pytest.raises(ValueError, match="tokens_per_sample"):
        cumo_kernels.aux_losses(torch.rand(2, 4), torch.rand(2, 4), torch.rand(2), 0)


# ---------------------------------------------------------------------------------- empty input


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)], ids=str)
def test_empty_input(device, backend, lead):
    inp = make_moe_inputs(lead, 6, 10, 5, 4, device=device)
    leaves = {n: t.requires_grad_() for n, t in inp.items()}
    y, balance, z = cumo_kernels.moe_mlp(**leaves, top_k=2, backend=backend)
    assert y.shape == (*lead, 5) and y.dtype == F32
    assert balance.shape == () and balance.dtype == F32 and torch.isfinite(balance) and balance.item() == 0.0
    assert z.shape == () and z.dtype == F32 and torch.isfinite(z) and z.item() == 0.0
    (y.sum() + 0.1 * balance + 0.01 * z).backward()
    for n, t in leaves.items():
        assert t.grad is None or (t.grad == 0).all(), f"non-zero gradient of {n} from an empty input"


# ---------------------------------------------------------------------------------- NaN isolation


def test_nan_token_does_not_corrupt_others(device, backend):
    inp = make_moe_inputs((9,), 6, 10, 5, 4, device=device, seed=4)
    bad = 4
    x = inp["x"].clone()
    x[bad, 2] = float("nan")
    leaves = {n: t.clone().requires_grad_() for n, t in {**inp, "x": x}.items()}
    y, _, _ = cumo_kernels.moe_mlp(**leaves, top_k=2, backend=backend)
    with torch.no_grad():
        ids = cumo_kernels.route(x @ inp["gate_weight"].t(), 2, backend=backend)[1]
    assert ((ids >= 0) & (ids < 4)).all() and (ids[:, 0] != ids[:, 1]).all(), f"ids out of range: {ids.tolist()}"
    g = torch.randn(y.shape, generator=seeded(0)).to(device)
    others = [i for i in range(9) if i != bad]
    g[bad] = 0
    (gx,) = torch.autograd.grad((y[others] * g[others]).sum(), [leaves["x"]])

    ref_in = {n: oracle.up(t[others] if n == "x" else t, n == "x") for n, t in inp.items()}
    y64, _, _, _ = oracle.moe_oracle(**ref_in, top_k=2, activation="quick_gelu", dtype=F32)
    (rgx,) = torch.autograd.grad((y64 * g[others].double()).sum(), [ref_in["x"]])
    assert_close_rel(y[others], y64, F32, "y of the clean tokens")
    assert_close_rel(gx[others], rgx, F32, "grad x of the clean tokens")
