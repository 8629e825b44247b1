"""The public API as users and frameworks call it, beyond the math: autograd modes the ops do not
support (refused by name, never a silent zero), index inputs of the building-block ops (checked,
the dropped-slot rule, no access out of bounds), what frameworks do with the outputs (in-place ops,
empty batches under DDP, vmap, autocast) and the messages of bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import make_moe_inputs, poison, seeded
from test_ops import _cumo_ops, _op_samples, _provides

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
    if not n.endswith("_backward") and n not in _PLAIN_BACKWARD | _NO_FLOAT_INPUT | {"expert_mlp", "expert_mlp_glu"}
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
    with pytest.raises(RuntimeError, match="cumo::expert_mlp is inference-only.*cumo::grouped_linear for each"):
        y.sum().backward()


def test_inference_only_gated_op_says_so():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, generator=g, requires_grad=True)
    w1, b1 = torch.randn(2, 8, 6, generator=g), torch.randn(2, 8, generator=g)
    w2, b2 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, generator=g)
    offsets = torch.tensor([0, 2, 5])
    y = torch.ops.cumo.expert_mlp_glu(x, w1, b1, w2, b2, offsets, "silu", False, "torch")
    with pytest.raises(RuntimeError, match="cumo::expert_mlp_glu is inference-only.*grouped_linear_glu, then"):
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
    if op_name.removesuffix("_backward") != "aux_losses" and not _provides(backend, op_name):
        pytest.skip(f"the {backend} backend does not provide {op_name} (its composition and features do not have it)")
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


def _ddp_worker(rank: int, port: int, queue) -> None:
    """One DDP rank: rank 1 gets an empty batch; two steps; puts (rank, grads) or (rank, error)."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
        torch.manual_seed(0)
        layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2, backend="torch")
        ddp = torch.nn.parallel.DistributedDataParallel(layer)
        for step in range(2):
            layer.zero_grad(set_to_none=True)
            x = torch.randn(0 if rank == 1 else 5, 6, generator=seeded(step))
            y, bal, z = ddp(x)
            (y.square().sum() + bal + z).backward()
        # as lists: a tensor put on the queue shares its storage, gone once this process exits
        queue.put((rank, {n: p.grad.tolist() for n, p in layer.named_parameters()}))
        # flushed before the teardown: gloo's can abort the process (its peer gone), and a process
        # killed while its queue thread writes holds the queue's lock, and the other rank's put hangs
        queue.close()
        queue.join_thread()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(exc).__name__}: {exc}"))


def test_ddp_with_an_empty_batch_on_one_rank():
    """The framework failure itself: under DDP a rank whose batch is empty left the experts' .grad
    None, so its peers waited for a reduction that never came (or crashed). Both ranks now finish
    two steps with the same averaged gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(2):
            rank, out = queue.get(timeout=120)
            results[rank] = out
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert all(isinstance(v, dict) for v in results.values()), f"a rank failed: {results}"
    for n in results[0]:
        assert results[0][n] == results[1][n], f"grad {n} differs between ranks"


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


# --------------------------------------------------------------- family 2: index inputs of ops

BAD_OFFSETS = {
    "not_from_0": [1, 2, 4, 6, 7],
    "not_monotone": [0, 4, 2, 6, 7],
    "past_M": [0, 2, 4, 6, 9],
    "negative": [0, -2, 4, 6, 7],
}


@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_grouped_linear_refuses_bad_offsets(backend, device, case):
    """Bad offsets gave uninitialised rows (values changing per call), rows computed with another
    expert's weights, or on Triton a corrupted heap; the op now says what offsets must be."""
    x = torch.randn(7, 3, device=device)
    w = torch.randn(4, 5, 3, device=device)
    off = torch.tensor(BAD_OFFSETS[case], device=device)
    with pytest.raises(ValueError, match=r"offsets: expected offsets\[0\] = 0, non-decreasing, offsets\[E\] <= M = 7"):
        cumo_kernels.grouped_linear(x, w, None, off, backend=backend, validate=True if device == "cuda" else None)


@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_unchecked_bad_offsets_stay_in_bounds(backend, device, case):
    """validate=False (what moe_mlp's own calls amount to): wrong offsets give wrong rows, never an
    access out of bounds (the Triton kernels clamp what they read; the torch backend's CPU path
    checks the offsets it reads on the host anyway)."""
    x = torch.randn(7, 3, device=device)
    w = torch.randn(4, 5, 3, device=device)
    off = torch.tensor(BAD_OFFSETS[case], device=device)
    try:
        y = cumo_kernels.grouped_linear(x, w, None, off, "gelu", backend=backend, validate=False)
    except ValueError as exc:
        assert "offsets" in str(exc)
    else:
        assert y.shape == (7, 5)


