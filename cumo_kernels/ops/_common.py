"""Checks shared by the public ops (each error names the argument, what was given and what is
accepted), and the lookup of an op's implementation in a backend."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
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


def impl_or_twin(backend: str, name: str):
    """Backend `backend`'s function `name`, or its torch twin in `cumo_kernels.reference` when the
    backend module does not define it (optional ops: the fused ones, `expert_mlp`)."""
    from .. import dispatch, reference

    return getattr(dispatch.implementation(backend), name, None) or getattr(reference, name)
