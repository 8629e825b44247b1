"""The cuda backend on a GPU, beyond the shared parity suite (which conftest.py runs on the cuda
backend wherever available_backends("cuda") lists it): both grouped GEMM paths of the extension
(CUTLASS and SIMT, forced with CUMO_CUDA_GEMM) against the torch reference, with an expert that
gets no rows, and at 256 experts; the routing kernels against their host twins (both thread
mappings, up to E = 256, top_k = 16); permute at E = 256, k = 16; auto's fallback for float64; no
host sync (CUDA-graph capture of the layer).

Skipped with the reason on machines without a CUDA device or without the built extension.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from conftest import HAS_CUDA, NO_CUDA_REASON

import cumo_kernels
from cumo_kernels import cuda as cuda_backend
from cumo_kernels import reference
from cumo_kernels.testing import assert_close_rel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON),
    pytest.mark.skipif(cuda_backend._cuda is None, reason="cumo_kernels._cuda is not built"),
]


def _offsets(counts: list[int], device: str = "cuda") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int64, device=device)


def _cutlass_here(dtype: torch.dtype) -> bool:
    major, minor = torch.cuda.get_device_capability()
    return cuda_backend._cuda.cutlass_supports(major * 10 + minor, cuda_backend.DTYPE_CODES[dtype])


# 256 experts (DeepSeek-V3's count), a third of them without rows
E256 = [0 if i % 3 == 0 else (i * 7) % 5 + 1 for i in range(256)]


@pytest.mark.parametrize("path", ["cutlass", "simt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["none", "quick_gelu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "counts", [[37, 0, 200, 5], [0, 0, 0, 64], [300, 1, 1, 0], E256], ids=lambda c: str(c) if len(c) < 9 else "E256"
)
def test_grouped_linear_paths(monkeypatch, path, dtype, activation, bias, counts):
    if path == "cutlass" and not _cutlass_here(dtype):
        pytest.skip(f"no CUTLASS path for {dtype} on this device in this build ({cuda_backend._cuda.build_info()})")
    monkeypatch.setenv(cuda_backend.GEMM_PATH_ENV, path)
    g = torch.Generator().manual_seed(sum(counts))
    e, k, n = len(counts), 64, 128
    m = sum(counts)
    offsets = _offsets(counts)
    x = torch.randn(m, k, generator=g).cuda().to(dtype)
    w = (torch.randn(e, n, k, generator=g) / k**0.5).cuda().to(dtype)
    b = (0.5 * torch.randn(e, n, generator=g)).cuda().to(dtype) if bias else None
    y, pre = cuda_backend.grouped_linear(x, w, b, offsets, activation)
    ry, rpre = reference.grouped_linear(x.double(), w.double(), None if b is None else b.double(), offsets, activation)
    assert_close_rel(y, ry, dtype, f"y ({path})")
    if activation != "none":
        assert_close_rel(pre, rpre, dtype, f"pre ({path})")
    gy = torch.randn(m, n, generator=g).cuda().to(dtype)
    gx, gw, gb = cuda_backend.grouped_linear_backward(gy, x, w, offsets, pre, activation, bias)
    rgx, rgw, rgb = reference.grouped_linear_backward(
        gy.double(), x.double(), w.double(), offsets, rpre, activation, bias
    )
    assert_close_rel(gx, rgx, dtype, f"grad_x ({path})")
    assert_close_rel(gw, rgw, dtype, f"grad_w ({path})")
    for e_, c in enumerate(counts):
        if c == 0:
            assert torch.all(gw[e_] == 0), f"expert {e_} has no rows: its weight gradient must be zero"
    if bias:
        assert_close_rel(gb, rgb, dtype, f"grad_b ({path})")


def test_cutlass_forced_on_misaligned_operands_is_refused(monkeypatch):
    monkeypatch.setenv(cuda_backend.GEMM_PATH_ENV, "cutlass")
    x = torch.randn(10, 30, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 34, 30, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(cumo_kernels.dispatch.Unsupported, match="CUTLASS"):
        cuda_backend.grouped_linear(x, w, None, _offsets([4, 6]), "none")


def test_auto_falls_back_for_float64_and_explicit_cuda_raises(monkeypatch):
    monkeypatch.setattr(cumo_kernels.dispatch, "_AUTO_ORDER", ("cuda", "torch"))
    logits = torch.randn(16, 4, device="cuda", dtype=torch.float64)
    out = cumo_kernels.route(logits, 2, backend="auto")
    ref = reference.route(logits, 2)
    assert torch.equal(out[1], ref[1])
    with pytest.raises(RuntimeError, match="float64"):
        cumo_kernels.route(logits, 2, backend="cuda")


def test_layer_has_no_host_sync_cuda_graph():
    """The whole layer, forward and backward, captured in a CUDA graph after one warm-up call."""
    torch.manual_seed(0)
    d, h, e = 64, 128, 4
    x = torch.randn(2, 37, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [
        torch.randn(e, d, device="cuda", dtype=torch.bfloat16).mul_(d**-0.5).requires_grad_(),
        torch.randn(e, h, d, device="cuda", dtype=torch.bfloat16).mul_(d**-0.5).requires_grad_(),
        torch.zeros(e, h, device="cuda", dtype=torch.bfloat16, requires_grad=True),
        torch.randn(e, d, h, device="cuda", dtype=torch.bfloat16).mul_(h**-0.5).requires_grad_(),
        torch.zeros(e, d, device="cuda", dtype=torch.bfloat16, requires_grad=True),
    ]

    def step():
        y, bal, z = cumo_kernels.moe_mlp(x, *params, top_k=2, activation="quick_gelu", backend="cuda")
        (y.float().square().mean() + 0.1 * bal + 0.01 * z.float()).backward()
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = step().detach().clone()  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    for p in [x, *params]:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float(), eager.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_route_many_tokens_and_samples(dtype):
    """Per-sample statistics over many tokens (the fixed-order block sums), ids exact in float32."""
    g = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(5770, 4, generator=g)).cuda().to(dtype)
    w, ids, ps, fc, zs = cumo_kernels.route(logits, 2, 10, backend="cuda")
    rw, rids, rps, rfc, rzs = reference.route(logits, 2, 10)
    if dtype == torch.float32:
        assert torch.equal(ids, rids)
        assert torch.equal(fc, rfc)
    assert_close_rel(w, rw.double(), dtype, "weights")
    assert_close_rel(ps, rps.double(), torch.float32, "prob_sums")
    assert_close_rel(zs, rzs.double(), torch.float32, "z_sums")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("e,k", [(64, 8), (65, 8), (128, 1), (128, 8), (256, 16)], ids=str)
def test_route_matches_its_host_twin(dtype, e, k):
    """The routing kernels on the device against the same code run on the host (host_route /
    host_route_backward: the thread path at E = 64, the warp path above), 1000 tokens in 4 samples:
    ids and first counts exactly, weights exactly in low precision (but for the tokens whose
    probabilities sit on a rounding boundary: device and host expf differ in the last bit), the
    statistics and the logits' gradient to float32 rounding."""
    ext = cuda_backend._cuda
    t, b = 1000, 4
    g = torch.Generator().manual_seed(e + k)
    logits = (2 * torch.randn(t, e, generator=g)).to(dtype)
    code = cuda_backend.DTYPE_CODES[dtype]
    w, ids, ps, fc, zs = cumo_kernels.route(logits.cuda(), k, b, backend="cuda")
    host = ext.host_route(logits.float().flatten().tolist(), t, e, k, b, code)
    keep = ~oracle.hanging_tokens(logits, dtype)
    assert torch.equal(ids.cpu()[keep], torch.tensor(host.ids).view(t, k)[keep])
    if keep.all():
        assert torch.equal(fc.cpu(), torch.tensor(host.first_counts).view(b, e))
    hw = torch.tensor(host.weights).view(t, k)
    if dtype == torch.float32:
        torch.testing.assert_close(w.cpu(), hw, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(w.cpu().float()[keep], hw[keep])
    # float32 sums of 250 tokens in two orders (the device's fixed-order block sums, the host's
    # loop): each within 250 * 2^-24 = 1.5e-5 of the exact sum, relative; a probability that
    # rounds the other way on a hanging token moves a sum by ~2^-9 of it: rtol 1e-4 covers both.
    torch.testing.assert_close(ps.cpu(), torch.tensor(host.prob_sums).view(b, e), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(zs.cpu(), torch.tensor(host.z_sums), rtol=1e-4, atol=1e-6)
    gw, gp, gz = torch.randn(t, k, generator=g).to(dtype), torch.randn(b, e, generator=g), torch.randn(b, generator=g)
    got = cuda_backend.route_backward(gw.cuda(), gp.cuda(), gz.cuda(), logits.cuda(), ids).cpu().float()
    want = ext.host_route_backward(
        logits.float().flatten().tolist(), ids.cpu().flatten().tolist(), gw.float().flatten().tolist(),
        gp.flatten().tolist(), gz.tolist(), t, e, k, b, code,
    )  # fmt: skip
    want = torch.tensor(want).view(t, e)
    ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    scale = want.abs().amax(dim=1, keepdim=True)
    assert ((got - want).abs() <= ulp * want.abs() + 2**-16 * scale)[keep].all()


@pytest.mark.parametrize("t,k,e", [(1000, 2, 8), (577, 4, 4), (300, 1, 3), (300, 16, 256), (50, 8, 128)])
def test_permute_many_chunks_exact(t, k, e):
    """Several 256-slot chunks of the sort plan, an expert without slots: sort order and offsets
    equal the reference's exactly; unpermute and the backward ops against the reference."""
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(0, e, (t, k), generator=g)
    ids[ids == 1] = 0
    ids = ids.cuda()
    x = torch.randn(t, 40, generator=g).cuda()
    xs, si, off = cuda_backend.permute(x, ids, e)
    rxs, rsi, roff = reference.permute(x, ids, e)
    assert torch.equal(si, rsi) and torch.equal(off, roff) and torch.equal(xs, rxs)
    gs = torch.randn(t * k, 40, generator=g).cuda()
    torch.testing.assert_close(cuda_backend.permute_backward(gs, si, k), reference.permute_backward(gs, si, k))
    wts = torch.rand(t, k, generator=g).cuda()
    torch.testing.assert_close(cuda_backend.unpermute(gs, si, wts), reference.unpermute(gs, si, wts))
    go = torch.randn(t, 40, generator=g).cuda()
    for a, b in zip(cuda_backend.unpermute_backward(go, gs, si, wts), reference.unpermute_backward(go, gs, si, wts)):
        torch.testing.assert_close(a, b)
