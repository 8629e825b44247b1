"""cumo.MLPMoE (CuMo's MoE connector), co-upcycling and the aux-loss helper, against CUMO.md.

The reference is tests/oracle.py's float64 implementation of CUMO.md's math; a CuMo-shaped module
(gate + a ModuleList of nn.Sequential(Linear, GELU, Linear) experts) gives the state-dict layout.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from oracle import F64, moe_oracle
from torch import nn

import cumo
from cumo_kernels.testing import assert_close_rel

E, K, MM, CH = 4, 2, 12, 10  # dims not multiples of 16 on purpose


def cumo_layout(num_experts: int, mm: int, ch: int) -> nn.Module:
    """A module with CuMo's connector parameters and their names, written from CUMO.md."""
    m = nn.Module()
    m.gate = nn.Linear(mm, num_experts, bias=False)
    m.experts = nn.ModuleList(
        nn.Sequential(nn.Linear(mm, ch), nn.GELU(), nn.Linear(ch, ch)) for _ in range(num_experts)
    )
    return m


def expected_keys(num_experts: int) -> list[str]:
    keys = ["gate.weight"]
    for i in range(num_experts):
        keys += [f"experts.{i}.0.weight", f"experts.{i}.0.bias", f"experts.{i}.2.weight", f"experts.{i}.2.bias"]
    return keys


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def test_cumo_constructor_call_and_repr():
    m = cumo.MLPMoE(num_experts=E, num_selected=K, mm_channels=MM, channels=CH, num_layers=2, dropout=False)
    assert (m.num_experts, m.num_selected, m.mm_channels, m.channels, m.num_layers) == (E, K, MM, CH, 2)
    assert m.activation == "gelu" and m.top_k == K
    assert cumo.MLPMoE(E, K, MM, CH).num_layers is None
    assert "num_selected=2" in repr(m)
    with pytest.raises(ValueError, match="top_k"):
        cumo.MLPMoE(E, E + 1, MM, CH)


@pytest.mark.parametrize("shape", [(3, 7), (1, 1), (2, 16), (7,)])  # (7,): a 2-D input is one sample
def test_forward_and_every_gradient_match_float64_oracle(backend, device, shape):
    m = cumo.MLPMoE(E, K, MM, CH, backend=backend).to(device)
    randomise(m, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, MM, generator=g).to(device).requires_grad_()
    y, balance, z = m(x)
    assert y.shape == (*shape, CH) and balance.dtype == torch.float32 and z.dtype == x.dtype
    gy = torch.randn(y.shape, generator=g).to(device)
    (y * gy).sum().add(0.7 * balance + 0.3 * z).backward()

    leaves = {n: p.detach().cpu().to(F64).requires_grad_() for n, p in m.named_parameters()}
    x64 = x.detach().cpu().to(F64).requires_grad_()
    y64, b64, z64, _ = moe_oracle(
        x64,
        leaves["gate.weight"],
        leaves["w1"],
        leaves["b1"],
        leaves["w2"],
        leaves["b2"],
        K,
        "gelu",
        dtype=torch.float32,
    )
    (y64 * gy.cpu().to(F64)).sum().add(0.7 * b64 + 0.3 * z64).backward()
    assert_close_rel(y, y64, torch.float32, "y")
    assert_close_rel(balance, b64, torch.float32, "balance")
    assert_close_rel(z, z64, torch.float32, "z")
    assert_close_rel(x.grad, x64.grad, torch.float32, "grad x")
    for n, p in m.named_parameters():
        assert_close_rel(p.grad, leaves[n].grad, torch.float32, f"grad {n}")


@pytest.mark.parametrize("num_experts, top_k", [(4, 4), (4, 1), (3, 2), (1, 1)])
def test_top_k_extremes_and_an_expert_without_tokens_match_float64_oracle(backend, device, num_experts, top_k):
    """top_k == E, top_k == 1, E == 1; expert 1 gets no token whenever top_k < E (zero gradients)."""
    m = cumo.MLPMoE(num_experts, top_k, MM, CH, backend=backend)
    randomise(m, 11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, MM, generator=g)
    x[..., 0] = 1.0
    if num_experts > 1:
        with torch.no_grad():
            m.gate.weight.mul_(0.1)
            m.gate.weight[:, 0] = 0.0
            m.gate.weight[1, 0] = -30.0  # expert 1's logit is the lowest for every token
    m.to(device)
    x = x.to(device).requires_grad_()
    y, balance, z = m(x)
    gy = torch.randn(y.shape, generator=g).to(device)
    (y * gy).sum().add(0.7 * balance + 0.3 * z).backward()

    leaves = {n: p.detach().cpu().to(F64).requires_grad_() for n, p in m.named_parameters()}
    x64 = x.detach().cpu().to(F64).requires_grad_()
    y64, b64, z64, ids = moe_oracle(
        x64,
        leaves["gate.weight"],
        leaves["w1"],
        leaves["b1"],
        leaves["w2"],
        leaves["b2"],
        top_k,
        "gelu",
        dtype=torch.float32,
    )
    (y64 * gy.cpu().to(F64)).sum().add(0.7 * b64 + 0.3 * z64).backward()
    if top_k < num_experts:
        assert not (ids == 1).any()  # the case is what it says
        for n in ("w1", "b1", "w2", "b2"):
            assert not m.get_parameter(n).grad[1].any(), n
    assert_close_rel(y, y64, torch.float32, "y")
    assert_close_rel(balance, b64, torch.float32, "balance")
    assert_close_rel(z, z64, torch.float32, "z")
    assert_close_rel(x.grad, x64.grad, torch.float32, "grad x")
    for n, p in m.named_parameters():
        if leaves[n].grad.norm() == 0:
            assert not p.grad.any(), n
        else:
            assert_close_rel(p.grad, leaves[n].grad, torch.float32, f"grad {n}")


