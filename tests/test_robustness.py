"""The public API as users and frameworks call it, beyond the math: autograd modes the ops do not
support (refused by name, never a silent zero), index inputs of the building-block ops (checked,
the dropped-slot rule, no access out of bounds), what frameworks do with the outputs (in-place ops,
empty batches under DDP, vmap, autocast) and the messages of bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import make_moe_inputs, seeded
from test_ops import _cumo_ops, _op_samples

import cumo_kernels
from cumo_kernels.nn import MoEMLP
from cumo_kernels.testing import assert_close_rel

F32 = torch.float32

# The ops whose backward is plain torch (double backward works through it) or that have no
# floating-point input (no tangent to refuse).
_PLAIN_BACKWARD = {"aux_losses"}
_NO_FLOAT_INPUT = {"sort_experts"}
# Forward ops whose backward is a cumo backward op.
_WITH_BACKWARD_OP = sorted(
    n
    for n in _cumo_ops()
    if not n.endswith("_backward") and n not in _PLAIN_BACKWARD | _NO_FLOAT_INPUT | {"expert_mlp"}
)


def _layer_inputs(seed=0, shape=(3, 5)):
    return make_moe_inputs(shape, 6, 10, 5, 4, seed=seed)


def _float_args(args) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


# ------------------------------------------------------------------ family 1: autograd modes


@pytest.mark.parametrize("op_name", sorted(set(_cumo_ops()) - _NO_FLOAT_INPUT))
def test_forward_ad_through_any_op_is_refused_by_name(backend, device, op_name):
    """Forward-mode AD through a cumo op gave a zero tangent and no error; now the op refuses it."""
    if device != "cpu":
        pytest.skip("the samples are built on the CPU")
    op = getattr(torch.ops.cumo, op_name)
    for args in _op_samples(backend)[op_name]:
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        with fwAD.dual_level():
            dual = list(args)
            for i in _float_args(args):
                dual[i] = fwAD.make_dual(args[i], torch.ones_like(args[i]))
            with pytest.raises(RuntimeError, match=rf"cumo::{op_name}\b.*forward-mode AD"):
                op(*dual)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "forward_ad", "forward_ad_weights_only"])
def test_forward_mode_through_the_layer_is_refused(backend, device, transform):
    inp = {n: t.to(device) for n, t in _layer_inputs(shape=(5,)).items()}

    def f(x, w1=inp["w1"]):
        gate, b1, w2, b2 = inp["gate_weight"], inp["b1"], inp["w2"], inp["b2"]
        return cumo_kernels.moe_mlp(x, gate, w1, b1, w2, b2, top_k=2, backend=backend)[0]

    x = inp["x"]
    with pytest.raises(RuntimeError, match=r"cumo::\w+.*forward-mode AD is not supported|cumo::\w+: forward-mode AD"):
        if transform == "jvp":
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        elif transform == "jacfwd":
            torch.func.jacfwd(f)(x)
        else:
            with fwAD.dual_level():
                if transform == "forward_ad":
                    f(fwAD.make_dual(x, torch.ones_like(x)))
                else:  # a tangent on an expert weight only: the routing sees none
                    f(x, fwAD.make_dual(inp["w1"], torch.ones_like(inp["w1"])))


def test_forward_mode_refusal_names_what_works():
    x = _layer_inputs(shape=(5,))["x"]
    with pytest.raises(RuntimeError) as info, fwAD.dual_level():
        cumo_kernels.route(fwAD.make_dual(x[:, :4], torch.ones(5, 4)), 2)
    msg = str(info.value)
    assert "cumo::route" in msg and "torch.autograd.grad" in msg and "reverse" in msg


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vjp", "hessian"])
def test_torch_func_differentiation_is_refused_by_name(backend, device, transform):
    inp = {n: t.to(device) for n, t in _layer_inputs(shape=(5,)).items()}

    def f(x):
        rest = (inp[n] for n in ("gate_weight", "w1", "b1", "w2", "b2"))
        return cumo_kernels.moe_mlp(x, *rest, top_k=2, backend=backend)[0]

    x = inp["x"]
    fns = {
        "grad": lambda: torch.func.grad(lambda v: f(v).sum())(x),
        "jacrev": lambda: torch.func.jacrev(f)(x),
        "vjp": lambda: torch.func.vjp(f, x),
        "hessian": lambda: torch.func.hessian(lambda v: f(v).sum())(x),
    }
    with pytest.raises(RuntimeError, match=r"cumo::\w+: torch\.func\.grad, vjp, jacrev and hessian are not supported"):
        fns[transform]()


def test_reverse_mode_jacobian_still_works():
    """What the refusals point to: torch.autograd's reverse mode, Jacobians included."""
    inp = _layer_inputs(shape=(4,))
    x = inp["x"]
    rest = [inp[n] for n in ("gate_weight", "w1", "b1", "w2", "b2")]
    jac = torch.autograd.functional.jacobian(lambda v: cumo_kernels.moe_mlp(v, *rest, top_k=2)[0], x)
    assert jac.shape == (4, 5, 4, 6) and jac.abs().sum() > 0