def _dropped_expectation(ids: torch.Tensor, e: int):
    """sort_idx and offsets of the rule, built slot by slot in Python: experts in order, each in
    slot order, then the dropped slots (ids >= E) in slot order."""
    flat = ids.reshape(-1).tolist()
    order = [s for x in range(e) for s, i in enumerate(flat) if i == x] + [s for s, i in enumerate(flat) if i >= e]
    offsets = [0]
    for x in range(e):
        offsets.append(offsets[-1] + sum(1 for i in flat if i == x))
    return order, offsets


@pytest.mark.parametrize("sentinel", ["E", "E+5", "mixed"])
def test_permute_drops_ids_at_or_above_E(backend, device, sentinel):
    """Expert ids >= E mark dropped slots (expert parallelism's sentinel, transformers' rule):
    they were an IndexError on torch and a dropped or corrupted slot on Triton."""
    e, k = 4, 2
    g = seeded(3)
    ids = torch.randint(0, e, (11, k), generator=g)
    drop = torch.rand(11, k, generator=g) < 0.4
    big = {
        "E": torch.full_like(ids, e),
        "E+5": torch.full_like(ids, e + 5),
        "mixed": e + torch.randint(0, 300, ids.shape, generator=g),
    }
    ids = torch.where(drop, big[sentinel], ids)
    x = torch.randn(11, 3, generator=g)
    xs, sort_idx, offsets = cumo_kernels.permute(x.to(device), ids.to(device), e, backend=backend)
    order, offs = _dropped_expectation(ids, e)
    assert sort_idx.tolist() == order and offsets.tolist() == offs
    assert torch.equal(xs.cpu(), x[torch.tensor(order) // k])


def test_permute_refuses_negative_ids(backend, device):
    x = torch.randn(3, 2, device=device)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0]], device=device)
    with pytest.raises(ValueError, match=r"expert_ids: negative id -1 at \[1, 1\].* >= E = 4 for a dropped slot"):
        cumo_kernels.permute(x, ids, 4, backend=backend, validate=True if device == "cuda" else None)
    # Unchecked, a negative id counts as dropped: never an index out of bounds.
    _, sort_idx, offsets = cumo_kernels.permute(x, ids, 4, backend=backend, validate=False)
    assert sort_idx.tolist() == [0, 5, 1, 2, 4, 3] and offsets.tolist() == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("case", ["out_of_range", "negative", "duplicate"])
def test_unpermute_refuses_a_sort_idx_that_is_no_permutation(backend, device, case):
    idx = {"out_of_range": [0, 1, 2, 3, 4, 9], "negative": [0, 1, -2, 3, 4, 5], "duplicate": [0, 1, 1, 3, 4, 5]}[case]
    y = torch.randn(6, 2, device=device)
    w = torch.rand(3, 2, device=device)
    si = torch.tensor(idx, device=device)
    with pytest.raises(ValueError, match=r"sort_idx: expected a permutation of 0\.\.T\*k-1"):
        cumo_kernels.unpermute(y, si, w, backend=backend, validate=True if device == "cuda" else None)
    try:  # unchecked: wrong rows (or torch's own index error), never out of bounds
        out = cumo_kernels.unpermute(y, si, w, backend=backend, validate=False)
    except (IndexError, RuntimeError):
        pass
    else:
        assert out.shape == (3, 2)


def test_validate_argument_is_checked():
    with pytest.raises(TypeError, match="validate"):
        cumo_kernels.permute(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.int64), 2, validate="yes")


def _dirty_allocator(device: str, numel: int) -> None:
    """Free NaN-filled blocks of about `numel` floats, so that an output row the op fails to write
    shows (on the CPU, malloc hands the freed blocks out again; on CUDA, conftest.poison)."""
    if device == "cuda":
        poison(device)
        return
    blocks = [torch.full((numel + i,), float("nan")) for i in range(8)]
    del blocks


