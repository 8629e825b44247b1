"""The CUDA extension cumo_kernels._cuda on a machine without a GPU (CI) and with one.

Without a GPU: the module imports, links no libcuda, every device function refuses with "no CUDA
device is available", and the kernels' __host__ __device__ helpers (top-k tie rule, the per-token
routing math and its backward, the offsets / sort-order plan, the grouped GEMM's tile schedule and
problem compaction, rounding, activations) run on host arrays through the module's host_*
functions and match the torch reference. The parity suite of the cuda backend on a GPU comes from
conftest.py (`backend` is parametrised over available_backends("cuda")).

Where the extension is not built (CUMO_SKIP_CUDA_BUILD, no nvcc) these tests skip with the reason,
unless CUMO_REQUIRE_CUDA_EXT=1 (CI sets it) makes that a failure.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import oracle
import pytest
import torch
from conftest import HAS_CUDA, env_flag

import cumo_kernels
from cumo_kernels import _activations, dispatch, reference
from cumo_kernels import cuda as cuda_backend

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = tuple(CODES)


def _ext():
    if cuda_backend._cuda is None:
        if env_flag("CUMO_REQUIRE_CUDA_EXT"):
            pytest.fail(f"cumo_kernels._cuda is not built, CUMO_REQUIRE_CUDA_EXT is set: {cuda_backend._IMPORT_ERROR}")
        pytest.skip(f"cumo_kernels._cuda is not built here: {cuda_backend._IMPORT_ERROR}")
    return cuda_backend._cuda


# ------------------------------------------------------------------------------ the module itself


def test_extension_imports_and_describes_its_build():
    ext = _ext()
    info = ext.build_info()
    assert "archs=" in info and "cuda_runtime=" in info
    # The codes come from the extension's enums (bindings.cpp exports them; cuda.py reads them), and
    # the activations' are the package's one numbering (cumo_kernels/_activations.py, Triton's too).
    assert set(ext.DTYPE_CODES) == {"float32", "float16", "bfloat16"} and len(set(ext.DTYPE_CODES.values())) == 3
    assert cuda_backend.DTYPE_CODES == {getattr(torch, n): c for n, c in ext.DTYPE_CODES.items()}
    assert set(ext.ACTIVATION_CODES) == {"none", "quick_gelu", "gelu", "gelu_tanh", "silu", "relu"}
    assert dict(ext.ACTIVATION_CODES) == {a: _activations.ACTIVATION_CODES[a] for a in ext.ACTIVATION_CODES}
    assert cuda_backend.ACTIVATION_CODES == dict(ext.ACTIVATION_CODES)
    assert ext.MAX_EXPERTS == cuda_backend.MAX_EXPERTS


def test_extension_links_no_libcuda():
    ext = _ext()
    if shutil.which("ldd") is None:
        pytest.skip("ldd not available")
    out = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcuda.so" not in out, f"the extension links libcuda:\n{out}"
    assert "libcudart.so" not in out, f"the extension links the shared CUDA runtime:\n{out}"
    assert "libtorch" not in out and "libc10" not in out, f"the extension links torch:\n{out}"


# Arguments that pass every size check, so that the call reaches the device check.
DEVICE_CALLS = {
    "device_count": (),
    "device_capability": (0,),
    "route_forward": (0, 4, 4, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "route_backward": (0, 0, 0, 0, 0, 4, 4, 2, 1, 0, 0, 0, 0),
    "permute_forward": (0, 0, 4, 2, 8, 4, 0, 0, 0, 0, 0, 0, 0),
    "permute_backward": (0, 0, 4, 2, 8, 0, 0, 0, 0, 0),
    "unpermute_forward": (0, 0, 0, 4, 2, 8, 0, 0, 0, 0, 0),
    "unpermute_backward": (0, 0, 0, 0, 4, 2, 8, 0, 0, 0, 0, 0, 0),
    "grouped_linear_forward": (0, 0, 0, 0, 8, 8, 8, 4, 0, 1, 0, 0, 0, 4096, False, 0, 0),
    "grouped_linear_backward": (0, 0, 0, 0, 0, 8, 8, 8, 4, 0, 1, 0, 0, 0, 0, 0, 4096, False, 0, 0),
}


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present: the refusal is for machines without one")
@pytest.mark.parametrize("name", sorted(DEVICE_CALLS))
def test_every_device_function_refuses_without_a_device(name):
    ext = _ext()
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        getattr(ext, name)(*DEVICE_CALLS[name])


def test_device_calls_cover_the_module():
    ext = _ext()
    public = {n for n in dir(ext) if not n.startswith("_") and callable(getattr(ext, n))}
    host = {n for n in public if n.startswith("host_") or n.endswith("_bytes")}
    other = {"build_info", "cutlass_supports", "HostRoute"}
    assert public - host - other == set(DEVICE_CALLS), "a device function without a refusal test"


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_backend_refuses_with_reason_on_cpu_machine():
    assert cuda_backend.refusal("cpu") is not None
    why = cuda_backend.refusal("cuda")
    assert why is not None and ("no CUDA device is available" in why or "not built" in why)
    assert "cuda" not in cumo_kernels.available_backends("cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        cumo_kernels.route(torch.randn(3, 4), 2, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")
def test_backend_is_available_on_a_gpu():
    _ext()
    assert cuda_backend.refusal("cuda") is None
    assert "cuda" in cumo_kernels.available_backends("cuda"), "the parity suite would not run the cuda backend"


def test_arch_rule_matches_sass_compatibility():
    """setup.py embeds SASS only: same major at an equal or higher minor; "90a" on 9.0 alone."""
    runs = cuda_backend.arch_runs_on
    assert runs("80", 80) and runs("80", 86) and runs("80", 89)
    assert not runs("80", 90) and not runs("80", 75) and not runs("86", 80) and not runs("80", 100)
    assert runs("90a", 90) and not runs("90a", 100) and not runs("90a", 89)
    assert runs("90", 90) and not runs("90", 100) and not runs("90", 120)
    assert runs("100f", 103) and not runs("100f", 120)


def test_built_archs_come_from_the_build():
    ext = _ext()
    token = next(w for w in ext.build_info().split() if w.startswith("archs="))
    assert cuda_backend.built_archs() == token[len("archs=") :].split(",")
    assert cuda_backend.built_archs(), "build_info names no arch"


def test_device_outside_the_built_archs_is_refused(monkeypatch):
    """A GPU no built arch runs on (a T4, a Blackwell with the default archs) is refused with the
    reason (Unsupported: auto falls back), not left to fail with "no kernel image is available"."""
    _ext()
    monkeypatch.setattr(cuda_backend, "built_archs", lambda: ["80", "90a"])
    for cap, ok in (((7, 5), False), ((10, 0), False), ((8, 9), True), ((9, 0), True), ((8, 0), True)):
        monkeypatch.setattr(cuda_backend, "_ARCH_REFUSALS", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, cap=cap: cap)
        why = cuda_backend._arch_refusal(0)
        assert (why is None) == ok, (cap, why)
        if not ok:
            assert f"{cap[0]}.{cap[1]}" in why and "CUMO_CUDA_ARCHS" in why and "80,90a" in why
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
            monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
            assert cuda_backend.refusal("cuda") == why


# -------------------------------------------------------------------- host-device helpers vs reference


def test_topk_tie_rule():
    ext = _ext()
    nan = float("nan")
    assert ext.host_topk([0.1, 0.3, 0.3, 0.2], 3) == [1, 2, 3]
    assert ext.host_topk([0.25, 0.25, 0.25, 0.25], 4) == [0, 1, 2, 3]
    assert ext.host_topk([0.0, -0.0, 0.5], 3) == [2, 0, 1]
    assert ext.host_topk([0.1, nan, 0.9, nan], 3) == [1, 3, 2]  # NaN first, as torch.sort
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        e = int(torch.randint(1, 12, (1,), generator=g))
        k = int(torch.randint(1, e + 1, (1,), generator=g))
        s = torch.randint(0, 4, (e,), generator=g).float() / 4  # many exact ties
        want = torch.sort(s, descending=True, stable=True).indices[:k].tolist()
        assert ext.host_topk(s.tolist(), k) == want
    # Past 64 experts (the old 64-bit mask of taken experts): experts 0 and 64, 1 and 65 both chosen
    s = [0.0] * 130
    s[0], s[64], s[1], s[65], s[129] = 0.9, 0.8, 0.7, 0.7, 0.7
    assert ext.host_topk(s, 5) == [0, 64, 1, 65, 129]
    for _ in range(100):
        e = int(torch.randint(65, 257, (1,), generator=g))
        k = int(torch.randint(1, 17, (1,), generator=g))
        s = torch.randint(0, 6, (e,), generator=g).float() / 8
        s[torch.randint(0, e, (3,), generator=g)] = -0.0
        want = torch.sort(s, descending=True, stable=True).indices[:k].tolist()
        assert ext.host_topk(s.tolist(), k) == want


def test_rank_key_orders_as_ranks_before():
    """Top-k's one compare per score: rank_key(a, ia) > rank_key(b, ib) exactly when ranks_before(a,
    ia, b, ib) (NaN first, then larger first, equal scores, -0 == +0 included: lower index first),
    and key_score gives the score back (-0 as +0, NaN as a NaN)."""
    ext = _ext()
    inf, nan = float("inf"), float("nan")
    f32 = [3.4028234663852886e38, 1.1754943508222875e-38, 1e-45, 0.25000002980232239]  # max, min normal, denormal
    values = torch.tensor([nan, inf, -inf, 0.0, -0.0, 1.0, -1.0, 0.25] + f32 + [-v for v in f32]).tolist()
    pairs = [(v, i) for v in values for i in (0, 1, 63, 64, 65, 255)]
    keys = []
    for v, i in pairs:
        key, back = ext.host_rank_key(v, i)
        assert 0 < key < 2**64 - 1
        assert back != back if v != v else (back == v and math.copysign(1.0, back) == 1.0 if v == 0 else back == v)
        keys.append(key)
    for (a, ia), ka in zip(pairs, keys):
        for (b, ib), kb in zip(pairs, keys):
            assert (ka > kb) == ext.host_ranks_before(a, ia, b, ib), (a, ia, b, ib)


def _route_logits(t: int, e: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # five values: most scores tie, the tie rule decides the choice
        return (torch.randint(-2, 3, (t, e), generator=g).float() / 2).to(dtype)
    return (2 * torch.randn(t, e, generator=g)).to(dtype)


def _check_host_route(ext, t: int, b: int, e: int, k: int, dtype: torch.dtype, kind: str, path: int = -1) -> None:
    """host_route / host_route_backward (the kernels' code on host arrays, on the path the device
    takes for E unless `path` says) against the torch reference and the float64 oracle: ids and
    first counts exactly, weights (bit for bit at CuMo's rounding points in low precision),
    prob sums, z sums, and the gradient of the logits."""
    g = torch.Generator().manual_seed(t * 31 + e + 7 * k)
    logits = _route_logits(t, e, dtype, kind, t * 31 + e)
    w, ids, ps, fc, zs = reference.route(logits, k, b)
    out = ext.host_route(logits.float().flatten().tolist(), t, e, k, b, CODES[dtype], path)
    assert torch.equal(torch.tensor(out.ids).view(t, k), ids)
    assert torch.equal(torch.tensor(out.first_counts).view(b, e), fc)
    hw = torch.tensor(out.weights).view(t, k)
    assert torch.equal(hw.to(dtype).float(), hw), "weights are not rounded to the activation dtype"
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(hw, w.float(), rtol=tol, atol=tol)
    low = dtype != torch.float32
    hang = oracle.hanging_tokens(logits, dtype)
    l64 = oracle.up(logits, True)
    rw, _, rps, _, rzs = oracle.route_oracle(logits, k, b, logits64=l64, expert_ids=ids)
    if low:  # CuMo's weights: the sum and the quotient rounded to the dtype, bit for bit
        oracle.assert_weights_exact(hw, rw, hang, "host weights")
    torch.testing.assert_close(torch.tensor(out.prob_sums).view(b, e), ps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(out.z_sums), zs, rtol=1e-5, atol=1e-5)

    gw = torch.randn(t, k, generator=g).to(dtype)
    gp = torch.randn(b, e, generator=g)
    gz = torch.randn(b, generator=g)
    want = reference.route_backward(gw, gp, gz, logits, ids)
    got = ext.host_route_backward(
        logits.float().flatten().tolist(), ids.flatten().tolist(), gw.float().flatten().tolist(),
        gp.flatten().tolist(), gz.tolist(), t, e, k, b, CODES[dtype], path,
    )  # fmt: skip
    got = torch.tensor(got).view(t, e)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol * max(1.0, want.float().abs().max().item()))
    if low:  # at CuMo's rounding points (the rounded probabilities and their rounded sum)
        ref = (rw * gw.double()).sum() + (rps * gp.double()).sum() + (rzs * gz.double()).sum()
        (rl,) = torch.autograd.grad(ref, l64)
        oracle.assert_within_ulp(got, rl, dtype, "host grad logits", skip=hang)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(7, 1, 4, 2), (15, 3, 4, 2), (33, 1, 8, 3), (12, 2, 8, 8), (5, 1, 1, 1)])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_route_token_math_matches_reference(dtype, case, kind):
    _check_host_route(_ext(), *case, dtype, kind)


# (T, B, E, k): past the thread path's 64 experts, the warp path (a warp per token, E/32 scores per
# lane): Qwen3-30B-A3B's 128 experts, DeepSeek-V3's 256, E = 65 (lanes of 3 and 2 experts; the old
# 64-bit mask of taken experts aliased expert 64 with expert 0), top_k 1, 8, 16.
MANY_EXPERTS = [(6, 2, 65, 8), (5, 1, 65, 16), (4, 2, 128, 1), (6, 3, 128, 8), (4, 1, 256, 16), (4, 2, 256, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MANY_EXPERTS, ids=lambda c: "T{}-B{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_route_many_experts_matches_oracle(dtype, case, kind):
    _check_host_route(_ext(), *case, dtype, kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(9, 3, 4, 2), (5, 1, 31, 8), (6, 2, 33, 16), (4, 2, 64, 8)], ids=str)
def test_warp_path_at_few_experts(dtype, case):
    """The warp path where the device runs the thread path (E <= 64; E < 32: lanes without an
    expert): the same checks, and the same choice as the thread path."""
    ext = _ext()
    t, b, e, k = case
    for kind in ("random", "ties"):
        _check_host_route(ext, t, b, e, k, dtype, kind, path=1)
        logits = _route_logits(t, e, dtype, kind, 5).float().flatten().tolist()
        thread = ext.host_route(logits, t, e, k, b, CODES[dtype], 0)
        warp = ext.host_route(logits, t, e, k, b, CODES[dtype], 1)
        assert thread.ids == warp.ids and thread.first_counts == warp.first_counts


def test_routing_takes_256_experts(monkeypatch):
    """One limit, the extension's: cuda.py's MAX_EXPERTS is _cuda.MAX_EXPERTS (256), and the
    backend no longer refuses the routing of E = 256 (Qwen3-30B-A3B's 128, DeepSeek-V3's 256), a
    whole layer of 256 either; E = 257 is refused with the reason (auto then takes another)."""
    ext = _ext()
    assert cuda_backend.MAX_EXPERTS == ext.MAX_EXPERTS == 256
    monkeypatch.setattr(cuda_backend, "refusal", lambda device_type: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    dev = torch.device("cuda")
    for op in ("route", None):
        assert cuda_backend.not_supported_reasons(dispatch.Call(dev, torch.bfloat16, 256, op=op)) == []
        why = cuda_backend.not_supported_reasons(dispatch.Call(dev, torch.bfloat16, 257, op=op))
        assert why == ["route takes at most 256 experts (the routing kernels hold one token's E scores in a warp's "
                       "registers), got E=257"]  # fmt: skip
    with pytest.raises(ValueError, match="bad sizes"):
        ext.host_route([0.0] * 257, 1, 257, 2, 1, 0)
    with pytest.raises(ValueError, match="thread path"):
        ext.host_route([0.0] * 65, 1, 65, 2, 1, 0, 0)


@pytest.mark.parametrize("chunk", [1, 3, 256])
@pytest.mark.parametrize("case", [(1, 1, 4), (7, 2, 4), (577, 2, 4), (100, 3, 8), (50, 2, 1)])
def test_permute_plan_matches_reference(case, chunk):
    ext = _ext()
    t, k, e = case
    g = torch.Generator().manual_seed(t + e)
    ids = torch.randint(0, e, (t, k), generator=g)
    if e > 1:
        ids[ids == 1] = 0  # an expert with no rows
    sort_idx, offsets = ext.host_permute_plan(ids.flatten().tolist(), e, chunk)
    _, ref_idx, ref_off = reference.permute(torch.zeros(t, 1), ids, e)
    assert sort_idx == ref_idx.tolist()
    assert offsets == ref_off.tolist()


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_permute_plan_drops_ids_outside_the_experts(chunk):
    """Ids >= E are dropped slots (expert parallelism's sentinel): after every expert's rows, in
    slot order, not counted in offsets[E]; as the torch backend's plan. A negative id (refused by
    the public op where it validates) is dropped too: no index out of bounds. The plan used to
    clamp such ids into expert 0 or E-1, computing them with that expert's weights."""
    ext = _ext()
    sort_idx, offsets = ext.host_permute_plan([5, -1, 1, 0, 2, 1], 2, chunk)
    assert sort_idx == [3, 2, 5, 0, 1, 4] and offsets == [0, 1, 3]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (300, 2), generator=g)  # E = 6: ids 6, 7, 8 dropped
    sort_idx, offsets = ext.host_permute_plan(ids.flatten().tolist(), 6, chunk)
    _, ref_idx, ref_off = reference.permute(torch.zeros(300, 1), ids, 6)
    assert sort_idx == ref_idx.tolist() and offsets == ref_off.tolist()


