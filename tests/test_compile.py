"""torch.compile(fullgraph=True) of MoEMLP equals eager, forward and every gradient (tiny shapes:
compiling is the slow part). Marked `slow` for selection; it runs in CI with the rest."""

from __future__ import annotations

import pytest
import torch

from cumo_kernels.nn import MoEMLP
from cumo_kernels.testing import assert_close_rel

pytestmark = pytest.mark.slow


def test_compile_fullgraph_matches_eager(device, backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = MoEMLP(13, 19, 11, num_experts=4, top_k=2, activation="gelu", backend=backend).to(device)
    x = torch.randn(3, 5, 13, device=device)
    g = torch.randn(3, 5, 11, device=device)

    def step(fn):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y, bal, z = fn(xi)
        ((y * g).sum() + 0.1 * bal + 0.01 * z).backward()
        grads = {"x": xi.grad.clone()} | {n: p.grad.clone() for n, p in layer.named_parameters()}
        return (y.detach(), bal.detach(), z.detach()), grads

    (ey, eb, ez), egrads = step(layer)
    compiled = torch.compile(layer, fullgraph=True)
    (cy, cb, cz), cgrads = step(compiled)
    for name, c, e in (("y", cy, ey), ("balance", cb, eb), ("z", cz, ez)):
        assert c.dtype == e.dtype and c.shape == e.shape
        assert_close_rel(c, e.double(), torch.float32, f"compiled {name}")
    assert set(cgrads) == set(egrads)
    for name in egrads:
        assert_close_rel(cgrads[name], egrads[name].double(), torch.float32, f"compiled grad {name}")


def test_compile_fullgraph_inference_matches_eager(device, backend):
    """Inference (torch.no_grad): on CPU tensors the torch backend's forward takes the blocked
    cumo::expert_mlp op; it traces without a graph break too."""
    torch.manual_seed(1)
    torch._dynamo.reset()
    layer = MoEMLP(13, 19, 11, num_experts=4, top_k=2, activation="quick_gelu", backend=backend).to(device)
    x = torch.randn(3, 5, 13, device=device)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    for name, c, e in zip(("y", "balance", "z"), compiled, eager):
        assert c.dtype == e.dtype and c.shape == e.shape
        assert_close_rel(c, e.double(), torch.float32, f"compiled no_grad {name}")
