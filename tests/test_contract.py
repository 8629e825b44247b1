"""The backend contract (cumo_kernels.backend) and the choice of one backend per call
(cumo_kernels.dispatch): every registered backend provides the ops its composition and features
require, with the contract's signatures; a layer call runs on one backend end to end, observed;
no per-op fallback; the errors list every backend's reasons."""

from __future__ import annotations

import importlib
import inspect
import os
import types

import pytest
import torch
from conftest import make_moe_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import cumo_kernels
from cumo_kernels import backend, dispatch, reference
from cumo_kernels.backend import Call, Unsupported, required_ops
from cumo_kernels.testing import assert_close_rel

REGISTERED = sorted(dispatch._REGISTRY)


def _module(name: str) -> types.ModuleType:
    try:
        return dispatch.implementation(name)
    except ImportError as exc:  # triton not installed: that backend cannot be checked here
        pytest.skip(f"the {name} backend cannot be imported here: {exc}")


@pytest.mark.parametrize("name", REGISTERED)
def test_every_backend_provides_its_composition(name):
    """COMPOSITION and FEATURES are the contract's, and every op they require is a function of
    the backend module whose parameters are the contract's (names, order, defaults)."""
    mod = _module(name)
    assert mod.COMPOSITION in backend.COMPOSITIONS, f"{name}: COMPOSITION {mod.COMPOSITION!r}"
    assert isinstance(mod.FEATURES, frozenset) and mod.FEATURES <= set(backend.FEATURES_OPS), mod.FEATURES
    assert callable(mod.not_supported_reasons)
    assert dispatch.missing_ops(name) == [], f"{name} lacks ops of its composition / features"
    for op in required_ops(mod.COMPOSITION, mod.FEATURES):
        want = list(inspect.signature(getattr(backend.protocol_of(op), op)).parameters.values())[1:]
        got = list(inspect.signature(getattr(mod, op)).parameters.values())
        assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in want], f"{name}.{op}"


def test_every_backend_provides_the_public_ops():
    """The ops a public function runs on any backend (route, permute, unpermute, grouped_linear)
    are in every composition."""
    for comp in backend.COMPOSITIONS:
        assert set(backend.BASE_OPS) <= set(required_ops(comp, frozenset()))
    assert {"route", "route_backward", "grouped_linear", "grouped_linear_backward"} <= set(backend.BASE_OPS)


def test_a_backend_without_an_op_fails_the_contract(monkeypatch):
    """The check above can fail: a fused backend without its combine GEMM, an unknown feature."""
    fake = types.ModuleType("fake_backend")
    for op in required_ops("fused", frozenset()):
        if op != "grouped_linear_combine":
            setattr(fake, op, getattr(reference, op))
    fake.COMPOSITION, fake.FEATURES = "fused", frozenset()
    monkeypatch.setitem(dispatch._REGISTRY, "triton", dispatch.Backend("triton", lambda: fake))
    assert dispatch.missing_ops("triton") == ["grouped_linear_combine"]
    fake.FEATURES = frozenset({"no_such_feature"})
    with pytest.raises(ValueError, match="FEATURES: unknown"):
        dispatch.missing_ops("triton")


def test_an_op_the_backend_lacks_is_an_error_not_the_torch_twin(monkeypatch):
    """A custom op given a backend that does not provide it raises, naming both (it used to run
    the torch twin in its place)."""
    fake = types.ModuleType("fake_backend")
    monkeypatch.setitem(dispatch._REGISTRY, "cuda", dispatch.Backend("cuda", lambda: fake))
    ids = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(NotImplementedError, match="cuda backend does not provide the op 'sort_experts'"):
        torch.ops.cumo.sort_experts(ids, 2, "cuda")


# ------------------------------------------------------------------------------- one backend per call


class _CumoOps(TorchDispatchMode):
    """Records (op, backend argument) of every cumo:: op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cumo":
            name = func.__name__.split(".")[0]
            backend_arg = [a for a in args if isinstance(a, str) and a in dispatch.BACKENDS]
            self.seen.append((name, backend_arg[-1] if backend_arg else None))
        return func(*args, **(kwargs or {}))


def test_auto_layer_call_runs_one_backend_observed(monkeypatch):
    """A real layer call under auto (CPU tensors: the torch backend), forward and backward: every
    cumo op it runs is given the backend `choose` names, and each op of the composition runs."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    inputs = {n: t.requires_grad_() for n, t in make_moe_inputs((2, 9), 13, 19, 11, 4, seed=3).items()}
    chosen = dispatch.choose(None, torch.device("cpu"), torch.float32, 4)
    mode = _CumoOps()
    with mode:
        y, bal, z = cumo_kernels.moe_mlp(**inputs, top_k=2, backend="auto")
        (y.sum() + bal + z).backward()
    assert chosen == "torch"
    assert {b for op, b in mode.seen if op != "aux_losses"} == {chosen}
    ran = {op for op, _ in mode.seen}
    assert {"route", "permute", "grouped_linear", "unpermute", "aux_losses"} <= ran
    assert {"route_backward", "permute_backward", "grouped_linear_backward", "unpermute_backward"} <= ran


