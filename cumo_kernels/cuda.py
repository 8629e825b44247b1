"""The `cuda` backend: a thin wrapper over the compiled extension `cumo_kernels._cuda`.

The extension takes raw device pointers, sizes, a dtype code and the CUDA stream handle; this
module owns the rest (DESIGN.md, "The CUDA extension without the torch ABI"): it checks every
operand (device, dtype, contiguity, alignment), allocates outputs and workspaces with torch's
caching allocator, and passes `data_ptr()`s and `torch.cuda.current_stream().cuda_stream`.

The functions have the signatures of `cumo_kernels.reference` (the contract: cumo_kernels.backend).
`not_supported_reasons(call)` says what this backend cannot run (float64, more than `MAX_EXPERTS`
(256) experts in the routing, a device this build has no kernels for, ...), so that a call
chooses another backend before anything launches; the op functions check their operands again and raise
`backend.Unsupported` (an error) for what a call's description cannot show.
Importing this module never initialises CUDA, and works where the extension is not built.
"""

from __future__ import annotations

import os

import torch

from ._activations import ACTIVATIONS
from .backend import Call, Unsupported

try:
    from . import _cuda
except ImportError as exc:  # not built (no nvcc at install, CUMO_SKIP_CUDA_BUILD) or unloadable
    _cuda = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

# The codes the extension takes, as it exports them (csrc/cumo_hd.h's enums, through bindings.cpp):
# the dtypes it computes and the activations its epilogue computes. Not built: none (every call is
# refused before a code is read).
DTYPE_CODES: dict[torch.dtype, int] = {getattr(torch, n): c for n, c in (_cuda.DTYPE_CODES if _cuda else {}).items()}
ACTIVATION_CODES: dict[str, int] = {} if _cuda is None else dict(_cuda.ACTIVATION_CODES)
# The most experts the routing kernels take, as the extension states it (csrc/cumo_codes.h's
# kMaxExperts, 256: a warp per token holds E/32 scores per lane in registers; E <= 64 runs a thread
# per token). Not built: None (every call is refused, for that, before a limit is read).
MAX_EXPERTS: int | None = None if _cuda is None else int(_cuda.MAX_EXPERTS)
MAX_GEMM_EXPERTS = 1023
MAX_PERMUTE_EXPERTS = 4096  # permute: one chunk's histogram in shared memory
_BUILD_HINT = "build it with `pip install .` on a machine with nvcc (CUDA_HOME), without CUMO_SKIP_CUDA_BUILD"

# Activations the extension's epilogue does not compute ("relu2", issue 23): the GEMM runs with
# "none" and the activation (forward) or its derivative (backward) is a torch elementwise pass,
# a composition declared here (a fused epilogue waits for the csrc change and a GPU to test it).
COMPOSED_ACTIVATIONS = frozenset(set(ACTIVATIONS) - set(ACTIVATION_CODES))

COMPOSITION = "unfused"
"""moe_mlp composes route -> permute -> grouped_linear (fc1, fc2) -> unpermute for this backend."""

FEATURES: frozenset[str] = frozenset()


def refusal(device_type: str) -> str | None:
    """None when the backend can run on `device_type` tensors, else why not."""
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, not {device_type}"
    if _cuda is None:
        return f"the extension cumo_kernels._cuda is not built or cannot be loaded ({_IMPORT_ERROR}); {_BUILD_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    # Once CUDA is initialised (never initialised here for this): refuse where no device can run
    # this build. Before that, each call's operand check (_check) refuses such a device.
    if torch.cuda.is_initialized() and not any(_arch_refusal(i) is None for i in range(torch.cuda.device_count())):
        return _arch_refusal(0)
    return None


# The most experts each op family takes, by the op a call runs (None: a whole layer, every op).
_EXPERT_LIMITS = (
    ("route", MAX_EXPERTS, "the routing kernels hold one token's E scores in a warp's registers"),
    ("permute", MAX_PERMUTE_EXPERTS, "the sort kernel holds one chunk's histogram in shared memory"),
    ("grouped_linear", MAX_GEMM_EXPERTS, "the grouped GEMM's problem list"),
    ("grouped_linear_glu", MAX_GEMM_EXPERTS, "the grouped GEMM's problem list"),
)