def test_tile_schedule_and_problem_compaction():
    ext = _ext()
    offsets = [0, 0, 130, 130, 131, 200, 200]  # experts 0, 2, 5 have no rows
    tiles = ext.host_tile_schedule(offsets, 64)
    assert tiles == [0, 0, 3, 3, 4, 6, 6, 6]  # E + 2 entries: the last group, dropped rows, is empty
    owners = [ext.host_find_tile_expert(tiles, i) for i in range(8)]
    assert owners == [1, 1, 1, 3, 4, 4, -1, -1]
    assert ext.host_compact_problems(offsets) == [[1, 130, 0], [3, 1, 130], [4, 69, 131]]
    assert ext.host_compact_problems([0, 0, 0]) == []
    assert ext.host_tile_schedule([0, 0, 0], 64) == [0, 0, 0, 0]
    # Rows past offsets[E] (dropped slots): group E, whose tiles the kernel fills with zeros.
    tiles = ext.host_tile_schedule(offsets, 64, M=330)
    assert tiles == [0, 0, 3, 3, 4, 6, 6, 9]
    assert [ext.host_find_tile_expert(tiles, i) for i in range(5, 10)] == [4, 6, 6, 6, -1]
    assert ext.host_compact_problems(offsets, M=330) == [[1, 130, 0], [3, 1, 130], [4, 69, 131]]
    # The grid's upper bound covers every schedule.
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        counts = torch.randint(0, 200, (6,), generator=g)
        off = [0] + torch.cumsum(counts, 0).tolist()
        m = off[-1] + int(torch.randint(0, 150, (1,), generator=g))
        tl = ext.host_tile_schedule(off, 64, M=m)
        assert tl[-1] <= (m + 63) // 64 + 6 + 1
        for tile in range(tl[-1]):
            e = ext.host_find_tile_expert(tl, tile)
            lo, hi = (off[e], off[e + 1]) if e < 6 else (off[6], m)
            assert hi > lo and tl[e] <= tile < tl[e + 1]