@pytest.mark.parametrize("op_name", _WITH_BACKWARD_OP)
def test_double_backward_through_any_op_is_refused_by_name(backend, device, op_name):
    """A second derivative through a cumo op raised torch's generic "no autograd formula"; now the
    backward op names itself and its forward."""
    if device != "cpu":
        pytest.skip("the samples are built on the CPU")
    op = getattr(torch.ops.cumo, op_name)
    args = _op_samples(backend)[op_name][0]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * o.float()).sum() for o in outs if o.requires_grad)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    second = sum(g.float().sum() for g in grads if g is not None and g.requires_grad)
    with pytest.raises(RuntimeError, match=rf"cumo::{op_name}_backward: double backward"):
        second.backward()


def test_double_backward_through_the_layer_is_refused(backend, device):
    inp = {n: t.to(device).requires_grad_() for n, t in _layer_inputs().items()}
    y, bal, z = cumo_kernels.moe_mlp(**inp, top_k=2, backend=backend)
    (gx,) = torch.autograd.grad((y * y).sum() + bal + z, [inp["x"]], create_graph=True)
    with pytest.raises(RuntimeError, match=r"cumo::\w+_backward: double backward .* not supported"):
        gx.square().sum().backward()


def test_aux_losses_double_backward_works():
    """aux_losses' backward is plain torch: its second derivative exists (and is not refused)."""
    ps = torch.rand(2, 4, generator=seeded(0)).requires_grad_()
    fc = torch.rand(2, 4, generator=seeded(1))
    zs = torch.rand(2, generator=seeded(2)).requires_grad_()
    bal, z = cumo_kernels.aux_losses(ps, fc, zs, 3)
    (g,) = torch.autograd.grad(bal * bal, [ps], create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), [ps])
    c = 4 * 4 / (2 * 4 * 3 * 3)  # balance = c * sum(ps * fc): E^2 / (B * E * N^2)
    assert torch.allclose(h, 2 * c * c * fc.sum() * fc)


def test_inference_only_op_says_so():
    args = [a.detach() for a in _op_samples("torch")["expert_mlp"][0] if isinstance(a, torch.Tensor)]
    x = args[0].clone().requires_grad_()
    xs, w1, b1, w2, b2, offsets = x, *args[1:6]
    y = torch.ops.cumo.expert_mlp(xs, w1, b1, w2, b2, offsets, "quick_gelu", "torch")
    with pytest.raises(RuntimeError, match="cumo::expert_mlp is inference-only"):
        y.sum().backward()