def test_balance_statistics_are_per_sample():
    """Two samples routed to different experts: per-sample f and P differ from the batch's."""
    m = cumo.MLPMoE(E, K, MM, CH)
    randomise(m, 3)
    x = torch.randn(2, 5, MM, generator=torch.Generator().manual_seed(4))
    _, balance, _ = m(x)
    _, b_flat, _ = moe_oracle(x.reshape(1, 10, MM), m.gate.weight, m.w1, m.b1, m.w2, m.b2, K, "gelu")[:3]
    _, b_per, _ = moe_oracle(x, m.gate.weight, m.w1, m.b1, m.w2, m.b2, K, "gelu")[:3]
    assert_close_rel(balance, b_per, torch.float32, "balance")
    assert abs(b_per.item() - b_flat.item()) > 1e-3  # the test input tells the two apart


def test_loss_dtypes_in_bfloat16():
    m = cumo.MLPMoE(E, K, MM, CH).to(torch.bfloat16)
    y, balance, z = m(torch.randn(2, 3, MM, dtype=torch.bfloat16))
    assert (y.dtype, balance.dtype, z.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)


def test_state_dict_keys_are_the_parameters_and_to_cumo_gives_cumos_views():
    """state_dict() names the stacked parameters (what transformers' loader and accelerate walk);
    cumo.checkpoint.to_cumo gives CuMo's per-expert keys, as views of the stacked weights."""
    from cumo.checkpoint import to_cumo

    m = cumo.MLPMoE(E, K, MM, CH)
    sd = m.state_dict()
    assert sorted(sd) == sorted(n for n, _ in m.named_parameters()) == ["b1", "b2", "gate.weight", "w1", "w2"]
    cumo_sd = to_cumo(sd)
    ref = cumo_layout(E, MM, CH).state_dict()
    assert sorted(cumo_sd) == sorted(ref) == sorted(expected_keys(E))
    assert all(cumo_sd[k].shape == ref[k].shape for k in ref)
    for i in range(E):
        assert torch.equal(cumo_sd[f"experts.{i}.0.weight"], m.w1[i])
        assert torch.equal(cumo_sd[f"experts.{i}.2.bias"], m.b2[i])
        assert cumo_sd[f"experts.{i}.0.weight"].untyped_storage().data_ptr() == m.w1.untyped_storage().data_ptr()


def test_cumo_checkpoint_loads_strict_and_computes_cumos_block():
    ref = cumo_layout(E, MM, CH)
    randomise(ref, 5)
    m = cumo.MLPMoE(E, K, MM, CH)
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 4, MM, generator=torch.Generator().manual_seed(6))
    w1 = torch.stack([e[0].weight for e in ref.experts])
    b1 = torch.stack([e[0].bias for e in ref.experts])
    w2 = torch.stack([e[2].weight for e in ref.experts])
    b2 = torch.stack([e[2].bias for e in ref.experts])
    y64, b64, z64, _ = moe_oracle(x, ref.gate.weight, w1, b1, w2, b2, K, "gelu")
    y, balance, z = m(x)
    assert_close_rel(y, y64, torch.float32, "y")
    assert_close_rel(balance, b64, torch.float32, "balance")
    assert_close_rel(z, z64, torch.float32, "z")
    # and back: to_cumo of our state dict is CuMo's module's, tensor for tensor
    from cumo.checkpoint import to_cumo

    out = to_cumo(m.state_dict())
    assert sorted(out) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(out[k], v), k


def test_round_trip_stacked_names_and_copies():
    m = cumo.MLPMoE(E, K, MM, CH)
    randomise(m, 7)
    fresh = cumo.MLPMoE(E, K, MM, CH)
    fresh.load_state_dict(m.state_dict(), strict=True)
    fresh2 = cumo.MLPMoE(E, K, MM, CH)
    fresh2.load_state_dict({n: p.detach() for n, p in m.named_parameters()}, strict=True)  # stacked names
    for other in (fresh, fresh2, copy.deepcopy(m)):
        for (n, p), q in zip(m.named_parameters(), other.parameters()):
            assert torch.equal(p, q), n
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert sorted(loaded.state_dict()) == ["b1", "b2", "gate.weight", "w1", "w2"]


