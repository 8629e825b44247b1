"""Tolerance helpers and routing-input factories for testing cumo-kernels and its backends.

The numerics policy (DESIGN.md): every output and every gradient is compared with a float64
reference evaluated on the upcast inputs, by the relative error ``||out - ref|| / ||ref||`` per
tensor. float32 must be within 1e-5; float16 and bfloat16 within 1e-2 and no worse than twice the
error of the torch reference computed in the same low precision. NaN never passes.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ROUTING_KINDS",
    "TOLERANCES",
    "assert_close_rel",
    "make_routing_inputs",
    "near_tie_tokens",
    "rel_err",
    "ulp",
]

TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
"""Largest accepted relative error against the float64 reference, per compute dtype."""

ROUTING_KINDS: tuple[str, ...] = ("random", "one_expert", "empty_expert", "ties")
"""Kinds of router logits `make_routing_inputs` builds."""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64.

    Any NaN (or inf) in `out` or in the difference gives ``inf``, so a NaN never passes a
    tolerance. When ``||ref|| == 0`` the absolute error ``||out - ref||`` is returned instead.
    Shapes must match exactly (no broadcasting).
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"shape mismatch: out {list(out.shape)} vs ref {list(ref.shape)}")
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    if o.numel() == 0:
        return 0.0
    if not torch.isfinite(o).all() or not torch.isfinite(r).all():
        return math.inf
    diff = torch.linalg.vector_norm(o - r).item()
    denom = torch.linalg.vector_norm(r).item()
    if denom == 0.0:
        return diff
    err = diff / denom
    return math.inf if math.isnan(err) else err


def _tolerance(dtype: torch.dtype) -> float:
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; known: {', '.join(str(d) for d in TOLERANCES)}")
    return TOLERANCES[dtype]


def assert_close_rel(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    *,
    baseline: torch.Tensor | None = None,
) -> float:
    """Assert ``rel_err(out, ref) <= TOLERANCES[dtype]``; return the error.

    Args:
        out: the tensor under test (any dtype; compared in float64).
        ref: the float64 reference.
        dtype: the compute dtype the tolerance is chosen by.
        name: the tensor's name, for the message.
        baseline: for low-precision dtypes, the same quantity computed by the torch reference
            in `dtype`: `out` must then also be no worse than twice the baseline's error (with
            a floor of the float32 tolerance, so an exact baseline does not demand exactness).

    Raises:
        AssertionError naming the tensor, the error, the tolerance and the index of the
        largest absolute difference (or of the first non-finite element).
    """
    tol = _tolerance(dtype)
    err = rel_err(out, ref)
    why = f"tolerance {tol:.1e} for {dtype}"
    if baseline is not None and dtype in (torch.float16, torch.bfloat16):
        base_err = rel_err(baseline, ref)
        limit = max(2.0 * base_err, TOLERANCES[torch.float32])
        if limit < tol:
            tol = limit
            why = f"2 x the torch reference's error {base_err:.3e} in {dtype}"
    if err <= tol:
        return err
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    where = ""
    if o.numel():
        bad = ~torch.isfinite(o)
        if bad.any():
            flat = int(bad.reshape(-1).nonzero()[0].item())
            label = "first non-finite element"
        else:
            flat = int((o - r).abs().reshape(-1).argmax().item())
            label = "largest |out - ref|"
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), o.shape))
        where = f"; {label} at index {idx}: out={o[idx].item():.6g}, ref={r[idx].item():.6g}"
    raise AssertionError(f"{name}: relative error {err:.3e} > {why} ({tol:.3e}){where}")


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of `dtype` at each of `values` (float64, same shape)."""
    fi = torch.finfo(dtype)
    v = values.detach().to(torch.float64).abs().clamp_min(fi.tiny)
    return (fi.eps * torch.exp2(torch.floor(torch.log2(v)))).clamp_min(fi.smallest_normal * fi.eps)


def near_tie_tokens(probs: torch.Tensor, top_k: int, dtype: torch.dtype, ulps: float = 2.0) -> torch.Tensor:
    """[T] bool: tokens whose routing hangs on the last bits of `dtype`.

    `probs` [T, E] are exact (float64) routing probabilities. A token is a near tie when two
    adjacent probabilities among its first min(k + 1, E) in descending order (the order within the
    top-k and the k-th/(k+1)-th boundary) differ by more than zero but by no more than `ulps`
    units in the last place of `dtype`. Exact ties are not near ties: equal logits give equal
    scores on every backend, and the lower expert index wins.
    """
    p = probs.detach().to(torch.float64)
    srt = torch.sort(p, dim=-1, descending=True).values
    m = min(top_k + 1, p.shape[-1])
    if m < 2:
        return torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
    hi, lo = srt[:, : m - 1], srt[:, 1:m]
    margin = hi - lo
    return ((margin > 0) & (margin <= ulps * ulp(hi, dtype))).any(dim=-1)


def make_routing_inputs(
    kind: str,
    num_tokens: int,
    num_experts: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    expert: int | None = None,
) -> torch.Tensor:
    """Router logits [num_tokens, num_experts] of a given kind.

    Kinds:
        "random": standard normal logits.
        "one_expert": every token's first choice is `expert` (default: the last expert), by a
            logit margin of 3 over random logits of scale 0.5 (a larger margin makes the softmax
            backward ill-conditioned: p of the chosen expert rounds towards 1 and its gradient
            cancels).
        "empty_expert": `expert` (default: expert 1, or 0 when E == 1) has the lowest logit of every
            token by a margin of 3, so no token routes to it whenever top_k < E.
        "ties": exact ties. Values are small multiples of 0.5 (exact in every float dtype), so
            many tokens tie; the first token has all logits equal and, when E >= 3, the second has
            a three-way tie for first place between experts E-1, 1 and 2 (in that column order).

    Values are generated in float64 and rounded once to `dtype`.
    """
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind: unknown {kind!r}; accepted: {', '.join(ROUTING_KINDS)}")
    if num_tokens < 0 or num_experts < 1:
        raise ValueError(f"need num_tokens >= 0 and num_experts >= 1, got {num_tokens}, {num_experts}")
    gen = torch.Generator().manual_seed(seed)
    t, e = num_tokens, num_experts
    if kind == "random":
        logits = torch.randn(t, e, generator=gen, dtype=torch.float64)
    elif kind == "one_expert":
        target = e - 1 if expert is None else expert
        logits = 0.5 * torch.randn(t, e, generator=gen, dtype=torch.float64)
        logits[:, target] = logits.max(dim=-1).values + 3.0
    elif kind == "empty_expert":
        target = (1 if e > 1 else 0) if expert is None else expert
        logits = 0.5 * torch.randn(t, e, generator=gen, dtype=torch.float64)
        logits[:, target] = logits.min(dim=-1).values - 3.0
    else:
        logits = 0.5 * torch.randint(-2, 3, (t, e), generator=gen).to(torch.float64)
        if t >= 1:
            logits[0] = 0.5
        if t >= 2 and e >= 3:
            logits[1] = -1.0
            logits[1, [e - 1, 1, 2]] = 1.0
    return logits.to(device=device, dtype=dtype)
