"""Float64 oracle of CuMo's MoE MLP block, written from CUMO.md ("Routing and the auxiliary
losses, exactly"), independently of `cumo_kernels.reference`.

Every function upcasts its inputs to float64 and differentiates with ordinary autograd. The
oracle applies CuMo's rounding point that decides the routing: probabilities are rounded to the
activation dtype (the inputs' dtype) before the top-k, with a straight-through gradient (the cast
in CuMo's autograd graph passes gradients unchanged). The expert choice can be given
(`expert_ids=`), so that low-precision results are compared on the backend's own routing.
Ties: the lower expert index wins (a stable sort on the negated probabilities).

The renormalised weights have CuMo's rounding points too: the sum of the selected probabilities
and the quotient are rounded to the activation dtype (as CuMo's `w / w.sum()` in that dtype),
so that the oracle's low-precision weights are the very values CuMo computes and a backend that
skips a rounding shows (`assert_weights_exact`, `assert_within_ulp`).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def up(t: torch.Tensor | None, requires_grad: bool = False) -> torch.Tensor | None:
    """A float64 leaf copy of t (None stays None)."""
    if t is None:
        return None
    return t.detach().to(F64).requires_grad_(requires_grad)


def activation(v: torch.Tensor, name: str) -> torch.Tensor:
    """The activations of CUMO.md from their formulas, in v's dtype."""
    if name == "none":
        return v
    if name == "quick_gelu":
        return v * torch.sigmoid(1.702 * v)
    if name == "gelu":
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name == "silu":
        return v * torch.sigmoid(v)
    if name == "relu":
        return torch.clamp(v, min=0.0)
    if name == "relu2":
        return torch.clamp(v, min=0.0) ** 2
    raise ValueError(name)