@pytest.mark.parametrize("activation", ["gelu", "none"])
def test_dropped_rows_are_zero_in_grouped_linear(backend, device, activation):
    """Rows offsets[E]:M belong to no expert: zero in y and in x's gradient, no share of dW or db."""
    g = seeded(7)
    m, live, e = 13, 9, 3
    x = torch.randn(m, 5, generator=g).to(device).requires_grad_()
    w = torch.randn(e, 4, 5, generator=g).to(device).requires_grad_()
    b = torch.randn(e, 4, generator=g).to(device).requires_grad_()
    off = torch.tensor([0, 2, 2, live], device=device)
    gy = torch.randn(m, 4, generator=g).to(device)
    _dirty_allocator(device, m * 5)
    y = cumo_kernels.grouped_linear(x, w, b, off, activation, backend=backend)
    assert (y[live:] == 0).all(), "dropped rows of y are not zero"
    gx, gw, gb = torch.autograd.grad((y * gy).sum(), [x, w, b])
    assert (gx[live:] == 0).all(), "dropped rows of grad x are not zero"
    x2 = x.detach()[:live].clone().requires_grad_()
    ry = cumo_kernels.grouped_linear(x2, w, b, off, activation, backend="torch")
    rgx, rgw, rgb = torch.autograd.grad((ry * gy[:live]).sum(), [x2, w, b])
    assert_close_rel(y[:live], ry.double(), F32, "y")
    for name, a, r in (("grad x", gx[:live], rgx), ("grad w", gw, rgw), ("grad b", gb, rgb)):
        assert_close_rel(a, r.double(), F32, name)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_expert_parallel_sentinels_through_the_ops(backend, device, top_k):
    """What the transformers experts backend does with expert parallelism: slots whose expert
    lives on another rank carry id E and routing weight 0. permute -> grouped_linear (x2) ->
    unpermute equals the sum over each token's routed slots only, values and every gradient."""
    g = seeded(11 + top_k)
    t, d, h, o, e = 10, 6, 7, 5, 4
    ids = torch.stack([torch.randperm(e + 2, generator=g)[:top_k] for _ in range(t)])  # ids 4, 5: elsewhere
    ids = torch.where(ids >= e, torch.full_like(ids, e), ids)
    wts = torch.rand(t, top_k, generator=g) * (ids < e)
    leaves = {
        "x": torch.randn(t, d, generator=g),
        "w1": torch.randn(e, h, d, generator=g) / d**0.5,
        "b1": torch.randn(e, h, generator=g),
        "w2": torch.randn(e, o, h, generator=g) / h**0.5,
        "b2": torch.randn(e, o, generator=g),
        "wts": wts,
    }
    leaves = {n: v.to(device).requires_grad_() for n, v in leaves.items()}
    gout = torch.randn(t, o, generator=g).to(device)

    xs, si, off = cumo_kernels.permute(leaves["x"], ids.to(device), e, backend=backend)
    hid = cumo_kernels.grouped_linear(xs, leaves["w1"], leaves["b1"], off, "silu", backend=backend)
    ys = cumo_kernels.grouped_linear(hid, leaves["w2"], leaves["b2"], off, backend=backend)
    out = cumo_kernels.unpermute(ys, si, leaves["wts"], backend=backend)
    grads = torch.autograd.grad((out * gout).sum(), list(leaves.values()))

    ref_leaves = {n: v.detach().cpu().double().requires_grad_() for n, v in leaves.items()}
    rows = []
    for ti in range(t):
        acc = torch.zeros(o, dtype=torch.float64)
        for j in range(top_k):
            ex = int(ids[ti, j])
            if ex < e:
                hh = torch.nn.functional.silu(ref_leaves["w1"][ex] @ ref_leaves["x"][ti] + ref_leaves["b1"][ex])
                acc = acc + ref_leaves["wts"][ti, j] * (ref_leaves["w2"][ex] @ hh + ref_leaves["b2"][ex])
        rows.append(acc)
    ref = torch.stack(rows)
    rgrads = torch.autograd.grad((ref * gout.cpu().double()).sum(), list(ref_leaves.values()), allow_unused=True)
    assert_close_rel(out, ref, F32, "out")
    for name, a, r in zip(leaves, grads, rgrads):
        assert_close_rel(a, torch.zeros_like(a).double() if r is None else r, F32, f"grad {name}")


# -------------------------------------------------------------------------- family 4: messages


def test_wrong_input_width_blames_x():
    """MoEMLP given x of the wrong width said "gate_weight: expected shape [4, 7]"."""
    layer = MoEMLP(6, 10, 5, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"^x: expected \[\.\.\., 6\].*got \[3, 7\]"):
        layer(torch.randn(3, 7))
    inp = _layer_inputs()
    inp["x"] = torch.randn(3, 5, 9)
    with pytest.raises(ValueError, match=r"^x: expected \[\.\.\., 6\]"):
        cumo_kernels.moe_mlp(**inp, top_k=2)


