"""The weighted combine (`unpermute`, `cumo::grouped_linear_combine`) rounds once, on every backend.

out[t] = sum_j weights[t, j] * row[t, j] in a low-precision dtype: each product of two fp16 (or
bf16) numbers is exact in float32, so a combine that multiplies and accumulates in float32 and
rounds the sum once to the output dtype lands within one ulp of the exact sum rounded once. A
combine that rounds each product to the low-precision dtype first (one extra rounding per term)
still passes the relative-error policy of the other tests (1e-2, and 2x the torch backend's error),
but not this one where the rows cancel. The reference is the float64 sum of the exact products
(computed from the same low-precision inputs), rounded once; the backend's output must equal it or
one of its two neighbours in the output dtype.

k = 2, 3, 4: with k = 2 the float32 sum of two exact products is itself within one float32 ulp of
the exact sum, so the one-ulp bound is a theorem; with k = 3, 4 a float32 running sum could in
principle drift by more where the partial sums cancel far below the result (measured on 3.2 M
random fp16 elements: never for k <= 4, 5 times for k = 8), so k stays <= 4.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from conftest import LOW, poison, seeded, skip_unsupported

import cumo_kernels
from cumo_kernels.testing import assert_close_rel, make_routing_inputs

# (T, E, k): k >= 2, up to all experts; T and N not multiples of the kernels' block sizes
CASES = [(1, 4, 2), (61, 4, 2), (61, 4, 3), (61, 4, 4), (37, 8, 3)]
N = 43


def _routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sort_idx [t*k], offsets [E+1]) of a float64 routing (oracle order)."""
    logits = make_routing_inputs("random", t, e, seed=seed, dtype=torch.float64)
    ids = oracle.choose(torch.softmax(logits, -1), k)
    _, sort_idx, offsets = oracle.permute_oracle(torch.zeros(t, 1), ids, e)
    return sort_idx, offsets


def rounded_once(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * rows[t, j] from the low-precision inputs, in float64 (each product
    exact), rounded once to their dtype. rows [T, k, N], weights [T, k] -> [T, N]."""
    exact = (weights.double().unsqueeze(-1) * rows.double()).sum(dim=1)
    return exact.to(rows.dtype)


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """out equals ref, or one of ref's two neighbours in ref's dtype (NaN never passes)."""
    out, ref = out.cpu(), ref.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    inf = torch.tensor(float("inf"), dtype=ref.dtype)
    below, above = torch.nextafter(ref, -inf), torch.nextafter(ref, inf)
    ok = torch.isfinite(out) & ((out == ref) | (out == below) | (out == above))
    if not ok.all():
        bad = (~ok).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{name}: {bad.shape[0]} of {out.numel()} elements are more than one {ref.dtype} ulp from the "
            f"sum rounded once; first at {list(i)}: got {out[i].item()!r}, the sum rounded once is {ref[i].item()!r}"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_unpermute_rounds_once(device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
    t, e, k = case
    sort_idx, _ = _routing(t, e, k, seed=t * 7 + k)
    g = seeded(t * 11 + k)
    ys = torch.randn(t * k, N, generator=g).to(dtype)
    wts = torch.rand(t, k, generator=g).to(dtype)  # routing weights: positive; the rows cancel
    poison(device)
    out = cumo_kernels.unpermute(ys.to(device), sort_idx.to(device), wts.to(device), backend=backend)
    rows = torch.empty_like(ys)
    rows[sort_idx] = ys  # slot order: rows[t*k + j] is token t's j-th choice
    assert_within_one_ulp(out, rounded_once(rows.view(t, k, N), wts), "unpermute")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_grouped_linear_combine_rounds_once(device, backend, dtype, case, bias):
    """The combine of the second GEMM's rows: those rows are the op's own y_slot output (the GEMM's
    rows in slot order, rounded to the dtype, which the backward reuses), so the combine is checked
    on exactly the rows it summed; y_slot itself is checked against the float64 GEMM."""
    skip_unsupported(device, backend, dtype)
    t, e, k = case
    d = 29
    sort_idx, offsets = _routing(t, e, k, seed=t * 5 + e + k)
    g = seeded(t * 13 + k)
    h = torch.randn(t * k, d, generator=g).to(dtype)
    w = (torch.randn(e, N, d, generator=g) / d**0.5).to(dtype)
    b = torch.randn(e, N, generator=g).to(dtype) if bias else None
    wts = torch.rand(t, k, generator=g).to(dtype)
    poison(device)
    out, y_slot = torch.ops.cumo.grouped_linear_combine(
        h.to(device),
        w.to(device),
        None if b is None else b.to(device),
        sort_idx.to(device),
        offsets.to(device),
        wts.to(device),
        backend,
    )
    assert out.shape == (t, N) and out.dtype == dtype and y_slot.shape == (t * k, N) and y_slot.dtype == dtype
    ys64 = oracle.grouped_linear_oracle(oracle.up(h), oracle.up(w), oracle.up(b), offsets, "none")
    slot64 = torch.empty_like(ys64)
    slot64[sort_idx] = ys64
    assert_close_rel(y_slot, slot64, dtype, "y_slot")
    assert_within_one_ulp(out, rounded_once(y_slot.cpu().view(t, k, N), wts), "grouped_linear_combine")
