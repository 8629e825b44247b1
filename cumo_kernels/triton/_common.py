"""Shared pieces of the Triton backend: interpreter detection, dtype checks, dot precision,
the activations (forward and derivative, in float32) as `@triton.jit` helpers, and launch-config
selection (one fixed config under the interpreter or with CUMO_TRITON_AUTOTUNE=0, a small
autotuned set on GPUs, pruned to the configs whose estimated shared memory fits the device, any
config of that set forced by tests)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from ..backend import Unsupported

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""True when this process runs Triton kernels in the interpreter (read at import, as Triton does)."""

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Refuse (before any launch) a dtype the kernels do not compute: `Unsupported` (a call that
    chose this backend by its `not_supported_reasons` never gets here)."""
    if t.dtype not in SUPPORTED:
        raise Unsupported(
            f"{name}: the triton backend computes float32, float16 and bfloat16, got {t.dtype}; "
            "use backend='torch' for float64"
        )


def tf32_allowed() -> bool:
    """Whether torch's settings let a float32 CUDA matmul use TF32, read as torch reads them.

    torch >= 2.9 keeps the setting in `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee",
    or "none": inherit `torch.backends.fp32_precision`); the legacy `matmul.allow_tf32 = ...` and
    `torch.set_float32_matmul_precision(...)` write through to it, but the new API does not write
    back, and reading `allow_tf32` once the two disagree raises RuntimeError ("mix of the legacy
    and new APIs"), as it does after `matmul.fp32_precision = "tf32"` or
    `torch.backends.fp32_precision = "tf32"` (transformers' `tf32=True`). So the new API is read
    wherever it exists, `allow_tf32` only on a torch without it."""
    matmul = torch.backends.cuda.matmul
    try:
        prec = matmul.fp32_precision
    except AttributeError:  # a torch without the new API: the legacy flag is the only one
        return bool(matmul.allow_tf32)
    if prec in ("none", "default"):
        # inherited: the global setting (recent getters resolve this themselves; "default" is
        # how torch 2.7-2.8 spelled "none")
        prec = getattr(torch.backends, "fp32_precision", "none")
    return prec == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot: "tf32" for float32 operands where torch's settings allow TF32
    for float32 matmuls (`tf32_allowed`), else true fp32 ("ieee"); always "ieee" in the
    interpreter, and for float16 / bfloat16 operands (whose dots ignore it)."""
    if dtype == torch.float32 and not INTERPRET and tf32_allowed():
        return "tf32"
    return "ieee"


def pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


AUTOTUNE: bool = not INTERPRET and os.environ.get("CUMO_TRITON_AUTOTUNE", "1") != "0"
"""Autotune the GEMM kernels on GPUs (default). CUMO_TRITON_AUTOTUNE=0 launches them with one
fixed config (GPU_FIXED) instead: each autotuned (N, K, size bucket) compiles and times every
config, which a test suite of many small shapes pays in compile time and nothing else (the GPU
suite's test step sets it; its benchmarks autotune)."""

GPU_FIXED: dict = {"BM": 64, "BN": 64, "BK": 32, "num_warps": 4, "num_stages": 3}
"""The config of CUMO_TRITON_AUTOTUNE=0 (the first of the autotune set; fits sm80 in float32)."""

_forced: dict | None = None


SMEM_SM90 = 232448
"""Shared memory one block may opt into on sm90 (227 KB): the limit of the configs tests force
where no GPU says its own (the interpreter)."""

# Opt-in shared memory per block by compute capability, where neither torch nor Triton's driver
# reports it; other GPUs get sm75's 64 KB, the least of the GPUs Triton compiles for.
_SMEM_BY_ARCH = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): SMEM_SM90}


@functools.cache
def _device_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - any driver failure: the table below
        return _SMEM_BY_ARCH.get((props.major, props.minor), 65536)


def smem_limit(device: torch.device | None = None) -> int:
    """Bytes of shared memory one block may use on `device` (its opt-in maximum; a CUDA device,
    else the current CUDA device), SMEM_SM90 where there is no CUDA device."""
    if device is not None and device.type == "cuda":
        return _device_smem_limit(device.index if device.index is not None else torch.cuda.current_device())
    if torch.cuda.is_available():
        return _device_smem_limit(torch.cuda.current_device())
    return SMEM_SM90


def smem_fits(configs: list, estimate, elt: int, limit: int) -> list:
    """The configs whose `estimate(meta, elt)` (meta: `config_meta`) is at most `limit` bytes;
    never none: the config of the smallest estimate stays when none fits (its launch then fails
    with Triton's OutOfResources, which names the real need)."""
    kept = [c for c in configs if estimate(config_meta(c), elt) <= limit]
    return kept or [min(configs, key=lambda c: estimate(config_meta(c), elt))]


def smem_pruner(estimate):
    """An `early_config_prune` for triton.autotune: keeps the configs `smem_fits` keeps, for the
    element size of the launch's first tensor argument and that tensor's device. Triton calls it
    as fn(configs, named_args, **kwargs) (3.x; older releases without kwargs)."""

    def early_config_prune(configs, named_args=None, *_, **kwargs):
        values = [*(named_args.values() if isinstance(named_args, dict) else ()), *kwargs.values()]
        t = next((v for v in values if isinstance(v, torch.Tensor)), None)
        elt = t.element_size() if t is not None else 4
        return smem_fits(list(configs), estimate, elt, smem_limit(t.device if t is not None else None))

    return early_config_prune


def autotuned(kernel, configs: list, key: list[str], smem=None):
    """`kernel` autotuned over `configs` on GPUs, pruned (before any is compiled) to those whose
    shared memory, `smem(meta, element size)` bytes, fits the device; under the interpreter or with
    CUMO_TRITON_AUTOTUNE=0, the kernel itself (autotune with more than one config fails in the
    interpreter), launched with explicit meta-parameters (see `explicit_meta`)."""
    if not AUTOTUNE:
        return kernel
    prune = {"early_config_prune": smem_pruner(smem)} if smem is not None else None
    # cache_results: the timings go to Triton's on-disk cache, so a new process (a second
    # benchmark run, a restarted job) does not time every config again
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune, cache_results=True)(kernel)


def config_meta(cfg: triton.Config) -> dict:
    """A triton.Config as launch keyword arguments (its kwargs, num_warps, num_stages)."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


@contextlib.contextmanager
def forced_config(cfg: triton.Config):
    """Launch the autotuned kernels with `cfg` (and nothing else) inside the block: tests run
    every config of the autotune set against the oracle this way, on GPUs and in the interpreter."""
    global _forced
    prev, _forced = _forced, config_meta(cfg)
    try:
        yield
    finally:
        _forced = prev


def explicit_meta(fixed: dict) -> dict | None:
    """The meta-parameters a launch of an autotuned kernel uses, or None where the autotuner
    chooses: a forced config, else `fixed` (small tiles) in the interpreter, else GPU_FIXED with
    CUMO_TRITON_AUTOTUNE=0."""
    if _forced is not None:
        return _forced
    if INTERPRET:
        return fixed
    return None if AUTOTUNE else GPU_FIXED


def on_tensor_device(fn):
    """Run launcher `fn` with the current CUDA device set to its first tensor argument's device:
    Triton launches on the *current* device and stream, not the tensors' (a layer on cuda:1 while
    cuda:0 is current, as with device_map="auto", would otherwise launch on the wrong GPU)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if t is not None and t.is_cuda:
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.sets_tensor_device = True
    return wrapper


def launch(kernel, grid, args: tuple, fixed: dict) -> None:
    """Launch `kernel` (autotuned or not) on `grid` (a callable of the meta-parameters), with the
    meta-parameters of `explicit_meta(fixed)` where there are any, else as the autotuner picks."""
    meta = explicit_meta(fixed)
    if meta is None:
        kernel[grid](*args)
    else:
        base = kernel.fn if isinstance(kernel, Autotuner) else kernel  # an Autotuner's JIT function
        base[grid(meta)](*args, **meta)


@triton.jit
def _tanh(u):
    # tanh through the sigmoid: exact limits at +-inf, no libdevice (the interpreter has none).
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def act_fwd(v, ACT: tl.constexpr):
    """act(v) for float32 v."""
    out = v
    if ACT == 1:
        out = v * tl.sigmoid(1.702 * v)
    elif ACT == 2:
        out = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 3:
        out = 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif ACT == 4:
        out = v * tl.sigmoid(v)
    elif ACT == 5:
        out = tl.maximum(v, 0.0)
    elif ACT == 6:
        r = tl.maximum(v, 0.0)
        out = r * r
    return out


@triton.jit
def act_grad(v, ACT: tl.constexpr):
    """d act(v) / dv for float32 v."""
    out = v * 0.0 + 1.0
    if ACT == 1:
        s = tl.sigmoid(1.702 * v)
        out = s + 1.702 * v * s * (1.0 - s)
    elif ACT == 2:
        out = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476)) + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v)
        out = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * dinner
    elif ACT == 4:
        s = tl.sigmoid(v)
        out = s * (1.0 + v * (1.0 - s))
    elif ACT == 5:
        out = tl.where(v > 0.0, 1.0, 0.0)
    elif ACT == 6:
        out = 2.0 * tl.maximum(v, 0.0)
    return out


# GPT-OSS's clamped SwiGLU below: limit 7 and alpha 1.702 as cumo_kernels._activations.GLU_LIMIT,
# GLU_ALPHA (literals: a jit function reads no Python globals that are not constexpr).


@triton.jit
def glu_cols(j, H, INTERLEAVED: tl.constexpr):
    """w1's (gate row, up row) of hidden column j, which are also the pre-activation's columns:
    (j, H + j) concatenated, (2j, 2j + 1) interleaved."""
    if INTERLEAVED:
        return 2 * j, 2 * j + 1
    return j, H + j


@triton.jit
def glu_fwd(g, u, ACT: tl.constexpr):
    """The gated activation a(g) * b(u) for float32 g, u: act(g) * u, or GPT-OSS's clamped pair (ACT 7)."""
    if ACT == 7:
        gc = tl.minimum(g, 7.0)
        uc = tl.minimum(tl.maximum(u, -7.0), 7.0)
        out = gc * tl.sigmoid(1.702 * gc) * (uc + 1.0)
    else:
        out = act_fwd(g, ACT) * u
    return out


@triton.jit
def glu_grad(gh, g, u, ACT: tl.constexpr):
    """(d/dg, d/du) of gh * a(g) * b(u), float32; the clamps pass the gradient inside their closed
    bounds only (torch.clamp's gradient)."""
    if ACT == 7:
        gc = tl.minimum(g, 7.0)
        s = tl.sigmoid(1.702 * gc)
        da = tl.where(g <= 7.0, s + 1.702 * gc * s * (1.0 - s), 0.0)
        b = tl.minimum(tl.maximum(u, -7.0), 7.0) + 1.0
        dg = gh * b * da
        du = tl.where((u >= -7.0) & (u <= 7.0), gh * gc * s, 0.0)
    else:
        dg = gh * u * act_grad(g, ACT)
        du = gh * act_fwd(g, ACT)
    return dg, du