def test_jit_trace_is_refused_with_what_works():
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2)
    with pytest.raises(RuntimeError, match=r"moe_mlp: torch\.jit\.trace is not supported.*torch\.compile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(layer, (torch.randn(3, 5, 6),))


# --------------------------------------------------------------- family 3: framework behaviour


@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=str)
def test_outputs_are_not_views_and_take_in_place_ops(backend, device, shape):
    """y += residual raised "a view created inside a custom Function" on the torch backend, and
    FSDP2 warns on any view output: no output is a view, and in-place ops give the same gradients
    as their out-of-place forms."""
    inp = {n: t.to(device) for n, t in make_moe_inputs(shape, 6, 10, 6, 4, seed=3).items()}
    r = torch.randn(*shape, 6, generator=seeded(5)).to(device)

    def run(in_place):
        leaves = {n: t.clone().requires_grad_() for n, t in inp.items()}
        y, bal, z = cumo_kernels.moe_mlp(**leaves, top_k=2, backend=backend)
        assert y._base is None and bal._base is None and z._base is None, "a view output"
        if in_place:
            y += r
            y.mul_(2)
            bal.mul_(3)
        else:
            y, bal = (y + r) * 2, bal * 3
        (y.square().sum() + bal + z).backward()
        return y.detach(), {n: t.grad for n, t in leaves.items()}

    y_ip, g_ip = run(True)
    y_op, g_op = run(False)
    assert torch.equal(y_ip, y_op)
    for n in g_op:
        assert_close_rel(g_ip[n], g_op[n].double(), F32, f"grad {n} after in-place ops")
    with torch.no_grad():  # inference: the blocked op's output too
        y, _, _ = cumo_kernels.moe_mlp(**inp, top_k=2, backend=backend)
        assert y._base is None
        y += r


@pytest.mark.parametrize("op_name", _cumo_ops())
def test_no_op_output_is_a_view(backend, device, op_name):
    if device != "cpu":
        pytest.skip("the samples are built on the CPU")
    op = getattr(torch.ops.cumo, op_name)
    for args in _op_samples(backend)[op_name]:
        outs = op(*args)
        for i, o in enumerate(outs if isinstance(outs, tuple) else (outs,)):
            assert o._base is None, f"cumo::{op_name} output {i} is a view"


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_batch_gives_every_parameter_a_zero_gradient(backend, device, lead):
    """An empty batch left the expert parameters' .grad None (only the gate was connected): under
    DDP that rank then hangs its peers. A dense MLP gives zeros; so does the layer."""
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2, backend=backend).to(device)
    dense = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 5)).to(device)
    x = torch.randn(*lead, 6, device=device, requires_grad=True)
    y, bal, z = layer(x)
    (y.sum() + bal + z).backward()
    dense(x).sum().backward()
    for n, p in [*layer.named_parameters(), *dense.named_parameters()]:
        assert p.grad is not None and p.grad.shape == p.shape and (p.grad == 0).all(), n
    assert x.grad is not None and x.grad.shape == x.shape


def test_empty_batch_losses_are_zero_even_with_inf_weights():
    inp = _layer_inputs(shape=(0,))
    inp["w1"] = inp["w1"].clone()
    inp["w1"][0, 0, 0] = float("inf")
    y, bal, z = cumo_kernels.moe_mlp(**inp, top_k=2)
    assert bal.item() == 0.0 and z.item() == 0.0 and bal.dtype == F32


def test_vmap_with_frozen_weights_trains_x(backend, device):
    """Under torch.vmap, x does not report requires_grad inside the transform: the inference-only
    op was chosen and the backward failed. The vmapped gradient equals the looped one."""
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2, backend=backend).to(device).requires_grad_(False)
    xs = torch.randn(3, 4, 6, device=device)
    x = xs.clone().requires_grad_()
    torch.vmap(lambda t: layer(t)[0])(x).square().sum().backward()
    ref = xs.clone().requires_grad_()
    torch.stack([layer(ref[i])[0] for i in range(3)]).square().sum().backward()
    assert_close_rel(x.grad, ref.grad.double(), F32, "vmapped grad x")


def test_autocast_leaves_float64_alone(device):
    """torch.autocast casts float32 (like nn.Linear) but never float64 inputs."""
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2).to(device).double()
    lin = torch.nn.Linear(6, 5).to(device).double()
    x = torch.randn(7, 6, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, bal, z = layer(x)
        ref = lin(x)
    assert y.dtype == ref.dtype == torch.float64 and z.dtype == torch.float64 and bal.dtype == torch.float64
    eager = layer(x)
    assert torch.equal(y, eager[0])