def not_supported_reasons(call: Call) -> list[str]:
    """Every reason the cuda backend cannot run `call`: device, installation, arch, dtype, E."""
    device = refusal(call.device.type)
    if device is not None:
        return [device]
    why = []
    if call.device.index is not None or torch.cuda.is_initialized():
        arch = _arch_refusal(call.device.index if call.device.index is not None else torch.cuda.current_device())
        if arch is not None:
            why.append(arch)
    if call.dtype is not None and call.dtype not in DTYPE_CODES:
        why.append(f"the CUDA kernels compute float32, float16 and bfloat16, not {call.dtype}")
    if call.num_experts is not None:
        for op, limit, what in _EXPERT_LIMITS:
            if call.op in (None, op) and limit is not None and call.num_experts > limit:
                why.append(f"{op} takes at most {limit} experts ({what}), got E={call.num_experts}")
    return why


# ------------------------------------------------------------------------ archs of this build


def built_archs() -> list[str]:
    """The archs this build holds code for ("80", "90a", ...), from the module's build_info;
    empty when unknown."""
    if _cuda is None:
        return []
    info = _cuda.build_info()
    token = next((w for w in info.split() if w.startswith("archs=")), "archs=unknown")[len("archs=") :]
    return [] if token in ("", "unknown") else [a for a in token.split(",") if a]


def arch_runs_on(arch: str, capability: int) -> bool:
    """Whether SASS built for `arch` ("80", "86", "90a", "100f", ...) runs on a device of compute
    capability `capability` (major*10+minor). setup.py embeds SASS only (no PTX to JIT): plain SASS
    runs on the same major at an equal or higher minor; an arch-specific one ("90a") only on that
    exact capability; a family one ("100f") as plain SASS."""
    digits = "".join(ch for ch in arch if ch.isdigit())
    suffix = arch[len(digits) :]
    if not digits:
        return False
    built = int(digits)
    if suffix == "a":
        return capability == built
    return capability // 10 == built // 10 and capability % 10 >= built % 10


_ARCH_REFUSALS: dict[int, str | None] = {}


def _arch_refusal(index: int) -> str | None:
    """None when this build holds kernels that run on CUDA device `index`, else why not (cached:
    a device's capability does not change). Without it every launch would fail with "no kernel
    image is available" at the first launch, after `auto` had chosen this backend."""
    if index not in _ARCH_REFUSALS:
        archs = built_archs()
        major, minor = torch.cuda.get_device_capability(index)
        cc = major * 10 + minor
        if not archs or any(arch_runs_on(a, cc) for a in archs):
            _ARCH_REFUSALS[index] = None
        else:
            _ARCH_REFUSALS[index] = (
                f"cuda backend: cumo_kernels._cuda is built for archs {','.join(archs)}, which cannot run on "
                f"cuda:{index} (compute capability {major}.{minor}); rebuild with CUMO_CUDA_ARCHS including "
                f"{major}{minor}{'a' if cc == 90 else ''}"
            )
    return _ARCH_REFUSALS[index]


# ------------------------------------------------------------------------------------- checks