def _spies(calls: list, reasons: dict[str, list[str]], raise_in: str | None = None) -> dict[str, types.ModuleType]:
    """Backends that record each op they run and compute it with the torch twins: cuda and torch
    unfused, triton fused; `reasons` per backend; `raise_in`: an op of triton's that refuses its
    operands (Unsupported)."""
    out = {}
    for name, comp, feats in (("cuda", "unfused", ()), ("triton", "fused", ()), ("torch", "unfused", ("expert_mlp",))):
        mod = types.ModuleType(f"spy_{name}")
        mod.COMPOSITION, mod.FEATURES = comp, frozenset(feats)
        stated = list(reasons.get(name, []))
        mod.not_supported_reasons = lambda call, r=stated: list(r)
        for op in required_ops(comp, mod.FEATURES):

            def fn(*args, _name=name, _op=op, **kwargs):
                calls.append((_name, _op))
                if _name == "triton" and _op == raise_in:
                    raise Unsupported(f"{_op}: these operands (a test)")
                return getattr(reference, _op)(*args, **kwargs)

            setattr(mod, op, fn)
        out[name] = mod
    return out


def _register(monkeypatch, spies: dict) -> None:
    for name, mod in spies.items():
        monkeypatch.setitem(dispatch._REGISTRY, name, dispatch.Backend(name, lambda m=mod: m))
    # auto's candidates as on a GPU (cuda first, as a measured order may put it), on CPU tensors
    monkeypatch.setattr(dispatch, "_auto_candidates", lambda device, workload: ("cuda", "triton", "torch"))


def test_auto_passes_over_a_refusing_backend_and_runs_the_next_end_to_end(monkeypatch):
    """cuda states a reason, triton none: the whole call, forward and backward, runs on triton's
    fused composition; nothing on cuda or torch. The result is the torch backend's."""
    calls: list = []
    _register(monkeypatch, _spies(calls, {"cuda": ["no device (a test)"]}))
    inputs = {n: t.requires_grad_() for n, t in make_moe_inputs((2, 9), 13, 19, 11, 4, seed=4).items()}
    want = cumo_kernels.moe_mlp(**inputs, top_k=2, backend="torch")
    want_grads = torch.autograd.grad(want[0].sum() + want[1] + want[2], list(inputs.values()))
    calls.clear()
    got = cumo_kernels.moe_mlp(**inputs, top_k=2, backend="auto")
    got_grads = torch.autograd.grad(got[0].sum() + got[1] + got[2], list(inputs.values()))
    assert {b for b, _ in calls} == {"triton"}, calls
    assert [op for _, op in calls] == [
        "route_x",
        "sort_experts",
        "grouped_linear_gather",
        "grouped_linear_combine",
        "grouped_linear_combine_backward",
        "grouped_linear_gather_backward",
        "route_x_backward",
    ]
    for name, a, b in zip(("y", "balance", "z"), got, want):
        assert_close_rel(a, b.double(), torch.float32, name)
    for name, a, b in zip(inputs, got_grads, want_grads):
        assert_close_rel(a, b.double(), torch.float32, f"grad {name}")


def test_no_per_op_fallback(monkeypatch):
    """An op of the chosen backend that refuses its operands fails the call: no other backend
    runs the op (it used to fall back op by op under auto)."""
    calls: list = []
    _register(monkeypatch, _spies(calls, {"cuda": ["no device (a test)"]}, raise_in="grouped_linear_gather"))
    inputs = {n: t.requires_grad_() for n, t in make_moe_inputs((9,), 13, 19, 11, 4, seed=5).items()}
    with pytest.raises(Unsupported, match="grouped_linear_gather: these operands"):
        cumo_kernels.moe_mlp(**inputs, top_k=2, backend="auto")
    assert {b for b, _ in calls} == {"triton"}, calls


def test_errors_list_every_backends_reasons(monkeypatch):
    calls: list = []
    reasons = {"cuda": ["cuda reason (a test)"], "triton": ["triton reason 1", "triton reason 2"], "torch": ["t"]}
    _register(monkeypatch, _spies(calls, reasons))
    inputs = make_moe_inputs((5,), 13, 19, 11, 4, seed=6)
    with pytest.raises(RuntimeError, match="no backend can run moe_mlp on cpu tensors, float32, E=4") as info:
        cumo_kernels.moe_mlp(**inputs, top_k=2)
    for why in ("cuda: cuda reason (a test)", "triton: triton reason 1; triton reason 2", "torch: t"):
        assert why in str(info.value)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run route on cpu tensors.*triton reason 2"):
        cumo_kernels.route(torch.randn(4, 3), 2, backend="triton")
    assert calls == []


