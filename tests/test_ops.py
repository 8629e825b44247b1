"""The building-block ops (route, permute, grouped_linear, unpermute, aux_losses) against the
float64 oracle: forward values, index outputs exactly, and every gradient; plus opcheck."""

from __future__ import annotations

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import ACTIVATIONS, DTYPES, LOW, poison, seeded, skip_unsupported
from test_glu import glu_op_samples
from test_triton_fused import fused_op_samples

import cumo_kernels
from cumo_kernels import dispatch
from cumo_kernels.backend import required_ops
from cumo_kernels.testing import ROUTING_KINDS, TOLERANCES, assert_close_rel, make_routing_inputs, ulp

F32 = torch.float32


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)


# ----------------------------------------------------------------------------------------- route

# (T, B, E, k)
ROUTE_CASES = [
    (1, 1, 4, 2),
    (7, 1, 4, 2),
    (33, 1, 8, 3),
    (15, 3, 4, 2),
    (7, 1, 4, 1),
    (7, 1, 4, 4),
    (33, 1, 8, 8),
    (5, 1, 1, 1),
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "T{}-B{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("kind", ROUTING_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route(device, backend, dtype, kind, case):
    skip_unsupported(device, backend, dtype)
    t, b, e, k = case
    logits = make_routing_inputs(kind, t, e, dtype=dtype, device=device, seed=t * 100 + e).requires_grad_()
    poison(device)
    w, ids, ps, fc, zs = cumo_kernels.route(logits, k, b, backend=backend)

    assert w.shape == (t, k) and w.dtype == dtype
    assert ids.shape == (t, k) and ids.dtype == torch.int64
    assert ps.shape == (b, e) and ps.dtype == F32
    assert fc.shape == (b, e) and fc.dtype == F32
    assert zs.shape == (b,) and zs.dtype == F32

    l64 = oracle.up(logits, True)
    rw, rids, rps, rfc, rzs = oracle.route_oracle(logits, k, b, logits64=l64)
    # Routing fed given logits: the ids compare exactly, in every dtype.
    assert torch.equal(ids.cpu(), rids.cpu()), f"expert_ids differ from the oracle:\n{ids}\nvs\n{rids}"
    assert torch.equal(fc.cpu().double(), rfc.cpu()), f"first_counts differ: {fc} vs {rfc}"
    assert fc.sum().item() == t
    assert_close_rel(w, rw, dtype, "weights")
    # In bf16/fp16 the oracle's weights are CuMo's values (the sum and the quotient rounded to the
    # activation dtype): equal bit for bit, except on tokens whose probabilities round either way.
    # A backend that skips a rounding differs by an ulp on a quarter of the weights, far inside
    # the relative tolerance, so only this shows it.
    hang = oracle.hanging_tokens(logits, dtype) if dtype in LOW else None
    if hang is not None:
        oracle.assert_weights_exact(w, rw, hang)
    assert_close_rel(ps, rps, dtype, "prob_sums")
    assert_close_rel(zs, rzs, F32, "z_sums (float32 from the given logits)")

    if kind == "one_expert":
        assert (ids[:, 0] == e - 1).all()
    if kind == "empty_expert" and k < e:
        assert not (ids == min(1, e - 1)).any()
    if kind == "ties":
        assert torch.equal(ids[0].cpu(), torch.arange(k)), "all-equal logits: ids must be 0..k-1"
        if t >= 2 and e >= 3:
            want = torch.tensor([1, 2, e - 1] + [i for i in range(e) if i not in (1, 2, e - 1)])
            assert torch.equal(ids[1].cpu(), want[:k]), f"three-way tie: got {ids[1].tolist()}"

    g = seeded(7)
    gw = torch.randn(t, k, generator=g).to(device=device, dtype=dtype)
    gp = torch.randn(b, e, generator=g).to(device)
    gz = torch.randn(b, generator=g).to(device)
    losses = {
        "weights": ((w * gw).sum(), (rw * gw.double()).sum()),
        "prob_sums": ((ps * gp).sum(), (rps * gp.double()).sum()),
        "z_sums": ((zs * gz).sum(), (rzs * gz.double()).sum()),
    }
    losses["all"] = tuple(sum(v[i] for v in losses.values()) for i in (0, 1))
    for name, (loss, ref) in losses.items():
        (gl,) = _grads(loss, [logits])
        (rl,) = _grads(ref, [l64])
        assert gl.dtype == dtype
        assert_close_rel(gl, rl, dtype, f"grad logits through {name}")
        if hang is not None:
            # Element by element: the backward must use the rounded probabilities and their
            # rounded sum, as CuMo's autograd does (unrounded ones move ~half the elements by
            # more than an ulp, a relative error of only ~2e-3).
            oracle.assert_within_ulp(gl, rl, dtype, f"grad logits through {name}", skip=hang)


def test_route_tie_rule():
    """Equal scores: the lower expert index wins, for the top-k set, its order and the first choice."""
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 3.0, 3.0, 3.0],
            [2.0, -1.0, 2.0, 2.0],
            [0.0, 5.0, 1.0, 5.0],
        ]
    )
    for backend in cumo_kernels.available_backends("cpu"):
        for dtype in (torch.float32, torch.float16):
            _, ids, _, fc, _ = cumo_kernels.route(logits.to(dtype), 2, backend=backend)
            assert ids.tolist() == [[0, 1], [1, 2], [0, 2], [1, 3]], (backend, dtype, ids.tolist())
            assert fc.tolist() == [[2.0, 2.0, 0.0, 0.0]], (backend, dtype, fc.tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route_one_expert_weight_is_exactly_one(device, backend, dtype):
    """k = 1: the sum of the one selected probability, rounded to the activation dtype, is that
    probability, so every weight is exactly 1 and the weights carry exactly no gradient."""
    skip_unsupported(device, backend, dtype)
    logits = (3 * torch.randn(67, 5, generator=seeded(11))).to(device=device, dtype=dtype).requires_grad_()
    w, _, _, _, _ = cumo_kernels.route(logits, 1, 1, backend=backend)
    assert (w == 1).all(), f"k = 1 weights differ from 1: {w[w != 1].tolist()}"
    (g,) = _grads((w * torch.randn(67, 1, generator=seeded(12)).to(device=device, dtype=dtype)).sum(), [logits])
    assert (g == 0).all(), f"k = 1: gradient noise through the weights, up to {g.abs().max().item():.3g}"


def _cumo_routing_graph(logits: torch.Tensor, top_k: int, num_samples: int) -> dict[str, torch.Tensor]:
    """CuMo's routing (CUMO.md, "Routing and the auxiliary losses, exactly" and "Precision as
    CuMo runs it"), written out and run as CuMo runs it, in logits.dtype: the z-loss from the
    logits, softmax in float32 cast to the activation dtype, top-k on the cast probabilities
    (the package's tie rule: a stable descending sort), the per-sample means P and f, and
    w / w.sum() in the activation dtype. Returns its outputs and the low-precision tensors its
    autograd saves (probs, the sum of the selected ones)."""
    t, e = logits.shape
    x = logits.reshape(num_samples, t // num_samples, e)
    z = torch.logsumexp(x, dim=-1).square().mean()
    probs = torch.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)
    p_mean = probs.mean(dim=1)
    ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    sel, ids = ranked[..., :top_k], order[..., :top_k]
    f = F.one_hot(ids[..., 0], e).float().mean(dim=1)
    total = sel.sum(dim=-1, keepdim=True)
    weights = sel / total
    return {"weights": weights, "ids": ids, "P": p_mean, "f": f, "z": z, "probs": probs, "total": total}


def _at(v: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `v` taking the low-precision graph's `value` (the same quantity, within one ulp),
    with the gradient of the identity (a cast's)."""
    val = value.detach().to(torch.float64)
    assert ((val - v.detach()).abs() <= ulp(val, dtype)).all(), "the replay computes another quantity"
    return v + (val - v.detach())


def _cumo_graph_grad(logits, top_k, num_samples, graph, gw, gp_mean, gz) -> torch.Tensor:
    """d/d logits of (w * gw).sum() + (P * gp_mean).sum() + z * gz through CuMo's graph at its
    rounding points: autograd over the same graph in float64, every tensor that CuMo holds in the
    activation dtype and its autograd saves (probs, the sum) taking the value of the
    low-precision run above, so that only the arithmetic of the backward is exact.

    CuMo's own backward runs that arithmetic in bf16/fp16 (grad / sum, the products, their
    accumulation), which moves ~half the logits' gradient by more than an ulp (up to hundreds)
    from the exact value: a backend computing in float32 cannot match it element by element, nor
    should it (its relative error is ~2x the backends'). The z-loss is kept in float32 by the
    package (z_sums): its gradient here is that of the exact z of the rounded logits."""
    t, e = logits.shape
    dtype = logits.dtype
    l64 = logits.detach().to(torch.float64).requires_grad_()
    x = l64.reshape(num_samples, t // num_samples, e)
    probs = _at(torch.softmax(x, dim=-1), graph["probs"], dtype)
    sel = probs.gather(-1, graph["ids"])
    total = _at(sel.sum(dim=-1, keepdim=True), graph["total"], dtype)
    if top_k == 1:
        # sel / sel: the constant 1, whose exact gradient is 0 (float64's grad / s - grad * (s / s)
        # / s would leave ~1e-16 on rows that are otherwise exactly 0).
        weights = torch.ones_like(sel)
    else:
        weights = _at(sel / total, graph["weights"], dtype)
    z = torch.logsumexp(x, dim=-1).square().mean()
    loss = (weights.reshape(t, top_k) * gw.double()).sum() + (probs.mean(dim=1) * gp_mean.double()).sum() + z * gz
    (grad,) = torch.autograd.grad(loss, l64)
    return grad


# (T, B, E, k): CuMo's E = 4, k = 2 first
CUMO_GRAPH_CASES = [(512, 2, 4, 2), (300, 3, 8, 3), (128, 1, 64, 8), (64, 1, 4, 4), (64, 2, 4, 1)]


@pytest.mark.parametrize("case", CUMO_GRAPH_CASES, ids=lambda c: "T{}-B{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_route_matches_cumo_graph(dtype, scale, case):
    """The torch backend in bf16/fp16 against CuMo's own routing graph run in the same dtype on
    the CPU: weights and ids bit for bit, P, f and z within one ulp, and the logits' gradient
    through each output within one ulp of that graph's gradient at its rounding points
    (`_cumo_graph_grad`). The torch backend is the baseline that the other backends' errors are
    measured against, so a rounding point it misses (the backward with unrounded probabilities,
    or their unrounded sum) passes every relative tolerance and shows only here."""
    t, b, e, k = case
    n = t // b
    g = seeded(t + e + k)
    logits = (scale * torch.randn(t, e, generator=g)).to(dtype).requires_grad_()
    w, ids, ps, fc, zs = cumo_kernels.route(logits, k, b, backend="torch")
    graph = _cumo_routing_graph(logits.detach(), k, b)

    assert torch.equal(ids, graph["ids"].reshape(t, k)), "expert ids differ from CuMo's graph"
    assert torch.equal(w, graph["weights"].reshape(t, k)), "weights differ from CuMo's w / w.sum() in the dtype"
    assert torch.equal(fc / n, graph["f"]), "first-choice fractions differ from CuMo's"
    p_mean, z = (ps / n).to(dtype), (zs.sum() / t).to(dtype)
    assert ((p_mean.double() - graph["P"].double()).abs() <= ulp(graph["P"], dtype)).all(), (p_mean, graph["P"])
    assert (z.double() - graph["z"].double()).abs() <= ulp(graph["z"], dtype), (z, graph["z"])
    if k == 1:
        assert (w == 1).all(), "k = 1: every weight is exactly 1"

    gw = torch.randn(t, k, generator=g).to(dtype)
    gp_mean = torch.randn(b, e, generator=g)
    gz = float(torch.randn(1, generator=g))
    zero_w, zero_p = torch.zeros_like(gw), torch.zeros_like(gp_mean)
    paths = {"weights": (gw, zero_p, 0.0), "P": (zero_w, gp_mean, 0.0), "z": (zero_w, zero_p, gz)}
    paths["all"] = (gw, gp_mean, gz)
    for name, (d_w, d_p, d_z) in paths.items():
        loss = (w * d_w).sum() + (ps / n * d_p).sum() + zs.sum() / t * d_z
        (got,) = _grads(loss, [logits])
        want = _cumo_graph_grad(logits, k, b, graph, d_w, d_p, d_z)
        assert got.dtype == dtype
        oracle.assert_within_ulp(got, want, dtype, f"grad logits through {name} vs CuMo's graph")
        if k == 1 and name == "weights":
            # CuMo's own bf16 backward leaves rounding noise here (grad/s - grad*(s/s)/s rounded
            # apart, on ~a quarter of the tokens); the weights are constant: exactly no gradient.
            assert (got == 0).all(), "k = 1: the weights carry no gradient"


def test_route_nan_token_ids_in_range(device, backend):
    """A NaN logit row still yields k distinct in-range ids and leaves other tokens' results alone."""
    logits = make_routing_inputs("random", 9, 4, device=device, seed=3)
    clean = cumo_kernels.route(logits, 2, backend=backend)
    logits[4, 1] = float("nan")
    w, ids, _, _, _ = cumo_kernels.route(logits, 2, backend=backend)
    assert ((ids >= 0) & (ids < 4)).all()
    assert (ids[:, 0] != ids[:, 1]).all()
    others = [i for i in range(9) if i != 4]
    assert torch.equal(ids[others], clean[1][others])
    assert torch.equal(w[others], clean[0][others])


# --------------------------------------------------------------------------------------- permute

# (T, E, k, ids kind)
PERMUTE_CASES = [
    (1, 4, 2, "random"),
    (7, 4, 2, "random"),
    (33, 8, 3, "random"),
    (33, 4, 2, "one_expert"),
    (33, 4, 2, "empty_expert"),
    (7, 4, 4, "random"),
    (7, 4, 1, "random"),
    (5, 1, 1, "random"),
    (9, 4, 3, "repeats"),  # not from route: repeated ids within a token; grouping is still defined
]


def _ids(kind: str, t: int, e: int, k: int, seed: int) -> torch.Tensor:
    if kind == "repeats":
        return torch.randint(0, e, (t, k), generator=seeded(seed))
    logits = make_routing_inputs(kind, t, e, seed=seed, dtype=torch.float64)
    return oracle.choose(torch.softmax(logits, -1), k)


@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: "T{}-E{}-k{}-{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute(device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
    t, e, k, kind = case
    h = 13
    ids = _ids(kind, t, e, k, seed=t + e).to(device)
    x = torch.randn(t, h, generator=seeded(1)).to(device=device, dtype=dtype).requires_grad_()
    poison(device)
    xs, sort_idx, offsets = cumo_kernels.permute(x, ids, e, backend=backend)
    rxs, ridx, roff = oracle.permute_oracle(x.detach(), ids.cpu(), e)
    assert xs.dtype == dtype and sort_idx.dtype == torch.int64 and offsets.dtype == torch.int64
    assert torch.equal(sort_idx.cpu(), ridx.cpu()), f"sort_idx {sort_idx.tolist()} != {ridx.tolist()}"
    assert torch.equal(offsets.cpu(), roff.cpu()), f"offsets {offsets.tolist()} != {roff.tolist()}"
    assert torch.equal(xs.cpu(), rxs.cpu()), "x_sorted is a gather: it must be exact"

    gs = torch.randn(t * k, h, generator=seeded(2)).to(device=device, dtype=dtype)
    (gx,) = _grads((xs * gs).sum(), [x])
    x64 = oracle.up(x, True)
    ref = oracle.permute_oracle(x64, ids.cpu(), e)[0]
    (rgx,) = _grads((ref * gs.double()).sum(), [x64])
    assert gx.dtype == dtype
    assert_close_rel(gx, rgx, dtype, "grad x")


# -------------------------------------------------------------------------------- grouped_linear

LAYOUTS = {
    "ragged": [0, 5, 5, 12, 17],
    "all_in_one": [0, 0, 17, 17, 17],
    "one_row": [0, 0, 0, 1, 1],
    "single_expert": [0, 7],
    "no_rows": [0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", ("none",) + ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_linear(device, backend, dtype, bias, activation, layout):
    skip_unsupported(device, backend, dtype)
    offs = LAYOUTS[layout]
    e, m, kdim, n = len(offs) - 1, offs[-1], 13, 11  # dims not multiples of 4 / 8 / 16
    g = seeded(m * 10 + e)
    x = torch.randn(m, kdim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(e, n, kdim, generator=g) / kdim**0.5).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(e, n, generator=g).to(device=device, dtype=dtype).requires_grad_() if bias else None
    offsets = torch.tensor(offs, device=device)
    poison(device)
    y = cumo_kernels.grouped_linear(x, w, b, offsets, activation, backend=backend)
    assert y.shape == (m, n) and y.dtype == dtype

    leaves = [x, w] + ([b] if bias else [])
    l64 = [oracle.up(t, True) for t in leaves]
    ref = oracle.grouped_linear_oracle(l64[0], l64[1], l64[2] if bias else None, offsets.cpu(), activation)
    assert_close_rel(y, ref, dtype, "y")

    gy = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    grads = _grads((y * gy).sum(), leaves)
    refs = _grads((ref * gy.double()).sum(), l64)
    for name, gr, rr in zip(("grad x", "grad weight", "grad bias"), grads, refs):
        assert gr.dtype == dtype
        assert_close_rel(gr, rr, dtype, name)
    for ex in range(e):
        if offs[ex] == offs[ex + 1]:
            assert (grads[1][ex] == 0).all(), f"grad weight of expert {ex} without rows is not zero"
            if bias:
                assert (grads[2][ex] == 0).all(), f"grad bias of expert {ex} without rows is not zero"


# ------------------------------------------------------------------------------------- unpermute


@pytest.mark.parametrize("case", [(1, 4, 2), (7, 4, 2), (33, 8, 3), (7, 4, 1), (7, 4, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpermute(device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
    t, e, k = case
    n = 11
    ids = _ids("random", t, e, k, seed=t * 3 + k)
    _, sort_idx, _ = oracle.permute_oracle(torch.zeros(t, 1), ids, e)
    g = seeded(t + k)
    ys = torch.randn(t * k, n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    wts = torch.rand(t, k, generator=g).to(device=device, dtype=dtype).requires_grad_()
    poison(device)
    out = cumo_kernels.unpermute(ys, sort_idx.to(device), wts, backend=backend)
    assert out.shape == (t, n) and out.dtype == dtype
    ys64, w64 = oracle.up(ys, True), oracle.up(wts, True)
    ref = oracle.unpermute_oracle(ys64, sort_idx, w64)
    assert_close_rel(out, ref, dtype, "out")
    go = torch.randn(t, n, generator=g).to(device=device, dtype=dtype)
    gys, gw = _grads((out * go).sum(), [ys, wts])
    rys, rw = _grads((ref * go.double()).sum(), [ys64, w64])
    assert gys.dtype == dtype and gw.dtype == dtype
    assert_close_rel(gys, rys, dtype, "grad y_sorted")
    assert_close_rel(gw, rw, dtype, "grad weights")


# ------------------------------------------------------------------------------------ aux_losses


@pytest.mark.parametrize("case", [(1, 4, 7), (3, 4, 5), (2, 8, 1), (1, 1, 3)], ids=lambda c: "B{}-E{}-N{}".format(*c))
def test_aux_losses(device, case):
    b, e, n = case
    g = seeded(b * e * n)
    ps = (torch.rand(b, e, generator=g) * n).to(device).requires_grad_()
    fc = torch.randint(0, n + 1, (b, e), generator=g).float().to(device).requires_grad_()
    zs = (torch.rand(b, generator=g) * 4 * n).to(device).requires_grad_()
    bal, z = cumo_kernels.aux_losses(ps, fc, zs, n)
    assert bal.shape == () and z.shape == () and bal.dtype == F32 and z.dtype == F32
    ps64, zs64 = oracle.up(ps, True), oracle.up(zs, True)
    rbal, rz = oracle.aux_losses_oracle(ps64, fc.detach(), zs64, n)
    assert_close_rel(bal, rbal, F32, "balance")
    assert_close_rel(z, rz, F32, "z")
    # An explicit formula too: balance = mean((P/N)(f/N)) E^2, z = sum / (B N).
    explicit = ((ps.detach().double() / n) * (fc.detach().double() / n)).mean() * e * e
    assert_close_rel(bal, explicit, F32, "balance (explicit)")
    for name, loss, ref in (
        ("balance", bal, rbal),
        ("z", z, rz),
        ("both", 0.1 * bal + 0.01 * z, 0.1 * rbal + 0.01 * rz),
    ):
        gps, gfc, gzs = torch.autograd.grad(loss, [ps, fc, zs], retain_graph=True, allow_unused=True)
        rps, rzs = _grads(ref, [ps64, zs64])
        assert_close_rel(gps if gps is not None else torch.zeros_like(ps), rps, F32, f"grad prob_sums ({name})")
        assert_close_rel(gzs if gzs is not None else torch.zeros_like(zs), rzs, F32, f"grad z_sums ({name})")
        assert gfc is None or (gfc == 0).all(), "first_counts must carry no gradient"


def test_tolerance_table():
    assert TOLERANCES == {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------------------- opcheck


def _op_samples(backend: str) -> dict[str, list[tuple]]:
    g = seeded(0)
    t, e, k, h, n = 7, 4, 2, 13, 11
    logits = torch.randn(t, e, generator=g).requires_grad_()
    logits3 = torch.randn(15, e, generator=g).requires_grad_()
    w, ids, ps, fc, zs = torch.ops.cumo.route(logits.detach(), k, 1, backend)
    x = torch.randn(t, h, generator=g).requires_grad_()
    xs, sort_idx, offsets = torch.ops.cumo.permute(x.detach(), ids, e, backend)
    w1 = torch.randn(e, n, h, generator=g).requires_grad_()
    b1 = torch.randn(e, n, generator=g).requires_grad_()
    xs_rg = xs.detach().clone().requires_grad_()
    y, pre = torch.ops.cumo.grouped_linear(xs.detach(), w1.detach(), b1.detach(), offsets, "gelu", backend)
    ys = torch.randn(t * k, n, generator=g).requires_grad_()
    w2 = torch.randn(e, 5, n, generator=g)
    b2 = torch.randn(e, 5, generator=g)
    wts = w.detach().clone().requires_grad_()
    samples = {
        "route": [(logits, k, 1, backend), (logits3, 3, 3, backend), (logits.detach().half(), 1, 1, backend)],
        "route_backward": [
            (
                torch.randn(t, k, generator=g),
                torch.randn(1, e, generator=g),
                torch.randn(1, generator=g),
                logits.detach(),
                ids,
                backend,
            )
        ],
        "permute": [(x, ids, e, backend)],
        "permute_backward": [(torch.randn(t * k, h, generator=g), sort_idx, k, backend)],
        "grouped_linear": [
            (xs_rg, w1, b1, offsets, "gelu", backend),
            (xs_rg, w1, None, offsets, "none", backend),
            (xs_rg, w1, b1, offsets, "quick_gelu", backend),
        ],
        "grouped_linear_backward": [
            (torch.randn(t * k, n, generator=g), xs.detach(), w1.detach(), offsets, pre, "gelu", True, backend),
            (
                torch.randn(t * k, n, generator=g),
                xs.detach(),
                w1.detach(),
                offsets,
                xs.new_empty(0),
                "none",
                False,
                backend,
            ),
        ],
        "unpermute": [(ys, sort_idx, wts, backend)],
        "unpermute_backward": [(torch.randn(t, n, generator=g), ys.detach(), sort_idx, w.detach(), backend)],
        "aux_losses": [(ps.detach().requires_grad_(), fc, zs.detach().requires_grad_(), t)],
        # Inference only (no autograd formula): inputs without requires_grad.
        "expert_mlp": [
            (xs.detach(), w1.detach(), b1.detach(), w2, b2, offsets, "quick_gelu", backend),
            (xs.detach(), w1.detach(), None, w2, None, offsets, "none", backend),
        ],
    }
    return samples | fused_op_samples(backend) | glu_op_samples(backend)  # those ops' samples live with their tests


def _provides(backend: str, op_name: str) -> bool:
    """Whether `backend` provides the op (the contract: cumo_kernels.backend; tests/test_contract.py
    checks that it provides every op its composition and features require)."""
    mod = dispatch.implementation(backend)
    return op_name in required_ops(mod.COMPOSITION, mod.FEATURES)


def _cumo_ops() -> list[str]:
    return sorted(n for n in dir(torch.ops.cumo) if isinstance(getattr(torch.ops.cumo, n), torch._ops.OpOverloadPacket))


def test_every_op_has_opcheck_samples():
    ops = _cumo_ops()
    assert ops, "no torch.ops.cumo ops registered"
    missing = set(ops) - set(_op_samples("torch"))
    assert not missing, f"ops without opcheck samples (add them to _op_samples): {sorted(missing)}"


@pytest.mark.parametrize("op_name", _cumo_ops())
def test_opcheck(device, backend, op_name):
    if device != "cpu":
        pytest.skip("opcheck samples are built on the CPU")
    if op_name.removesuffix("_backward") != "aux_losses" and not _provides(backend, op_name):
        pytest.skip(f"the {backend} backend does not provide {op_name} (its composition and features do not have it)")
    op = getattr(torch.ops.cumo, op_name)
    for i, args in enumerate(_op_samples(backend)[op_name]):
        try:
            torch.library.opcheck(op, args)
        except Exception as exc:  # noqa: BLE001 - re-raise with the sample's index
            raise AssertionError(f"opcheck of cumo::{op_name} failed on sample {i}: {exc}") from exc