@pytest.mark.parametrize("offsets", [[3, 1, 4, 9, 2], [-5, 2, 100, 3, 7], [0, 7, 7, 7, 7], [9, 9, 9, 9, 9]], ids=str)
def test_garbage_offsets_never_address_rows_outside_m(offsets):
    """Offsets not from permute (not from 0, decreasing, past M, negative): the schedule and the
    CUTLASS problem list address only rows in [0, M) (group_rows clamps what it reads); the
    values are wrong, the memory accesses in bounds."""
    ext = _ext()
    m, k_in, n_out = 7, 8, 16
    tiles = ext.host_tile_schedule(offsets, 2, M=m)
    assert tiles[-1] <= (m + 1) // 2 + len(offsets)
    for _, rows, start in ext.host_compact_problems(offsets, M=m):
        assert 0 <= start and rows > 0 and start + rows <= m
    for kind in (0, 1, 2):
        for p in ext.host_problem_list(kind, offsets, k_in, n_out, M=m):
            mm, nn, kk, ao, bo, do, *_, dummy = p
            if dummy:
                continue
            rows = mm if kind in (0, 1) else kk
            first = (ao // k_in if kind == 0 else ao // n_out) if kind != 2 else bo // k_in
            assert 0 <= first and first + rows <= m, (kind, p)


def _run_problem_list(ext, kind, offsets, a, b, k_in, n_out, e_count, out_shape):
    """Runs the CUTLASS paths' problem list as CUTLASS would read it (layouts per kind, offsets,
    leading dimensions; dummies on a zero row into scratch), in float64 on the CPU."""
    plist = ext.host_problem_list(kind, offsets, k_in, n_out)
    assert len(plist) == e_count
    width = max(k_in, n_out)
    zero = torch.zeros(width, dtype=torch.float64)
    scratch = torch.full((e_count * width,), float("nan"), dtype=torch.float64)
    d = torch.full(out_shape, float("nan"), dtype=torch.float64).flatten()
    a_row, b_col = kind in (0, 1), kind == 0  # kGradW: A column-major; kForward: B column-major
    for m, n, k, ao, bo, do, lda, ldb, ldd, dummy in plist:
        assert m > 0 and n > 0 and k > 0, "a zero-size problem would reach CUTLASS"
        src_a = zero if dummy else a.flatten()
        src_b = zero if (dummy and kind == 2) else b.flatten()
        dst = scratch if dummy else d
        am = torch.as_strided(src_a, (m, k), (lda, 1) if a_row else (1, lda), ao)
        bm = torch.as_strided(src_b, (k, n), (1, ldb) if b_col else (ldb, 1), bo)
        torch.as_strided(dst, (m, n), (ldd, 1), do).copy_(am @ bm)
    return d.view(out_shape)


@pytest.mark.parametrize("counts", [[5, 0, 9, 3], [0, 0, 7, 0], [4, 4, 4, 4], [0, 0, 0, 1]], ids=str)
def test_cutlass_problem_list_computes_the_grouped_gemm(counts):
    """The device-built problem list of the CUTLASS paths (cumo_hd.h's build_problem_list, run by
    their setup kernels), executed here with CUTLASS's layouts: forward, grad_x and grad_w match the
    torch reference, and empty experts reach no GEMM (their dW is zeroed by a separate kernel)."""
    ext = _ext()
    g = torch.Generator().manual_seed(sum(counts))
    e, k_in, n_out = len(counts), 8, 16
    m = sum(counts)
    offsets = [0] + torch.tensor(counts).cumsum(0).tolist()
    off_t = torch.tensor(offsets)
    x = torch.randn(m, k_in, generator=g, dtype=torch.float64)
    w = torch.randn(e, n_out, k_in, generator=g, dtype=torch.float64)
    gy = torch.randn(m, n_out, generator=g, dtype=torch.float64)
    y = _run_problem_list(ext, 0, offsets, x, w, k_in, n_out, e, (m, n_out))
    ry, _ = reference.grouped_linear(x, w, None, off_t, "none")
    torch.testing.assert_close(y, ry)
    gx = _run_problem_list(ext, 1, offsets, gy, w, k_in, n_out, e, (m, k_in))
    gw = _run_problem_list(ext, 2, offsets, gy, x, k_in, n_out, e, (e, n_out, k_in))
    rgx, rgw, _ = reference.grouped_linear_backward(gy, x, w, off_t, x.new_empty(0), "none", False)
    torch.testing.assert_close(gx, rgx)
    for e_, c in enumerate(counts):
        if c == 0:
            assert torch.isnan(gw[e_]).all(), "an empty expert's dW was written by a GEMM"
            gw[e_] = 0.0  # what zero_empty_experts_kernel does
    torch.testing.assert_close(gw, rgw)


def test_alignment_check():
    ext = _ext()
    assert ext.host_aligned16(4096, 64, 2)
    assert not ext.host_aligned16(4096, 30, 4)  # fp32 rows of 30: 120 bytes
    assert not ext.host_aligned16(4098, 64, 2)
    assert ext.host_aligned16(4096, 4, 4)


# (E, width, shape bytes, stride bytes a/b/d, element bytes): sm90's Shape3 and cute strides
# (sizes vary with the layout), sm80's GemmCoord and int64 leading dims, bf16/fp16 elements.
LIST_CASES = [
    (1, 7, 12, (8, 8, 8), 2),
    (4, 4096, 12, (16, 8, 16), 2),
    (8, 1024, 12, (24, 24, 24), 2),
    (64, 2048, 16, (8, 8, 8), 2),
    (37, 33, 12, (16, 16, 16), 4),
]


@pytest.mark.parametrize("case", LIST_CASES, ids=str)
def test_problem_list_layout_fits_its_workspace(case):
    """The CUTLASS paths carve their problem list from the workspace the host sized, with one rule
    (list_layout). From any base address: every piece 256-byte aligned, in order, none overlapping
    the next, and the whole list plus CUTLASS's own bytes inside the sized workspace. The sm90
    sizing once counted the three pointer arrays as one 256-byte piece, the carving as three: the
    first GPU run's "workspace too small"."""
    ext = _ext()
    e, width, shape, (sa, sb, sd), elem = case
    sizes = [shape * e, 8 * e, 8 * e, 8 * e, sa * e, sb * e, sd * e, elem * width, elem * width * e]
    sizes.append(ext.host_problem_bytes() * e)
    for after in (0, 1, 4096):
        need = ext.host_list_workspace_bytes(e, width, shape, sa, sb, sd, elem, after)
        for base in [0, 1, 8, 200, 255, 256, 257, 4096 + 17, (1 << 40) + 511]:
            offs = ext.host_list_layout(base, e, width, shape, sa, sb, sd, elem)
            assert len(offs) == len(sizes) + 1
            assert offs[0] >= base
            for i, size in enumerate(sizes):
                assert offs[i] % 256 == 0, (i, offs)
                assert offs[i + 1] - offs[i] >= size, f"piece {i} ({size} B) overlaps the next: {offs}"
            end = offs[-1]
            assert end % 256 == 0
            # the list, then CUTLASS's own `after` bytes from `end`, inside [base, base + need)
            assert end + after <= base + need, (base, end, after, need)
    # the three pointer arrays are three pieces
    offs = ext.host_list_layout(0, 4, 16, 12, 8, 8, 8, 2)
    assert offs[2] - offs[1] == 256 and offs[3] - offs[2] == 256


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_matches_torch(dtype):
    ext = _ext()
    v = torch.cat([torch.randn(500) * 10, torch.tensor([65504.0, 70000.0, 1e-8, -3e-5, 0.1, 1 / 3])])
    got = torch.tensor([ext.host_round_to(x, CODES[dtype]) for x in v.tolist()])
    assert torch.equal(got, v.to(dtype).float())


@pytest.mark.parametrize("act", sorted(set(_activations.ACTIVATIONS) - cuda_backend.COMPOSED_ACTIVATIONS))
def test_activations_match_reference(act):
    ext = _ext()
    code = cuda_backend.ACTIVATION_CODES[act]
    v = torch.linspace(-6, 6, 301)
    got = torch.tensor(ext.host_activation(v.tolist(), code, False))
    torch.testing.assert_close(got, _activations.apply(v, act), rtol=2e-6, atol=2e-6)
    got_d = torch.tensor(ext.host_activation(v.tolist(), code, True))
    torch.testing.assert_close(got_d, _activations.derivative(v, act), rtol=2e-6, atol=2e-6)


# ------------------------------------------------ the backward's activation + bias-gradient pass


def _lane_order_sum(g: torch.Tensor, offsets: list[int], lanes: int) -> torch.Tensor:
    """[E, N] float32 sums of g's rows per expert in the device's order: lane l adds rows lo+l,
    lo+l+lanes, ... one by one in float32, then the lanes are added in lane order."""
    out = torch.zeros(len(offsets) - 1, g.shape[1], dtype=torch.float32)
    for e in range(len(offsets) - 1):
        total = torch.zeros(g.shape[1], dtype=torch.float32)
        for lane in range(lanes):
            acc = torch.zeros(g.shape[1], dtype=torch.float32)
            for r in range(offsets[e] + lane, offsets[e + 1], lanes):
                acc = acc + g[r]
            total = total + acc
        out[e] = total
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["none", "gelu", "quick_gelu"])
@pytest.mark.parametrize(
    "counts",
    [[70, 0, 33, 5], [0, 0, 108, 0], [1, 0, 0, 0], [31, 32, 33, 64]],
    ids=["ragged-empty", "all-to-one", "one-row", "lane-edges"],
)
def test_host_act_bias_grad_matches_reference(dtype, act, counts):
    """act_bias_grad_kernel's per-lane code on the host: grad_pre = round(grad_y * act'(pre)) and
    grad_b = per-expert column sums of it, against float64, and the lane order exactly; N = 37 is
    not a multiple of the kernel's 32-column tile."""
    ext = _ext()
    gen = torch.Generator().manual_seed(7)
    n, rows = 37, sum(counts)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    gy = torch.randn(rows, n, generator=gen).to(dtype)
    pre = (3 * torch.randn(rows, n, generator=gen)).to(dtype)
    code = cuda_backend.ACTIVATION_CODES[act]
    got_pre, got_b = ext.host_act_bias_grad(
        gy.float().flatten().tolist(), pre.float().flatten().tolist(), offsets, n, code, CODES[dtype]
    )
    got_b = torch.tensor(got_b).view(len(counts), n)
    if act == "none":
        assert got_pre == []
        g = gy.float()
    else:
        got_pre = torch.tensor(got_pre).view(rows, n)
        want_pre = (gy.double() * _activations.derivative(pre.double(), act)).to(dtype).float()
        # one rounding of the dtype apart at most (float32 vs float64 product before rounding)
        torch.testing.assert_close(got_pre, want_pre, **_dtype_ulp(dtype))
        g = got_pre
    # the order of the additions, exactly (then rounded to the dtype as the kernel stores it)
    assert torch.equal(got_b, _lane_order_sum(g, offsets, ext.BIAS_LANES).to(dtype).float())
    # against float64: float32 accumulation error (at most rows * 2^-24 * sum|g| per column) plus
    # the final rounding to the dtype (half an ulp, relative)
    for e in range(len(counts)):
        ge = g[offsets[e] : offsets[e + 1]].double()
        want, bound = ge.sum(0), counts[e] * 2**-24 * ge.abs().sum(0)
        err = (got_b[e].double() - want).abs()
        assert (err <= bound + _dtype_ulp(dtype)["rtol"] * want.abs()).all(), (e, err.max())
    assert (got_b[torch.tensor(counts) == 0] == 0).all()