# --------------------------------------------------------------------------------- reasons per backend


def test_reasons_of_the_real_backends():
    """What each backend states without touching a tensor: float64 for triton and cuda, E for
    cuda's permute (4096; its routing's 256: test_cuda_ext.py); the torch backend runs every float call."""
    cpu = torch.device("cpu")
    assert reference.not_supported_reasons(Call(cpu, torch.float64, 10_000)) == []
    assert reference.not_supported_reasons(Call(cpu, torch.int32))
    try:
        tb = importlib.import_module("cumo_kernels.triton")
    except ImportError:
        tb = None
    if tb is not None:
        assert any("float32, float16 and bfloat16" in r for r in tb.not_supported_reasons(Call(cpu, torch.float64)))
    cb = importlib.import_module("cumo_kernels.cuda")
    assert cb.not_supported_reasons(Call(cpu)) == [cb.refusal("cpu")]


def test_cuda_reasons_without_a_device(monkeypatch):
    """cuda's dtype and per-op expert limits, as on a machine where it could run (the routing's
    limit, the extension's MAX_EXPERTS: test_cuda_ext.py's test_routing_takes_256_experts)."""
    cb = importlib.import_module("cumo_kernels.cuda")
    monkeypatch.setattr(cb, "refusal", lambda device_type: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    dev = torch.device("cuda")
    assert cb.not_supported_reasons(Call(dev, torch.bfloat16, 64)) == []
    layer = cb.not_supported_reasons(Call(dev, torch.float64, 100))
    assert len(layer) == 1 and "float64" in layer[0]
    assert any(
        "grouped_linear takes at most 1023" in r for r in cb.not_supported_reasons(Call(dev, torch.float32, 1024))
    )
    assert cb.not_supported_reasons(Call(dev, torch.float32, 100, op="permute")) == []
    assert "permute takes at most 4096" in cb.not_supported_reasons(Call(dev, torch.float32, 5000, op="permute"))[0]


# ------------------------------------------------------------------------------- the routing record


def test_routing_record_checks_its_invariants():
    """The record the compositions pass between the ops states its shapes and dtypes and checks
    them where it is built (metadata only: it works on fake tensors, under torch.compile)."""
    from cumo_kernels.ops.routing import Routing

    t, k, e = 5, 2, 3
    good = dict(
        weights=torch.rand(t, k),
        expert_ids=torch.zeros(t, k, dtype=torch.int64),
        sort_idx=torch.arange(t * k),
        offsets=torch.zeros(e + 1, dtype=torch.int64),
        top_k=k,
        num_experts=e,
    )
    r = Routing(**good)
    assert r.sort_idx.shape == (t * k,) and r.num_experts == e
    for field, bad in (
        ("weights", torch.rand(t, k + 1)),
        ("expert_ids", torch.zeros(t, k, dtype=torch.int32)),
        ("sort_idx", torch.arange(t * k - 1)),
        ("offsets", torch.zeros(e, dtype=torch.int64)),
        ("top_k", k + 1),
        ("num_experts", e + 1),
    ):
        with pytest.raises(ValueError, match=r"Routing: expected weights \[T, k=\d+\]"):
            Routing(**(good | {field: bad}))
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fake = {n: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for n, v in good.items()}
    with mode:
        Routing(**fake)


# ------------------------------------------------------------------------------ the path, measured


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1", reason="runs the triton backend on CPU tensors in its interpreter"
)
def test_triton_call_path_from_the_module_to_the_fc1_kernel():
    """DESIGN.md's "One op's path" read off the stack at the fc1 launch (benchmarks.call_path):
    module -> function (the choice, once) -> cumo:: op -> backend function -> launcher -> kernel,
    each op family in its own file, no dispatcher frame on the way and no import on the call."""
    from benchmarks import call_path

    m = call_path.measure("cpu")
    assert m["kernel"] == "_grouped_linear_kernel"
    hops = [(f, n) for f, n in m["stack"] if not f.endswith("_common.py")]  # the op's and launcher's guards
    assert hops == [
        ("cumo_kernels/nn.py", "forward"),
        ("cumo_kernels/ops/moe.py", "moe_mlp"),
        ("cumo_kernels/ops/moe.py", "_fused"),
        ("cumo_kernels/ops/grouped_linear.py", "_grouped_linear_gather"),
        ("cumo_kernels/triton/grouped_linear.py", "grouped_linear_gather"),
        ("cumo_kernels/triton/grouped_linear.py", "launch_grouped_linear"),
    ]
    dispatched = [n for f, n in m["entered"] if f.endswith("dispatch.py")]
    assert dispatched.count("_choose") == 1 and dispatched.count("reasons") == 1, dispatched
    assert "module" not in dispatched, "a backend module was imported during the call"
