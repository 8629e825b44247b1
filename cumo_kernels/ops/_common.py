"""Checks shared by the public ops (each error names the argument, what was given and what is
accepted), and the autograd guards of the custom ops."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_strided(name: str, t: torch.Tensor) -> None:
    """The ops take dense (strided) tensors: a sparse or nested one failed deep inside torch."""
    if t.is_nested:
        raise TypeError(
            f"{name}: expected a strided (dense) tensor, got a nested one; pass its tokens as one [T, in] tensor "
            "(.values() of a jagged one: routing is per token; the balance statistics then cover them as one sample)"
        )
    if t.layout != torch.strided:
        layout = str(t.layout).removeprefix("torch.")
        raise TypeError(f"{name}: expected a strided (dense) tensor, got a {layout} one; convert it with .to_dense()")


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    check_strided(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32, float16, bfloat16, float64), got {t.dtype}"
        )
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match the input's {dtype}; cast them to one dtype")


def check_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    """expected: a tuple of ints or None (any) per dim."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {want} ({meaning}), got {list(t.shape)}")


def check_index(name: str, t: torch.Tensor, dims: int) -> None:
    if isinstance(t, torch.Tensor):
        check_strided(name, t)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != dims:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a {dims}-D int64 tensor, got {got}")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the input is on {device}; move them to one device")