def test_load_errors_say_what_is_wrong():
    m = cumo.MLPMoE(E, K, MM, CH)
    sd = cumo_layout(E, MM, CH).state_dict()
    del sd["experts.2.0.weight"]
    with pytest.raises(RuntimeError, match="incomplete"):
        m.load_state_dict(sd)
    bigger = cumo_layout(E + 1, MM, CH).state_dict()
    with pytest.raises(RuntimeError, match="more experts"):
        m.load_state_dict(bigger, strict=False)


# --- co-upcycling ---------------------------------------------------------------------------


def dense_connector(mm: int, ch: int, seed: int) -> nn.Sequential:
    d = nn.Sequential(nn.Linear(mm, ch), nn.GELU(), nn.Linear(ch, ch))
    randomise(d, seed)
    return d


@pytest.mark.parametrize("gate", ["fresh", "random", "zero", "one_expert"])
def test_upcycled_connector_equals_its_dense_source(gate):
    dense = dense_connector(MM, CH, 8)
    moe = cumo.upcycle_mlp(dense, num_experts=E, top_k=K)
    assert isinstance(moe, cumo.MLPMoE) and (moe.num_experts, moe.top_k) == (E, K)
    for i in range(E):
        assert torch.equal(moe.w1[i], dense[0].weight) and torch.equal(moe.b2[i], dense[2].bias)
    with torch.no_grad():
        if gate == "random":
            moe.gate.weight.normal_(0, 3.0)
        elif gate == "zero":
            moe.gate.weight.zero_()
        elif gate == "one_expert":
            moe.gate.weight.zero_()
            moe.gate.weight[3, :] = 5.0
    x = torch.randn(3, 9, MM, generator=torch.Generator().manual_seed(9))
    y, _, _ = moe(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


def test_upcycle_keeps_the_source_and_freshly_initialises_the_gate():
    dense = dense_connector(MM, CH, 10)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    torch.manual_seed(0)
    a = cumo.upcycle_mlp(dense)
    torch.manual_seed(0)
    fresh_gate = nn.Linear(MM, 4, bias=False).weight
    assert torch.equal(a.gate.weight, fresh_gate)  # nn.Linear's default initialisation
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    a.w1.data.add_(1.0)
    assert torch.equal(dense[0].weight, before["0.weight"])  # experts are copies


def test_upcycle_refuses_what_mlpmoe_cannot_express():
    with pytest.raises(ValueError, match="GELU"):
        cumo.upcycle_mlp(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)))
    with pytest.raises(ValueError, match="second linear"):
        cumo.upcycle_mlp(nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5)))
    with pytest.raises(ValueError, match="biases"):
        cumo.upcycle_mlp(nn.Sequential(nn.Linear(4, 6, bias=False), nn.GELU(), nn.Linear(6, 6)))
    with pytest.raises(TypeError):
        cumo.upcycle_mlp(nn.Linear(4, 4))


# --- aux-loss aggregation --------------------------------------------------------------------


def test_aux_loss_uses_cumos_coefficients_per_place():
    vb, vz = torch.tensor(1.25), torch.tensor(3.0)
    cb, cz = torch.tensor(0.5), torch.tensor(2.0, dtype=torch.bfloat16)
    total = cumo.aux_loss((vb, vz), (cb, cz))
    assert total.dtype == torch.float32
    expect = 0.1 * 1.25 + 0.01 * 3.0 + 0.1 * 0.5 + (0.01 * cz).float().item()
    assert total.item() == pytest.approx(expect, rel=1e-6)
    assert (cumo.BALANCE_COEF, cumo.Z_COEF) == (0.1, 0.01)
    assert cumo.aux_loss(None, (cb, cz)).item() == pytest.approx(0.05 + (0.01 * cz).float().item())
    with pytest.raises(ValueError):
        cumo.aux_loss(None)


def test_forward_hands_the_stacked_parameters_to_the_kernels(monkeypatch):
    """No stacking copy per forward: moe_mlp receives the module's own parameter tensors."""
    import cumo_kernels.nn as knn

    m = cumo.MLPMoE(E, K, MM, CH)
    seen = {}
    real = knn.moe_mlp

    def spy(x, gate_weight, w1, b1, w2, b2, **kw):
        seen.update(gate=gate_weight, w1=w1, b1=b1, w2=w2, b2=b2, kw=kw)
        return real(x, gate_weight, w1, b1, w2, b2, **kw)

    monkeypatch.setattr(knn, "moe_mlp", spy)
    m(torch.randn(2, 3, MM))
    assert seen["gate"] is m.gate.weight and seen["w1"] is m.w1 and seen["b1"] is m.b1
    assert seen["w2"] is m.w2 and seen["b2"] is m.b2
    assert seen["kw"]["activation"] == "gelu" and seen["kw"]["top_k"] == K
