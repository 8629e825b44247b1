"""The torch backend's three grouped-GEMM strategies agree with a float64 per-expert product.

On CUDA the backend picks `grouped_mm` or `masked` (no host sync); CI has no GPU, so these
tests force each strategy on CPU tensors through CUMO_KERNELS_TORCH_GEMM.
"""

from __future__ import annotations

import importlib

import pytest
import torch

gl = importlib.import_module("cumo_kernels.reference.grouped_linear")  # the module: the package's name is the op

# (offsets of a grouped layout) including an expert with no rows and all rows in one expert.
LAYOUTS = {
    "ragged": [0, 5, 5, 12, 16],
    "all_in_one": [0, 0, 16, 16, 16],
    "one_row": [0, 0, 0, 1, 1],
}


def _float64_grouped(x, w, b, offsets, activation):
    out = []
    for e in range(w.shape[0]):
        s, t = offsets[e], offsets[e + 1]
        pre = x[s:t].double() @ w[e].double().t() + b[e].double()
        out.append(pre)
    pre = torch.cat(out)
    if activation == "gelu":
        return 0.5 * pre * (1 + torch.erf(pre / 2**0.5))
    if activation == "quick_gelu":
        return pre * torch.sigmoid(1.702 * pre)
    return pre


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks_of_5"])
@pytest.mark.parametrize("strategy", gl.STRATEGIES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", ["none", "gelu", "quick_gelu"])
def test_strategy_matches_float64(monkeypatch, strategy, layout, activation, chunked):
    """chunks_of_5: the activation and its derivative (and the CPU strategy's GEMM blocks) run on
    chunks of 5 rows, so that chunk boundaries fall inside experts and the last chunk is short."""
    monkeypatch.setenv("CUMO_KERNELS_TORCH_GEMM", strategy)
    torch.manual_seed(0)
    offsets = LAYOUTS[layout]
    m = offsets[-1]
    e, k, n = 4, 8, 12  # 16-byte aligned fp32 rows, which grouped_mm requires
    if chunked:
        monkeypatch.setattr(gl, "_CHUNK_ELEMS", 5 * n)
        monkeypatch.setattr(gl, "_BLOCK_BYTES", 5 * n * 4)
        assert gl._row_block(n, torch.float32) == 5
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(e, n, k, requires_grad=True)
    b = torch.randn(e, n, requires_grad=True)
    off = torch.tensor(offsets)
    y = torch.ops.cumo.grouped_linear(x, w, b, off, activation, "torch")[0]
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = _float64_grouped(x64, w64, b64, offsets, activation)
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64), g.double())
    for name, out, r in (("y", y, ref), ("grad_x", gx, rx), ("grad_w", gw, rw), ("grad_b", gb, rb)):
        err = (out.double() - r).norm() / r.norm().clamp_min(1e-30)
        assert err <= 1e-5, f"{strategy}/{layout}/{activation}: {name} relative error {err:.3e} > 1e-5"
    # Experts without rows get exactly zero weight and bias gradients.
    for ex in range(e):
        if offsets[ex] == offsets[ex + 1]:
            assert torch.equal(gw[ex], torch.zeros_like(gw[ex])), f"grad_w[{ex}] of an empty expert is not zero"
            assert torch.equal(gb[ex], torch.zeros_like(gb[ex])), f"grad_b[{ex}] of an empty expert is not zero"


def test_strategy_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("CUMO_KERNELS_TORCH_GEMM", raising=False)
    x, w = torch.randn(4, 8), torch.randn(2, 3, 8)
    assert gl.gemm_strategy(x, w) == "per_expert"
    monkeypatch.setenv("CUMO_KERNELS_TORCH_GEMM", "nonsense")
    with pytest.raises(ValueError, match="CUMO_KERNELS_TORCH_GEMM"):
        gl.gemm_strategy(x, w)


@pytest.mark.parametrize("strategy", gl.STRATEGIES)
def test_nan_row_stays_in_its_expert(monkeypatch, strategy):
    """A NaN in one row reaches neither other rows nor other experts' gradients."""
    monkeypatch.setenv("CUMO_KERNELS_TORCH_GEMM", strategy)
    torch.manual_seed(0)
    offsets = LAYOUTS["ragged"]  # row 6 belongs to expert 2
    x = torch.randn(16, 8)
    x[6, 3] = float("nan")
    x.requires_grad_()
    w = torch.randn(4, 12, 8, requires_grad=True)
    b = torch.randn(4, 12, requires_grad=True)
    y = torch.ops.cumo.grouped_linear(x, w, b, torch.tensor(offsets), "gelu", "torch")[0]
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    others = [r for r in range(16) if r != 6]
    assert torch.isfinite(y[others]).all(), "NaN leaked into other rows of y"
    assert torch.isfinite(gx[others]).all(), "NaN leaked into other rows of grad_x"
    for e in (0, 1, 3):
        assert torch.isfinite(gw[e]).all() and torch.isfinite(gb[e]).all(), f"NaN leaked into expert {e}'s gradients"


@pytest.mark.parametrize("strategy", ["grouped_mm", "masked"])
def test_activation_gradient_has_no_whole_float32_temporaries(monkeypatch, strategy):
    """The CUDA strategies' backward through quick_gelu, [M, N] float16: computed on the whole
    tensor, the derivative held four float32 [M, N] temporaries at once (the torch backend's peak
    was 2.6x grouped_mm's at clip-train). Chunked, the backward holds at most: its outputs, the
    gradient before the activation g, two more [M, N] float16 tensors (a masked copy of g for the
    bias sums, the masked strategy's per-expert product), and eight chunks' float32 temporaries.
    (The measured peak does not see the saved tensors freed: it is an upper bound.)"""
    from benchmarks.peak_memory import peak_bytes

    monkeypatch.setenv("CUMO_KERNELS_TORCH_GEMM", strategy)
    torch.manual_seed(0)
    e, m, k, n = 4, 4096, 64, 256
    chunk_rows = 256
    monkeypatch.setattr(gl, "_CHUNK_ELEMS", chunk_rows * n)
    f16 = torch.float16
    x, w, b = torch.randn(m, k, dtype=f16), torch.randn(e, n, k, dtype=f16) / 8, torch.randn(e, n, dtype=f16)
    offsets = torch.tensor([0, 1000, 1000, 3000, m])
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = torch.ops.cumo.grouped_linear(*leaves, offsets, "quick_gelu", "torch")[0]
    g = torch.randn(m, n, dtype=f16)
    peak, _, grads = peak_bytes(lambda: torch.autograd.grad(y, leaves, g))
    outputs = sum(t.numel() * t.element_size() for t in grads)
    bound = outputs + 3 * m * n * 2 + 8 * chunk_rows * n * 4
    whole_f32 = m * n * 4
    assert peak <= bound, (
        f"{strategy}: the backward held {peak / 2**20:.2f} MiB at its peak, more than {bound / 2**20:.2f} MiB "
        f"(a float32 [M, N] temporary is {whole_f32 / 2**20:.2f} MiB)"
    )
