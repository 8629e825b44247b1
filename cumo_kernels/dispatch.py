"""Backend choice: "auto" | "cuda" | "triton" | "torch", once per call.

Order of precedence: the `backend=` argument, else the environment variable
`CUMO_KERNELS_BACKEND`, else "auto". `choose` returns one concrete backend for the whole call
from each candidate's `not_supported_reasons` (the contract: cumo_kernels.backend): an explicitly
requested backend that cannot run raises with its reasons; "auto" takes the first candidate
without reasons, in its measured order on a GPU where one exists (cumo_kernels.tuning), else in
`_AUTO_ORDER`; when none can, the error lists every candidate's reasons.
Nothing here initialises CUDA or imports a backend at import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from . import tuning
from .backend import Call, Unsupported, required_ops

__all__ = ["BACKENDS", "ENV_VAR", "Unsupported", "available_backends", "choose", "implementation", "op"]

BACKENDS: tuple[str, ...] = ("auto", "cuda", "triton", "torch")
ENV_VAR = "CUMO_KERNELS_BACKEND"


@dataclass
class Backend:
    """A registered backend: its name and how to import its module (the contract's functions),
    imported once, at its first use."""

    name: str
    load: Callable[[], ModuleType]
    _module: ModuleType | None = field(default=None, repr=False, compare=False)

    def module(self) -> ModuleType:
        mod = self._module
        if mod is None:
            mod = self._module = self.load()
        return mod


def _module_loader(module: str) -> Callable[[], ModuleType]:
    return lambda: importlib.import_module(module)


_REGISTRY: dict[str, Backend] = {
    "cuda": Backend("cuda", _module_loader("cumo_kernels.cuda")),
    "triton": Backend("triton", _module_loader("cumo_kernels.triton")),
    "torch": Backend("torch", _module_loader("cumo_kernels.reference")),
}
# The order "auto" tries them in on CUDA tensors where no measurement applies (cumo_kernels.tuning:
# a layer call whose shape and pass a GPU benchmark run measured follows that run's order).
# benchmarks/NOTES.md says why Triton comes first.
_AUTO_ORDER: tuple[str, ...] = ("triton", "cuda", "torch")


def resolve_name(backend: str | None) -> str:
    """The requested backend's name: the argument, else $CUMO_KERNELS_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if not isinstance(name, str) or name not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
    return name


def implementation(name: str) -> ModuleType:
    """The module of concrete backend `name` (its op functions, COMPOSITION, FEATURES)."""
    entry = _REGISTRY[name]
    return entry._module or entry.module()


def op(backend: str, name: str) -> Callable:
    """Backend `backend`'s function for op `name`; for an op its composition and features do not
    include, an error that says so (never the torch twin in its place)."""
    fn = getattr(implementation(backend), name, None)
    if fn is None:
        raise NotImplementedError(
            f"the {backend} backend does not provide the op {name!r}: its composition and features do "
            f"not include it (cumo_kernels.backend); run it with a backend that does, e.g. backend='torch'"
        )
    return fn


def reasons(name: str, call: Call) -> list[str]:
    """Every reason concrete backend `name` cannot run `call` (empty: it can), its import included."""
    try:
        mod = implementation(name)
    except ImportError as exc:
        return [f"the {name} backend cannot be imported: {exc}"]
    check = getattr(mod, "not_supported_reasons", None)
    if check is None:
        return [f"{mod.__name__} defines no not_supported_reasons(call) (an incomplete installation?)"]
    return list(check(call))


def _auto_candidates(device: torch.device, workload: tuning.Workload | None) -> tuple[str, ...]:
    """auto's candidates, in order: on CPU tensors the torch backend only (the Triton interpreter
    is for tests); on CUDA the measured order for `workload` where the measurement table
    (cumo_kernels.tuning) has one, then the backends it leaves out; else _AUTO_ORDER."""
    if device.type == "cpu":
        return ("torch",)
    measured = tuning.measured_order(device, workload) if device.type == "cuda" and workload is not None else None
    if not measured:
        return _AUTO_ORDER
    return tuple(measured) + tuple(b for b in _AUTO_ORDER if b not in measured)


@torch.compiler.assume_constant_result
def _choose(
    requested: str,
    device: torch.device,
    dtype: torch.dtype | None,
    num_experts: int | None,
    op_name: str | None,
    workload: tuning.Workload | None,
) -> str:
    """`choose` past the name's resolution: a constant to torch.compile (which cannot trace the
    import of a backend module); the arguments are the call's description."""
    call = Call(device, dtype, num_experts, op_name)
    if requested != "auto":
        why = reasons(requested, call)
        if why:
            raise RuntimeError(f"backend={requested!r} cannot run {call.describe()}: " + "; ".join(why))
        return requested
    refused = []
    for cand in _auto_candidates(device, workload):
        why = reasons(cand, call)
        if not why:
            return cand
        refused.append(f"{cand}: " + "; ".join(why))
    raise RuntimeError(f"no backend can run {call.describe()}: " + " | ".join(refused))


def choose(
    backend: str | None,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    num_experts: int | None = None,
    *,
    op: str | None = None,
    workload: tuning.Workload | None = None,
) -> str:
    """The one concrete backend ("cuda", "triton" or "torch") that runs this call, chosen once.

    backend: the request (None: $CUMO_KERNELS_BACKEND, else "auto"). The call: its `device`,
    activation `dtype`, `num_experts` and the public `op` it runs (None: a whole layer);
    `workload`: a layer call's shape and pass, for auto's measured order on a GPU.

    Raises RuntimeError when an explicitly requested backend cannot run the call, with its
    reasons; under "auto" when no backend can, with every candidate's reasons.
    """
    return _choose(resolve_name(backend), torch.device(device), dtype, num_experts, op, workload)


@torch.compiler.assume_constant_result
def composition(name: str) -> str:
    """Concrete backend `name`'s COMPOSITION (cumo_kernels.backend.COMPOSITIONS); a constant to
    torch.compile."""
    return implementation(name).COMPOSITION


@torch.compiler.assume_constant_result
def has_feature(name: str, feature: str) -> bool:
    """Whether concrete backend `name` declares `feature` (cumo_kernels.backend.FEATURES_OPS); a
    constant to torch.compile."""
    return feature in implementation(name).FEATURES


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here, on `device`'s type if given, else on any device type.

    "triton" is listed for CPU tensors only under TRITON_INTERPRET=1 (tests); "cuda" needs the
    built extension and a device.
    """
    types = [torch.device(device).type] if device is not None else ["cpu", "cuda"]
    return [n for n in _AUTO_ORDER if any(not reasons(n, Call(torch.device(t))) for t in types)]


def missing_ops(name: str) -> list[str]:
    """The ops concrete backend `name`'s COMPOSITION and FEATURES require and its module lacks."""
    mod = implementation(name)
    return [o for o in required_ops(mod.COMPOSITION, mod.FEATURES) if not callable(getattr(mod, o, None))]