@pytest.mark.parametrize("kind", ["sparse", "nested"])
def test_sparse_and_nested_inputs_are_named(kind):
    x = torch.randn(4, 6)
    if kind == "sparse":
        bad = x.to_sparse()
    else:
        bad = torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)], layout=torch.jagged)
    inp = _layer_inputs(shape=(4,))
    with pytest.raises(TypeError, match=rf"^x: expected a strided \(dense\) tensor, got a {kind}"):
        cumo_kernels.moe_mlp(**{**inp, "x": bad}, top_k=2)
    with pytest.raises(TypeError, match="^x: expected a strided"):
        MoEMLP(6, 10, 5, num_experts=4, top_k=2)(bad)
    if kind == "sparse":
        with pytest.raises(TypeError, match="^w1: expected a strided"):
            cumo_kernels.moe_mlp(**{**inp, "w1": inp["w1"].to_sparse()}, top_k=2)
        with pytest.raises(TypeError, match="^offsets: expected a strided"):
            cumo_kernels.grouped_linear(x, torch.randn(2, 5, 6), None, torch.tensor([0, 2, 4]).to_sparse())


def test_aux_losses_of_zero_samples_are_zero():
    """aux_losses with B = 0 returned NaN (a mean over nothing); now 0, as moe_mlp's empty input."""
    ps = torch.zeros(0, 4, requires_grad=True)
    zs = torch.zeros(0, requires_grad=True)
    bal, z = cumo_kernels.aux_losses(ps, torch.zeros(0, 4), zs, 3)
    assert bal.item() == 0.0 and z.item() == 0.0
    (bal + z).backward()
    assert ps.grad.shape == (0, 4) and zs.grad.shape == (0,)


def _cumo_connector_dict():
    import cumo
    from cumo.checkpoint import to_cumo

    return cumo, to_cumo(cumo.MLPMoE(4, 2, 6, 5).state_dict())


@pytest.mark.parametrize("case", ["wrong_shape", "missing_expert", "not_a_tensor"])
def test_checkpoint_errors_name_the_keys(case):
    """A CuMo checkpoint with one expert of the wrong shape or a non-tensor value failed in
    torch.stack naming no key; a missing expert listed the other experts' keys as unexpected and
    the stacked name as missing. Now one error names the keys at fault (and no key twice)."""
    cumo, sd = _cumo_connector_dict()
    from cumo.checkpoint import from_cumo

    key = "experts.1.0.weight"
    if case == "wrong_shape":
        sd[key] = torch.randn(5, 7)
        want = r"'w1' cannot be stacked: shapes differ .*'experts\.1\.0\.weight': \[5, 7\]"
    elif case == "missing_expert":
        del sd[key]
        want = r"'w1' are incomplete: missing \['experts\.1\.0\.weight'\]"
    else:
        sd[key] = sd[key].tolist()
        want = r"'w1' cannot be stacked: values that are not tensors: \{'experts\.1\.0\.weight': 'list'\}"
    with pytest.raises(RuntimeError, match=want) as info:
        cumo.MLPMoE(4, 2, 6, 5).load_state_dict(sd)
    assert "Unexpected key" not in str(info.value)
    with pytest.raises(ValueError, match=want):
        from_cumo(sd, stacked=True)


def test_checkpoint_functions_name_a_wrong_argument():
    cumo, _ = _cumo_connector_dict()
    from cumo.checkpoint import from_cumo, to_cumo

    module = cumo.MLPMoE(4, 2, 6, 5)
    for fn in (from_cumo, to_cumo):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: state_dict: .* got MLPMoE; pass module\.state_dict\(\)"):
            fn(module)
        with pytest.raises(TypeError, match=rf"{fn.__name__}: state_dict: .* got list"):
            fn([("w1", torch.zeros(1))])


def test_aux_loss_names_a_wrong_argument():
    import cumo

    b, z = torch.tensor(0.5), torch.tensor(2.0)
    assert torch.allclose(cumo.aux_loss((b, z), None), torch.tensor(0.07))
    with pytest.raises(TypeError, match=r"place 0: expected a \(balance, z\) pair of tensors or None, got Tensor"):
        cumo.aux_loss(b, z)  # the pair unpacked: a common slip
    with pytest.raises(TypeError, match=r"place 1: .* got tuple of 1"):
        cumo.aux_loss((b, z), (b,))
    with pytest.raises(TypeError, match=r"place 0: .* got tuple of 2"):
        cumo.aux_loss((0.5, 2.0))