def check_top_k(top_k: object, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")


def check_activation(activation: object, allow_none: bool = False) -> None:
    from .._activations import ACTIVATIONS

    accepted = ACTIVATIONS + (("none",) if allow_none else ())
    if activation not in accepted:
        raise ValueError(f"activation: unknown {activation!r}; accepted: {', '.join(accepted)}")


def grad_or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Incoming gradients, contiguous (an expanded one arrives from `y.sum().backward()`)."""
    return torch.zeros_like(like) if g is None else g.contiguous()


# ----------------------------------------------------------------------- autograd modes per op

_SUPPORTED = (
    "supported: first-order reverse mode through torch.autograd (loss.backward(), torch.autograd.grad), "
    "torch.vmap, torch.compile and torch.export"
)


def _forward_ad_tangent(args: tuple) -> bool:
    """Whether a tensor argument carries a forward-mode tangent (torch.autograd.forward_ad, or
    torch.func.jvp / jacfwd, which reach an op's autograd kernel as dual tensors)."""
    if torch.autograd.forward_ad._current_level < 0:
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None:
            return True
    return False


def refuse_unsupported_autograd(op: str, args: tuple) -> None:
    """Raise, naming cumo op `op`, where an autograd mode it has no formula for would run through it.

    torch's custom ops carry reverse-mode formulas only: forward-mode AD would otherwise get a
    zero tangent with no error (the op's autograd kernel sees no input requiring grad and runs
    without autograd), and torch.func's differentiating transforms fail with torch's generic
    message about autograd.Function."""
    if _forward_ad_tangent(args):
        raise RuntimeError(
            f"cumo::{op}: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) "
            f"is not supported: the cumo ops define reverse-mode gradients only; {_SUPPORTED}"
        )
    interp = torch._C._functorch.peek_interpreter_stack()
    if interp is None or not torch.is_grad_enabled():
        return
    from torch._functorch.pyfunctorch import TransformType

    if interp.key() == TransformType.Grad and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        raise RuntimeError(
            f"cumo::{op}: torch.func.grad, vjp, jacrev and hessian are not supported (torch's custom ops "
            f"do not run under torch.func's differentiating transforms); {_SUPPORTED}"
        )


# An IMPL library of the cumo namespace holding the guards below (kept alive here).
_GUARDS = torch.library.Library("cumo", "IMPL")


def _autograd_kernel(op, qualname: str, key: str):
    """The autograd kernel torch.library registered for custom op `op`: as a Python function
    (built again from `op`'s registrations, as torch.library builds it) where this torch has the
    builder, else the dispatcher's kernel for `key`, called boxed (a second crossing into C++)."""
    try:
        from torch._library.autograd import make_autograd_impl

        return make_autograd_impl(op._opoverload, op)
    except (ImportError, AttributeError, TypeError):
        inner = torch._C._dispatch_get_computed_kernel_for_dispatch_key(qualname, key)
        return lambda keyset, *args, **kwargs: inner.call_boxed(keyset, *args, **kwargs)


def guard_autograd(op) -> None:
    """Put `refuse_unsupported_autograd` in front of custom op `op`'s autograd kernel on CPU and
    CUDA tensors (after its `register_autograd`): the kernel registered for AutogradCPU /
    AutogradCUDA takes precedence over the `Autograd` one that torch.library registered, checks,
    then runs it. Outside forward-mode AD and torch.func transforms the check is one attribute
    read and one C call (about 3 us per op call in all, measured on the CPU, benchmarks in the
    commit that added this).

    It reads torch's internals (the autograd kernel's builder, the dual level, the functorch
    interpreter stack) as torch.library itself does; should a torch release lack them, the ops
    work unguarded and this warns (import never fails for it)."""
    qualname = op._qualname
    name = qualname.split("::")[1]
    fwad = torch.autograd.forward_ad
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    if peek is None or not hasattr(fwad, "_current_level"):
        import warnings

        warnings.warn(
            f"cumo_kernels: this torch lacks the internals cumo::{name} reads to refuse forward-mode AD "
            "(its tangents would be zero)",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    for key in ("AutogradCPU", "AutogradCUDA"):
        inner = _autograd_kernel(op, qualname, key)

        def kernel(keyset, *args, _inner=inner, **kwargs):
            if fwad._current_level >= 0 or peek() is not None:
                refuse_unsupported_autograd(name, args)
            return _inner(keyset, *args, **kwargs)

        _GUARDS.impl(name, kernel, key, with_keyset=True)


def inference_only(op, training: str) -> None:
    """Register for custom op `op` an autograd formula that raises when a gradient reaches it (it
    has none: `moe_mlp` calls it only when no input needs a gradient), saying what to run for
    training (`training`), then guard it like every op (`guard_autograd`)."""
    name = op._qualname

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} is inference-only (it has no gradient formula): cumo_kernels.moe_mlp uses it only "
            f"when no input needs a gradient; for training run {training}"
        )

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
    guard_autograd(op)


def refuse_double_backward(op, forward: str) -> None:
    """Register for backward op `op` (the backward of cumo::`forward`) an autograd formula that
    raises, naming both, when a second derivative is asked for (create_graph=True, then
    differentiating the gradients): torch's own message names neither the layer nor what works."""
    name = op._qualname.split("::")[1]

    def setup(ctx, inputs, output) -> None:
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"cumo::{name}: double backward (a gradient of the gradients of cumo::{forward}: gradient "
            f"penalties, Hessians, create_graph=True then backward) is not supported: the cumo ops' "
            f"backward ops have no derivative of their own; {_SUPPORTED}"
        )

    op.register_autograd(backward, setup_context=setup)
    guard_autograd(op)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may need a backward: grad mode is on and an input requires grad, or a
    torch.func transform is active (under torch.vmap, tensors that require grad outside the
    transform do not report it inside)."""
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    return torch._C._are_functorch_transforms_active()


# ----------------------------------------------------------------------------- index validation


def validation_wanted(validate: object, device: torch.device) -> bool:
    """Whether a public op checks its index inputs' values: `validate` None means on CPU tensors
    (host memory: the check costs O(indices), no sync), True on any device (on CUDA one host
    sync), False never. Never under torch.compile or a torch.func transform (their tensors hold
    no data to read)."""
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate: expected None, True or False, got {type(validate).__name__}")
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return device.type == "cpu" if validate is None else validate


def _first(mask: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the first True of `mask` (one host sync on CUDA), or None."""
    if not bool(mask.any()):
        return None
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def check_offsets_values(offsets: torch.Tensor, rows: int) -> None:
    """offsets[0] = 0, non-decreasing, offsets[E] <= rows (rows offsets[E]:rows: dropped slots)."""
    from ..reference.grouped_linear import host_bounds

    host_bounds(offsets, rows)


def check_expert_ids_values(expert_ids: torch.Tensor, num_experts: int) -> None:
    """No negative id (an id >= E marks a dropped slot: allowed)."""
    at = _first(expert_ids < 0)
    if at is not None:
        raise ValueError(
            f"expert_ids: negative id {int(expert_ids[at])} at {list(at)}; expected ids in 0..E-1 = "
            f"0..{num_experts - 1}, or an id >= E = {num_experts} for a dropped slot"
        )


def check_sort_idx_values(sort_idx: torch.Tensor) -> None:
    """sort_idx is a permutation of 0..M-1 (as `permute` returns it)."""
    m = sort_idx.numel()
    at = _first((sort_idx < 0) | (sort_idx >= m))
    if at is None:
        counts = torch.bincount(sort_idx, minlength=m)
        dup = _first(counts != 1)
        if dup is None:
            return
        msg = f"slot {dup[0]} appears {int(counts[dup])} times"
    else:
        msg = f"entry {at[0]} is {int(sort_idx[at])}, outside 0..{m - 1}"
    raise ValueError(f"sort_idx: expected a permutation of 0..T*k-1 (as permute returns it), but {msg}")