def gated(gate: torch.Tensor, up: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The gated expert's hidden activation from issue 23's definition: act(gate) * up, and GPT-OSS's
    clamped SwiGLU (transformers' GptOssExperts): gate clamped above at 7, up into [-7, 7], then
    gate * sigmoid(1.702 gate) * (up + 1).

    The clamps' choice hangs on the last bit of a pre-activation, as the expert choice does on a
    probability's: with `dtype` (the activation dtype) the pre-activations are taken at their
    rounding point, the GEMM's output in that dtype (straight-through gradient, `round_to`)."""
    if name == "gpt_oss_swiglu":
        if dtype is not None:
            gate, up = round_to(gate, dtype), round_to(up, dtype)
        g = gate.clamp(min=None, max=7.0)
        u = up.clamp(min=-7.0, max=7.0)
        return (u + 1.0) * (g * torch.sigmoid(g * 1.702))
    return activation(gate, name) * up


def split_gate_up(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate rows, up rows) of one expert's w1 [2H, ...] (or b1 [2H]) by explicit row indices:
    "concat" holds the H gate rows then the H up rows, "interleaved" alternates them (g0, u0, g1, ...)."""
    h = w.shape[0] // 2
    if layout == "concat":
        gi, ui = list(range(h)), list(range(h, 2 * h))
    elif layout == "interleaved":
        gi, ui = [2 * j for j in range(h)], [2 * j + 1 for j in range(h)]
    else:
        raise ValueError(layout)
    idx = lambda rows: torch.tensor(rows, dtype=torch.int64, device=w.device)  # noqa: E731
    return w.index_select(0, idx(gi)), w.index_select(0, idx(ui))


def round_to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v rounded to dtype and back to float64, with the gradient of the identity."""
    if dtype == F64:
        return v
    return v + (v.detach().to(dtype).to(F64) - v.detach())


def probabilities(logits64: torch.Tensor) -> torch.Tensor:
    """Exact softmax over the experts (float64), before any rounding."""
    return torch.softmax(logits64, dim=-1)


def choose(probs_rounded: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, k] ids: descending rounded probability, equal scores -> lower index first."""
    order = torch.sort(-probs_rounded.detach(), dim=-1, stable=True).indices
    return order[:, :top_k]


def route_oracle(
    logits: torch.Tensor,
    top_k: int,
    num_samples: int = 1,
    *,
    dtype: torch.dtype | None = None,
    expert_ids: torch.Tensor | None = None,
    logits64: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T,k], expert_ids [T,k], prob_sums [B,E], first_counts [B,E], z_sums [B]), float64.

    `logits` gives the dtype of the rounding point (unless `dtype`); `logits64` (float64, possibly
    requiring grad) replaces the upcast of `logits` so that gradients flow to a caller's graph.
    """
    dtype = logits.dtype if dtype is None else dtype
    # CuMo's first rounding point (CUMO.md, routing step 1): the logits are in the activation
    # dtype; their gradient is the identity's (the cast's). Without it the choice followed the
    # unrounded float64 logits, and where two logits round to the same value (a tie every backend
    # resolves by the lower index) the oracle ordered them otherwise: the first GPU run's
    # "expert ids differ" at the design shapes, exactly the tokens where the two differ.
    lg = round_to(up(logits) if logits64 is None else logits64, dtype)
    t, e = lg.shape
    n = t // num_samples
    p = round_to(probabilities(lg), dtype)
    ids = choose(p, top_k) if expert_ids is None else expert_ids.to(device=lg.device, dtype=torch.int64)
    sel = torch.gather(p, 1, ids)
    if ids.shape[1] == 1:
        # One expert per token: its weight is exactly 1 and carries no gradient (sel / sel would
        # give a rounding-noise gradient that no relative error can be taken against).
        weights = sel * 0.0 + 1.0
    else:
        # CuMo's renormalisation `w / w.sum(-1, keepdim=True)` runs in the activation dtype: the
        # sum is rounded to it (torch accumulates in float32 and rounds the result once), then
        # the quotient (computed in float32, rounded once). Its autograd graph differentiates
        # sel / s at the rounded sel and s it saved: round_to's identity gradient does the same.
        total = round_to(sel.sum(dim=-1, keepdim=True), dtype)
        weights = round_to(sel / total, dtype)
    prob_sums = p.reshape(num_samples, n, e).sum(dim=1)
    first = torch.zeros(t, e, dtype=F64, device=lg.device)
    first[torch.arange(t), ids[:, 0]] = 1.0
    first_counts = first.reshape(num_samples, n, e).sum(dim=1)
    lse = torch.logsumexp(lg, dim=-1)
    z_sums = (lse**2).reshape(num_samples, n).sum(dim=1)
    return weights, ids, prob_sums, first_counts, z_sums


# ------------------------------------------------------------- comparisons at the rounding points

# A backend's float32 softmax is within a few float32 ulps (about 2^-22, relative) of the exact
# one: a probability closer than HANG to a rounding boundary of the activation dtype may round
# either way, and with it that token's weights and gradient.
HANG = 2.0**-18
# Float32 arithmetic in a routing backward leaves an error of about 2^-24 of the token's largest
# gradient on the elements that are the small remainder of a cancellation (the unselected
# experts' gradient through the weights exists only through the rounding points, at ~2^-11 of
# the row); measured below 2^-23 of the row on the torch backend, allowed: ROW_FLOOR.
ROW_FLOOR = 2.0**-16


def hanging_tokens(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T] bool: tokens with an exact probability (softmax of `logits` in float64) within HANG of
    a rounding boundary of `dtype`; their low-precision results may differ from the oracle's by
    the last bit of a probability."""
    p = probabilities(up(logits))
    lo, hi = (p * (1.0 - HANG)).to(dtype), (p * (1.0 + HANG)).to(dtype)
    return (lo != hi).any(dim=-1).cpu()


def assert_weights_exact(weights: torch.Tensor, ref: torch.Tensor, skip: torch.Tensor, name: str = "weights") -> None:
    """Low-precision `weights` [T, k] equal the oracle's (`ref`, rounded at CuMo's points) bit for
    bit on every token that `skip` [T] (`hanging_tokens`) does not mark."""
    keep = ~skip.cpu()
    got, want = weights.detach().cpu().to(F64), ref.detach().cpu().to(F64)
    bad = ((got != want).any(dim=-1) & keep).nonzero().flatten()
    if bad.numel():
        t = int(bad[0])
        raise AssertionError(
            f"{name}: {bad.numel()} of {int(keep.sum())} tokens differ from the oracle's weights (rounded where "
            f"CuMo rounds); token {t}: got {got[t].tolist()}, oracle {want[t].tolist()}"
        )


def assert_within_ulp(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str, skip: torch.Tensor | None = None
) -> None:
    """Every element of `out` [T, E] (in `dtype`) within one ulp of `dtype` of the float64 `ref`,
    plus ROW_FLOOR times the largest |ref| of its row (float32 arithmetic on cancellations); rows
    that `skip` [T] marks are left out. NaN never passes."""
    from cumo_kernels.testing import ulp

    got, want = out.detach().cpu().to(F64), ref.detach().cpu().to(F64)
    allowed = ulp(want, dtype) + ROW_FLOOR * want.abs().amax(dim=-1, keepdim=True)
    bad = ~((got - want).abs() <= allowed)
    if skip is not None:
        bad &= ~skip.cpu().reshape(-1, 1)
    if bad.any():
        t, e = (int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements further than one ulp of {dtype} from the oracle "
            f"(+ {ROW_FLOOR:.1e} of the row); [{t}, {e}]: got {got[t, e].item():.6g}, oracle {want[t, e].item():.6g}, "
            f"ulp {ulp(want[t, e], dtype).item():.3g}; row got {got[t].tolist()}, oracle {want[t].tolist()}"
        )


def aux_losses_oracle(
    prob_sums: torch.Tensor, first_counts: torch.Tensor, z_sums: torch.Tensor, tokens_per_sample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance, z) in float64: mean_{b,e}(P f) E^2 with P = prob_sums/N, f = first_counts/N;
    z = mean over the B*N tokens of lse^2."""
    b, e = prob_sums.shape
    n = tokens_per_sample
    p_mean = prob_sums.to(F64) / n
    f = first_counts.to(F64).detach() / n
    balance = (p_mean * f).sum() / (b * e) * e**2
    z = z_sums.to(F64).sum() / (b * n)
    return balance, z


def permute_oracle(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sorted, sort_idx, offsets) by explicit loops: expert by expert, slots in order."""
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1).tolist()
    order: list[int] = []
    offsets = [0]
    for e in range(num_experts):
        order.extend(s for s in range(t * k) if flat[s] == e)
        offsets.append(len(order))
    sort_idx = torch.tensor(order, dtype=torch.int64, device=x.device)
    rows = torch.tensor([s // k for s in order], dtype=torch.int64, device=x.device)
    return x[rows], sort_idx, torch.tensor(offsets, dtype=torch.int64, device=x.device)


def grouped_linear_oracle(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor, act: str
) -> torch.Tensor:
    """act(x[rows of e] @ weight[e]^T + bias[e]) per expert, in x's dtype (use float64 leaves)."""
    bounds = offsets.tolist()
    parts = []
    for e in range(weight.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        pre = x[s:t] @ weight[e].t()
        if bias is not None:
            pre = pre + bias[e]
        parts.append(activation(pre, act))
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, weight.shape[1])


def unpermute_oracle(y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y_sorted[i] where sort_idx[i] = t*k + j (explicit loop)."""
    t, k = weights.shape
    row_of = {int(s): i for i, s in enumerate(sort_idx.tolist())}
    rows = []
    for tok in range(t):
        acc = y_sorted.new_zeros(y_sorted.shape[1])
        for j in range(k):
            acc = acc + weights[tok, j] * y_sorted[row_of[tok * k + j]]
        rows.append(acc)
    return torch.stack(rows) if rows else y_sorted.new_zeros(0, y_sorted.shape[1])


def dense_mlp_oracle(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act: str,
    glu: str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """fc2(act(fc1(x))) for one expert's weights w1 [hidden, in], w2 [out, hidden], in x's dtype.
    With `glu` ("concat" or "interleaved"), w1 is [2*hidden, in] and b1 [2*hidden] in that layout,
    and the expert is fc2(gated(x W_gate^T + b_gate, x W_up^T + b_up))."""
    if glu is None:
        h = x @ w1.t()
        if b1 is not None:
            h = h + b1
        h = activation(h, act)
    else:
        wg, wu = split_gate_up(w1, glu)
        gate, up_ = x @ wg.t(), x @ wu.t()
        if b1 is not None:
            bg, bu = split_gate_up(b1, glu)
            gate, up_ = gate + bg, up_ + bu
        h = gated(gate, up_, act, dtype)
    y = h @ w2.t()
    if b2 is not None:
        y = y + b2
    return y


def moe_oracle(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    top_k: int,
    activation: str,
    expert_ids: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    glu: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CuMo's MoE MLP block in float64: (y, balance, z, expert_ids).

    `glu` ("concat" or "interleaved"): gated experts (issue 23), w1 [E, 2*hidden, in] and b1
    [E, 2*hidden] in that row layout (`dense_mlp_oracle`).

    Inputs may be of any float dtype; tensors that are float64 leaves requiring grad are used as
    they are (so the caller can differentiate), others are upcast. The probabilities are rounded
    to `dtype` (default: x.dtype; for float64 leaves pass the activation dtype) before the top-k.
    x is [T, in] (one sample) or [B, N, in] (per-sample balance statistics).
    `expert_ids` [T, k] (flattened tokens), if given, replaces the oracle's own choice.
    """
    dtype = x.dtype if dtype is None else dtype

    def f64(t):
        if t is None:
            return None
        return t if t.dtype == F64 else t.detach().to(F64)

    x64, g64, w1_64, b1_64, w2_64, b2_64 = (f64(t) for t in (x, gate_weight, w1, b1, w2, b2))
    d_in = x64.shape[-1]
    samples = x64.shape[0] if x64.dim() == 3 else 1
    xf = x64.reshape(-1, d_in)
    t = xf.shape[0]
    logits = xf @ g64.t()
    weights, ids, prob_sums, first_counts, z_sums = route_oracle(
        logits.detach().to(dtype), top_k, samples, dtype=dtype, expert_ids=expert_ids, logits64=logits
    )
    num_experts = g64.shape[0]
    y = None
    for e in range(num_experts):
        ye = dense_mlp_oracle(
            xf,
            w1_64[e],
            None if b1_64 is None else b1_64[e],
            w2_64[e],
            None if b2_64 is None else b2_64[e],
            activation,
            glu,
            dtype,
        )
        coef = (weights * (ids == e).to(F64)).sum(dim=-1, keepdim=True)  # [T, 1]
        term = torch.where(coef != 0, coef * ye, torch.zeros_like(ye))
        y = term if y is None else y + term
    balance, z = aux_losses_oracle(prob_sums, first_counts, z_sums, t // samples)
    return y.reshape(*x64.shape[:-1], y.shape[-1]), balance, z, ids