def _dtype_ulp(dtype: torch.dtype) -> dict:
    """One unit in the last place of the dtype (relative), plus a float32 accumulation's worth."""
    return {"rtol": {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype], "atol": 1e-5}


def test_host_act_bias_grad_refuses_bad_arguments():
    ext = _ext()
    with pytest.raises(ValueError, match="offsets"):
        ext.host_act_bias_grad([0.0] * 4, [0.0] * 4, [1, 3], 2, 0, 0)
    with pytest.raises(ValueError, match=r"\[offsets\[-1\], N\]"):
        ext.host_act_bias_grad([0.0] * 3, [0.0] * 4, [0, 2], 2, 1, 0)


# -------------------------------------------------------------- refusals (choice: tests/test_contract.py)


def test_unsupported_is_a_runtime_error_with_the_reason():
    assert issubclass(dispatch.Unsupported, RuntimeError)
    assert set(cuda_backend.DTYPE_CODES) == set(DTYPES)


@pytest.mark.parametrize("counts", [[5, 0, 9, 3], [0, 0, 7, 0], [1, 3, 0, 11, 0, 2]], ids=str)
def test_problem_list_strides_uniform_and_offsets_aligned(counts):
    """The sm90 path hands CUTLASS one stride triple per kind for every group (dummies included),
    not the list's per-problem leading dimensions: they must all be equal. And with K and N
    multiples of 8 (what cuda.py's 16-byte check of the rows admits for 16-bit dtypes) every
    per-expert sub-pointer offset keeps 16-byte alignment, whatever the row counts."""
    ext = _ext()
    k_in, n_out = 24, 40
    offsets = [0] + torch.tensor(counts).cumsum(0).tolist()
    expected = {0: (k_in, k_in, n_out), 1: (n_out, k_in, k_in), 2: (n_out, k_in, k_in)}
    for kind, lds in expected.items():
        for *_, ao, bo, do, lda, ldb, ldd, dummy in ext.host_problem_list(kind, offsets, k_in, n_out):
            assert (lda, ldb, ldd) == lds, (kind, dummy)
            for off in (ao, bo, do):
                assert off * 2 % 16 == 0, (kind, off)