def _dtype_code(name: str, t: torch.Tensor) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise Unsupported(f"cuda backend: {name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return code


def _check(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Device, dtype, contiguity and element alignment of one operand."""
    if t.device != device or t.device.type != "cuda":
        raise Unsupported(f"cuda backend: {name}: on {t.device}, expected {device} (a CUDA tensor)")
    why = _arch_refusal(t.device.index)
    if why is not None:
        raise Unsupported(why)
    if dtype is not None and t.dtype != dtype:
        raise Unsupported(f"cuda backend: {name}: dtype {t.dtype}, expected {dtype}")
    if not t.is_contiguous():
        raise Unsupported(f"cuda backend: {name}: expected a contiguous tensor, got strides {t.stride()}")
    if t.numel() and t.data_ptr() % t.element_size():
        raise Unsupported(f"cuda backend: {name}: data pointer not aligned to its {t.element_size()}-byte elements")


def _aligned16(t: torch.Tensor) -> bool:
    """16-byte aligned address and row pitch: what CUTLASS's TMA and cp.async paths need."""
    row = t.shape[-1] if t.dim() else 1
    return t.numel() == 0 or (t.data_ptr() % 16 == 0 and row * t.element_size() % 16 == 0)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """Workspace from torch's caching allocator (256-byte aligned, like every allocation)."""
    return torch.empty(max(int(nbytes), 16), dtype=torch.uint8, device=device)


# ------------------------------------------------------------------------------------ routing


def route(
    logits: torch.Tensor, top_k: int, num_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.route on the GPU: logits [T, E] (E <= MAX_EXPERTS, 1 <= top_k <= E) ->
    (weights [T, k] in the logits' dtype, expert_ids [T, k] int64, prob_sums [B, E], first_counts
    [B, E], z_sums [B], float32). One thread per token for E <= 64, one warp per token above
    (csrc/routing.cu); statistics summed in a fixed order, no atomics, no host sync."""
    dev = logits.device
    _check("logits", logits, dev)
    code = _dtype_code("logits", logits)
    t, e = logits.shape
    if e > MAX_EXPERTS:
        raise Unsupported(f"cuda backend: route takes at most {MAX_EXPERTS} experts, got E={e}")
    f32 = torch.float32
    weights = torch.empty(t, top_k, dtype=logits.dtype, device=dev)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=dev)
    prob_sums = torch.empty(num_samples, e, dtype=f32, device=dev)
    first_counts = torch.empty(num_samples, e, dtype=f32, device=dev)
    z_sums = torch.empty(num_samples, dtype=f32, device=dev)
    if t == 0:
        return weights, ids, prob_sums.zero_(), first_counts.zero_(), z_sums.zero_()
    ws = torch.empty(t * (e + 2), dtype=f32, device=dev)
    _cuda.route_forward(
        logits.data_ptr(), t, e, top_k, num_samples, code, _ptr(weights), _ptr(ids), _ptr(prob_sums),
        _ptr(first_counts), _ptr(z_sums), ws.data_ptr(), _stream(dev), dev.index,
    )  # fmt: skip
    return weights, ids, prob_sums, first_counts, z_sums


def route_backward(
    grad_weights: torch.Tensor,
    grad_prob_sums: torch.Tensor,
    grad_z_sums: torch.Tensor,
    logits: torch.Tensor,
    expert_ids: torch.Tensor,
) -> torch.Tensor:
    """reference.route_backward on the GPU: grad_logits [T, E] in the logits' dtype; one thread
    per token for E <= 64, one warp per token above."""
    dev = logits.device
    _check("logits", logits, dev)
    code = _dtype_code("logits", logits)
    t, e = logits.shape
    if e > MAX_EXPERTS:
        raise Unsupported(f"cuda backend: route takes at most {MAX_EXPERTS} experts, got E={e}")
    gw = grad_weights.to(logits.dtype).contiguous()
    gp = grad_prob_sums.to(torch.float32).contiguous()
    gz = grad_z_sums.to(torch.float32).contiguous()
    ids = expert_ids.contiguous()
    _check("expert_ids", ids, dev, torch.int64)  # the kernel reads int64 ids
    for name, x in (("grad_weights", gw), ("grad_prob_sums", gp), ("grad_z_sums", gz)):
        _check(name, x, dev)
    out = torch.empty_like(logits)
    if t == 0:
        return out
    # The kernel indexes these by the sizes below: a mismatch would read out of bounds.
    k = ids.shape[1] if ids.dim() == 2 else -1
    b = gp.shape[0] if gp.dim() == 2 else -1
    for name, x, want in (
        ("expert_ids", ids, (t, k)),
        ("grad_weights", gw, (t, k)),
        ("grad_prob_sums", gp, (b, e)),
        ("grad_z_sums", gz, (b,)),
    ):
        if tuple(x.shape) != want or min(want) < 1:
            raise ValueError(
                f"cuda backend: route_backward: {name}: shape {list(x.shape)}, expected {list(want)} "
                f"(logits [T, E] = {[t, e]}, expert_ids [T, k], grad_prob_sums [B, E], grad_z_sums [B])"
            )
    _cuda.route_backward(
        gw.data_ptr(), gp.data_ptr(), gz.data_ptr(), logits.data_ptr(), ids.data_ptr(), t, e, k, b, code,
        out.data_ptr(), _stream(dev), dev.index,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ permute


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.permute on the GPU: per-chunk histograms, offsets and a stable sort order built on
    the device, then a row gather."""
    dev = x.device
    _check("x", x, dev)
    _check("expert_ids", expert_ids, dev, torch.int64)
    code = _dtype_code("x", x)
    if num_experts > MAX_PERMUTE_EXPERTS:
        raise Unsupported(f"cuda backend: permute takes at most {MAX_PERMUTE_EXPERTS} experts, got {num_experts}")
    t, h = x.shape
    k = expert_ids.shape[1]
    x_sorted = torch.empty(t * k, h, dtype=x.dtype, device=dev)
    sort_idx = torch.empty(t * k, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    ws = _workspace(_cuda.permute_workspace_bytes(t * k, num_experts), dev)
    _cuda.permute_forward(
        _ptr(x), _ptr(expert_ids), t, k, h, num_experts, code, _ptr(x_sorted), _ptr(sort_idx), offsets.data_ptr(),
        ws.data_ptr(), _stream(dev), dev.index,
    )  # fmt: skip
    return x_sorted, sort_idx, offsets


def permute_backward(grad_sorted: torch.Tensor, sort_idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """reference.permute_backward: grad_x[t] = sum of the token's k grouped rows (no atomics)."""
    dev = grad_sorted.device
    _check("grad_sorted", grad_sorted, dev)
    _check("sort_idx", sort_idx, dev, torch.int64)
    code = _dtype_code("grad_sorted", grad_sorted)
    tk, h = grad_sorted.shape
    t = tk // top_k
    grad_x = torch.empty(t, h, dtype=grad_sorted.dtype, device=dev)
    if grad_x.numel() == 0:
        return grad_x
    ws = _workspace(tk * 8, dev)
    _cuda.permute_backward(
        grad_sorted.data_ptr(), sort_idx.data_ptr(), t, top_k, h, code, grad_x.data_ptr(), ws.data_ptr(),
        _stream(dev), dev.index,
    )  # fmt: skip
    return grad_x


def unpermute(y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """reference.unpermute: out[t] = sum_j weights[t, j] * y_sorted[row of slot t*k+j] (float32 sums)."""
    dev = y_sorted.device
    _check("y_sorted", y_sorted, dev)
    _check("sort_idx", sort_idx, dev, torch.int64)
    code = _dtype_code("y_sorted", y_sorted)
    w = weights.to(y_sorted.dtype).contiguous()
    _check("weights", w, dev)
    t, k = w.shape
    n = y_sorted.shape[1]
    out = torch.empty(t, n, dtype=y_sorted.dtype, device=dev)
    if out.numel() == 0:
        return out
    ws = _workspace(t * k * 8, dev)
    _cuda.unpermute_forward(
        y_sorted.data_ptr(), sort_idx.data_ptr(), w.data_ptr(), t, k, n, code, out.data_ptr(), ws.data_ptr(),
        _stream(dev), dev.index,
    )  # fmt: skip
    return out


def unpermute_backward(
    grad_out: torch.Tensor, y_sorted: torch.Tensor, sort_idx: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.unpermute_backward: (grad_y_sorted [T*k, N], grad_weights [T, k])."""
    dev = y_sorted.device
    _check("y_sorted", y_sorted, dev)
    _check("sort_idx", sort_idx, dev, torch.int64)
    code = _dtype_code("y_sorted", y_sorted)
    g = grad_out.to(y_sorted.dtype).contiguous()
    w = weights.to(y_sorted.dtype).contiguous()
    _check("grad_out", g, dev)
    _check("weights", w, dev)
    t, k = w.shape
    n = y_sorted.shape[1]
    grad_y = torch.empty_like(y_sorted)
    grad_w = torch.empty(t, k, dtype=y_sorted.dtype, device=dev)
    if t * k:
        ws = _workspace(t * k * 8, dev)
        _cuda.unpermute_backward(
            _ptr(g), _ptr(y_sorted), sort_idx.data_ptr(), w.data_ptr(), t, k, n, code, _ptr(grad_y),
            grad_w.data_ptr(), ws.data_ptr(), _stream(dev), dev.index,
        )  # fmt: skip
    return grad_y, grad_w.to(weights.dtype)


# ------------------------------------------------------------------------------- grouped GEMM


def _check_experts(e: int) -> None:
    if e > MAX_GEMM_EXPERTS:
        raise Unsupported(f"cuda backend: the grouped GEMM takes at most {MAX_GEMM_EXPERTS} experts, got E={e}")


GEMM_PATH_ENV = "CUMO_CUDA_GEMM"
"""`simt` forces the extension's SIMT grouped GEMM, `cutlass` requires the CUTLASS one (raises
Unsupported where it cannot run), unset or `auto` chooses (tests and debugging on a GPU)."""


def _use_cutlass(dev: torch.device, code: int, *operands: torch.Tensor) -> bool:
    """The CUTLASS path where it is built for this device and dtype and every operand is 16-byte
    aligned (DESIGN.md: with problem shapes on the device CUTLASS cannot check alignment itself).
    float32 never takes it (it would be tf32); everything else runs the SIMT path of the extension."""
    mode = os.environ.get(GEMM_PATH_ENV, "auto") or "auto"
    if mode not in ("auto", "simt", "cutlass"):
        raise ValueError(f"{GEMM_PATH_ENV}: unknown {mode!r}; accepted: auto, simt, cutlass")
    if mode == "simt":
        return False
    if mode == "cutlass":
        if not _cutlass_possible(dev, code, operands):
            raise Unsupported(
                f"cuda backend: {GEMM_PATH_ENV}=cutlass but the CUTLASS grouped GEMM cannot take these operands "
                f"(float16/bfloat16, 16-byte aligned rows, a device this build has a CUTLASS path for: "
                f"{_cuda.build_info()})"
            )
        return True
    return _cutlass_possible(dev, code, operands)


def _cutlass_possible(dev: torch.device, code: int, operands: tuple[torch.Tensor, ...]) -> bool:
    if code == DTYPE_CODES[torch.float32]:
        return False
    major, minor = torch.cuda.get_device_capability(dev)
    if not _cuda.cutlass_supports(major * 10 + minor, code):
        return False
    return all(_aligned16(t) for t in operands)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.grouped_linear on the GPU: (y [M, N], pre [M, N] or [0]); bias and activation
    fused in the epilogue; per-expert problems built on the device from offsets (no sync)."""
    if activation in COMPOSED_ACTIVATIONS:
        from . import _activations

        pre, _ = grouped_linear(x, weight, bias, offsets, "none")
        return _activations.apply(pre, activation), pre
    dev = x.device
    _check("x", x, dev)
    _check("weight", weight, dev, x.dtype)
    _check("offsets", offsets, dev, torch.int64)
    if bias is not None:
        _check("bias", bias, dev, x.dtype)
    code = _dtype_code("x", x)
    m, kdim = x.shape
    e, n, _ = weight.shape
    _check_experts(e)
    act = ACTIVATION_CODES[activation]
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    pre = x.new_empty(0) if activation == "none" else torch.empty(m, n, dtype=x.dtype, device=dev)
    if y.numel() == 0:
        return y, pre
    ops = [x, weight, y] + ([bias] if bias is not None else []) + ([pre] if activation != "none" else [])
    cutlass = kdim > 0 and _use_cutlass(dev, code, *ops)
    ws = _workspace(_cuda.gemm_workspace_bytes(m, kdim, n, e, code, cutlass, dev.index), dev)
    _cuda.grouped_linear_forward(
        _ptr(x), weight.data_ptr(), _ptr(bias), offsets.data_ptr(), m, kdim, n, e, code, act, y.data_ptr(),
        _ptr(pre), ws.data_ptr(), ws.numel(), cutlass, _stream(dev), dev.index,
    )  # fmt: skip
    return y, pre


def grouped_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """reference.grouped_linear_backward: (grad_x [M, K], grad_weight [E, N, K], grad_bias [E, N]
    or None); experts without rows get zero weight and bias gradients (no atomics)."""
    if activation in COMPOSED_ACTIVATIONS:
        from . import _activations

        g = (grad_y.float() * _activations.derivative(pre, activation)).to(x.dtype)
        return grouped_linear_backward(g, x, weight, offsets, pre, "none", has_bias)
    dev = x.device
    _check("x", x, dev)
    _check("weight", weight, dev, x.dtype)
    _check("offsets", offsets, dev, torch.int64)
    g = grad_y.to(x.dtype).contiguous()
    _check("grad_y", g, dev)
    if activation != "none":
        _check("pre", pre, dev, x.dtype)
    code = _dtype_code("x", x)
    m, kdim = x.shape
    e, n, _ = weight.shape
    _check_experts(e)
    act = ACTIVATION_CODES[activation]
    grad_x = torch.empty_like(x)
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty(e, n, dtype=x.dtype, device=dev) if has_bias else None
    grad_pre = torch.empty(m, n, dtype=x.dtype, device=dev) if activation != "none" and m * n else None
    ops = [x, weight, g, grad_x, grad_w] + ([grad_pre] if grad_pre is not None else [])
    cutlass = m > 0 and n > 0 and kdim > 0 and _use_cutlass(dev, code, *ops)
    ws = _workspace(_cuda.gemm_workspace_bytes(m, kdim, n, e, code, cutlass, dev.index), dev)
    _cuda.grouped_linear_backward(
        _ptr(g), _ptr(x), _ptr(weight), offsets.data_ptr(), _ptr(pre), m, kdim, n, e, code, act, _ptr(grad_x),
        _ptr(grad_w), _ptr(grad_b), _ptr(grad_pre), ws.data_ptr(), ws.numel(), cutlass, _stream(dev), dev.index,
    )  # fmt: skip
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------- gated experts (grouped_linear_glu)
# A declared composition (issue 23): the gated first layer is the extension's grouped GEMM with
# N = 2H and no activation (the gate and up columns of each row in one GEMM), then the gated
# activation and, in the backward, its derivative as torch elementwise passes over the [M, 2H]
# pre-activation. A fused epilogue (act(gate) * up written once, as the triton backend does) waits
# for a csrc change and a GPU to test it. The extension reads contiguous weights: a w1 in any other
# layout (transposed) is refused with Unsupported (auto then runs triton, which reads it in place).


def _check_glu_weight(w1: torch.Tensor, b1: torch.Tensor | None) -> None:
    for name, t in (("w1", w1), ("b1", b1)):
        if t is not None and not t.is_contiguous():
            raise Unsupported(
                f"cuda backend: gated {name} must be contiguous (the extension reads row-major weights), got strides "
                f"{t.stride()}; the triton backend reads it through its strides"
            )


def grouped_linear_glu(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    offsets: torch.Tensor,
    activation: str,
    interleaved: bool = False,
    save_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.grouped_linear_glu on the GPU: the extension's GEMM (N = 2H), then the gated activation."""
    from . import _activations

    _check_glu_weight(w1, b1)
    pre, _ = grouped_linear(x, w1, b1, offsets, "none")
    h = _activations.glu_apply(*_activations.glu_halves(pre, interleaved), activation)
    return h, (pre if save_pre else x.new_empty(0))


def grouped_linear_glu_backward(
    grad_h: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    offsets: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    interleaved: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gated derivative (torch elementwise), then the extension's grouped GEMM backward."""
    from . import _activations

    _check_glu_weight(w1, None)
    gg, gu = _activations.glu_derivative(grad_h, *_activations.glu_halves(pre, interleaved), activation)
    gpre = torch.empty_like(pre)
    og, ou = _activations.glu_halves(gpre, interleaved)
    og.copy_(gg)
    ou.copy_(gu)
    return grouped_linear_backward(gpre, x, w1, offsets, pre, "none", has_bias)
