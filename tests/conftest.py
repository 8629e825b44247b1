"""Shared test configuration: devices, backends, dtypes and input factories.

- `device`: "cpu" always; "cuda" when torch.cuda.is_available(), else skipped with a reason.
- `backend`: every name in `cumo_kernels.available_backends(device)`, i.e. the backends that run
  on the test's device (today "torch"; "triton" joins on the CPU when the suite runs under
  TRITON_INTERPRET=1, "cuda" on GPUs). A test that takes `backend` is parametrised over
  (device, backend) pairs, so it also runs on CUDA where there is one.
- `dtype`: parametrised explicitly by tests (DTYPES); `skip_unsupported` skips the combinations
  a backend cannot run (the Triton interpreter cannot do bfloat16).
"""

from __future__ import annotations

import os

import pytest
import torch

import cumo_kernels

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device (torch.cuda.is_available() is False)"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW = (torch.float16, torch.bfloat16)
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "silu", "relu")


def _device_params() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON))]


def _backend_pairs() -> list:
    pairs = [pytest.param("cpu", b, id=f"cpu-{b}") for b in cumo_kernels.available_backends("cpu")]
    mark = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
    pairs += [pytest.param("cuda", b, id=f"cuda-{b}", marks=mark) for b in cumo_kernels.available_backends("cuda")]
    return pairs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cuda-only",
        action="store_true",
        help="keep only the tests that run on a CUDA device (the GPU suite's selection: marked `cuda`, or "
        "parametrised with device 'cuda'), the GPU-only ones first, then by backend: cuda, triton, torch",
    )


# The GPU suite's order among the parametrised CUDA tests: the backends never run elsewhere first.
_BACKEND_RANK = {"cuda": 0, "triton": 1, "auto": 2, "torch": 3}


def exercises_cuda(item: pytest.Item) -> bool:
    """True for a test that runs on a CUDA device: marked `cuda`, or parametrised with device "cuda"."""
    if item.get_closest_marker("cuda") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("device") == "cuda"


def cuda_rank(item: pytest.Item) -> tuple[int, int]:
    """Sort key of the GPU suite: GPU-only tests (marker `cuda`) first, then by backend, slow last."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    gpu_only = item.get_closest_marker("cuda") is not None
    slow = item.get_closest_marker("slow") is not None
    return (0 if gpu_only else 2 if slow else 1, _BACKEND_RANK.get(backend, 2))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--cuda-only"):
        return
    keep = [it for it in items if exercises_cuda(it)]
    drop = [it for it in items if not exercises_cuda(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=cuda_rank)  # stable: collection order within a rank


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "backend" in names:
        metafunc.parametrize(("device", "backend"), _backend_pairs())
    elif "device" in names:
        metafunc.parametrize("device", _device_params())


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose backends explicitly: an exported CUMO_KERNELS_BACKEND, or a user's own
    measured-order table (CUMO_KERNELS_AUTO_TABLE, cumo_kernels.tuning), must not leak in."""
    monkeypatch.delenv("CUMO_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("CUMO_KERNELS_AUTO_TABLE", raising=False)


def skip_unsupported(device: str, backend: str, dtype: torch.dtype) -> None:
    """Skip (with the reason) dtype/backend/device combinations that cannot run."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bfloat16 wrongly (DESIGN.md); bf16 Triton runs on GPUs")


def poison(device: str) -> None:
    """Fill the CUDA caching allocator's free blocks with NaN so that unwritten output elements show."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        n = min(free // 8, 1 << 26)
        torch.empty(n, dtype=torch.float32, device=device).fill_(float("nan"))
        torch.cuda.synchronize()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_moe_inputs(
    shape: tuple[int, ...],
    d_in: int,
    hidden: int,
    d_out: int,
    num_experts: int,
    *,
    bias: bool = True,
    kind: str = "random",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    target: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Inputs of moe_mlp: x [*shape, d_in], gate [E, d_in], w1, b1, w2, b2 in `dtype`.

    Kinds (routing is steered through a constant input feature x[..., 0] = 1):
        "random": random gate.
        "one_expert": every token's first choice is `target` (default the last expert).
        "empty_expert": expert `target` (default 1) is every token's last choice (no tokens
            when top_k < E).
        "ties": x and gate take values in {-1, 0, 1} x {0, 0.5}, so every logit is exact in every
            dtype, and gate rows 0 and 2 are equal (E >= 3): experts 0 and 2 tie exactly in
            every token.
        "zero_gate": gate = 0 (all experts tie for every token).
    """
    g = seeded(seed)
    e = num_experts
    x = torch.randn(*shape, d_in, generator=g)
    gate = 0.3 * torch.randn(e, d_in, generator=g)
    if kind in ("one_expert", "empty_expert"):
        x[..., 0] = 1.0
        gate[:, 0] = 0.0
        gate[:, 1:] *= 0.3
        t = (e - 1 if kind == "one_expert" else min(1, e - 1)) if target is None else target
        gate[t, 0] = 3.0 if kind == "one_expert" else -3.0
    elif kind == "ties":
        x = torch.randint(-1, 2, (*shape, d_in), generator=g).float()
        gate = 0.5 * torch.randint(-1, 2, (e, d_in), generator=g).float()
        if e >= 3:
            gate[2] = gate[0]
    elif kind == "zero_gate":
        gate = torch.zeros(e, d_in)
    elif kind != "random":
        raise ValueError(kind)
    w1 = torch.randn(e, hidden, d_in, generator=g) / d_in**0.5
    b1 = 0.5 * torch.randn(e, hidden, generator=g)
    w2 = torch.randn(e, d_out, hidden, generator=g) / hidden**0.5
    b2 = 0.5 * torch.randn(e, d_out, generator=g)
    out = {"x": x, "gate_weight": gate, "w1": w1, "b1": b1 if bias else None, "w2": w2, "b2": b2 if bias else None}
    return {k: (None if v is None else v.to(device=device, dtype=dtype)) for k, v in out.items()}


@pytest.fixture
def moe_inputs():
    """The `make_moe_inputs` factory."""
    return make_moe_inputs


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
