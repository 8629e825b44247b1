"""Backend choice: "auto" | "cuda" | "triton" | "torch".

Order of precedence: the `backend=` argument, else the environment variable
`CUMO_KERNELS_BACKEND`, else "auto". An explicitly requested backend that cannot run raises a
RuntimeError that says why and what to do; "auto" takes the first backend that can.
Nothing here initialises CUDA at import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from . import tuning

BACKENDS: tuple[str, ...] = ("auto", "cuda", "triton", "torch")
ENV_VAR = "CUMO_KERNELS_BACKEND"


class Unsupported(RuntimeError):
    """Raised by a backend's op function, before it launches anything, for operands it cannot
    take (a dtype, a size, an alignment). Under "auto" the op then runs on the next backend that
    can; an explicitly requested backend lets it propagate (DESIGN.md: "auto falls back under
    misalignment, explicit cuda raises")."""


@dataclass(frozen=True)
class Backend:
    """One backend: `refusal(device)` returns None when it can run on that device type, else why not."""

    name: str
    refusal: Callable[[str], str | None]
    load: Callable[[], ModuleType]


def _torch_refusal(device_type: str) -> str | None:
    return None


def _load_torch() -> ModuleType:
    from . import reference

    return reference


def _module_backend(name: str, module: str) -> Backend:
    """A backend implemented by the module `module`, imported only when the backend is asked for.

    The module defines the op functions (the same names and signatures as `reference`) and
    `refusal(device_type) -> str | None`. A module that is not in this installation yet, or whose
    import fails (say triton is missing), refuses with the reason.
    """

    def load() -> ModuleType:
        return importlib.import_module(module)

    def refusal(device_type: str) -> str | None:
        try:
            mod = load()
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return f"the {name} backend is not part of this release yet; use backend='torch' or 'auto'"
            return f"the {name} backend cannot be imported: {exc}"
        except ImportError as exc:
            return f"the {name} backend cannot be imported: {exc}"
        check = getattr(mod, "refusal", None)
        if check is None:
            return f"{module} defines no refusal(device_type) (an incomplete installation?)"
        return check(device_type)

    return Backend(name, refusal, load)


_REGISTRY: dict[str, Backend] = {
    "cuda": _module_backend("cuda", "cumo_kernels.cuda"),
    "triton": _module_backend("triton", "cumo_kernels.triton"),
    "torch": Backend("torch", _torch_refusal, _load_torch),
}
# The order "auto" tries them in on CUDA tensors where no measurement applies (cumo_kernels.tuning:
# a layer call whose shape and pass a GPU benchmark run measured follows that run's order). No
# GPU has executed either kernel backend yet, and Triton comes first because CI executes its
# kernels (in Triton's interpreter, against the float64 oracle), while the CUDA extension's
# kernels are only compiled in CI.
_AUTO_ORDER: tuple[str, ...] = ("triton", "cuda", "torch")
# Backends whose op functions may raise Unsupported for particular operands (float64, too many
# experts, ...). When "auto" picks one of them, `select` returns "auto" and
# `implementation("auto")` tries the backends in order per call, falling back on Unsupported.
_OPERAND_FALLBACK: frozenset[str] = frozenset({"cuda", "triton"})


@torch.compiler.assume_constant_result
def _refusal(name: str, device_type: str) -> str | None:
    """`_REGISTRY[name].refusal(device_type)`, a constant to torch.compile (which cannot trace the
    import of a backend module)."""
    return _REGISTRY[name].refusal(device_type)


def resolve_name(backend: str | None) -> str:
    """The requested backend's name: the argument, else $CUMO_KERNELS_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if not isinstance(name, str) or name not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
    return name


def _auto_order(device: torch.device, workload: tuning.Workload | None) -> tuple[str, ...]:
    """auto's order on CUDA `device`: the measured order for `workload` where the measurement
    table (cumo_kernels.tuning) has one, then the backends it leaves out; else _AUTO_ORDER."""
    measured = tuning.measured_order(device, workload) if workload is not None else None
    if not measured:
        return _AUTO_ORDER
    return tuple(measured) + tuple(b for b in _AUTO_ORDER if b not in measured)


def _parse_auto(name: str) -> tuple[str, ...]:
    """The order of an "auto:<b1>,<b2>,..." name (as `select` returns it)."""
    order = tuple(name[len("auto:") :].split(","))
    if not order or any(b not in _REGISTRY for b in order) or len(set(order)) != len(order):
        raise ValueError(f"backend: {name!r} is not 'auto:' followed by distinct backends of {tuple(_REGISTRY)}")
    return order


def select(backend: str | None, device: torch.device, workload: tuning.Workload | None = None) -> str:
    """The backend ("cuda", "triton" or "torch") that runs on `device`, or "auto" when auto's
    choice is a backend that may refuse particular operands (then `implementation("auto")` falls
    back per call). Where `workload` (a layer call's shape and pass) has a measured order on this
    GPU (cumo_kernels.tuning), "auto" follows it, and the name returned may be "auto:<b1>,<b2>,..."
    (falling back per call in that order).

    Raises RuntimeError when an explicitly requested backend cannot run there, with the reason;
    "auto" falls back, and lists every backend's reason if none can run.
    """
    name = resolve_name(backend)
    dev = torch.device(device).type
    if name != "auto":
        why = _refusal(name, dev)
        if why is not None:
            raise RuntimeError(f"backend={name!r} cannot run on {dev} tensors: {why}")
        return name
    if dev == "cpu":
        # On CPU tensors "auto" is the torch backend: the Triton interpreter is for tests only.
        return "torch"
    order = _auto_order(torch.device(device), workload) if dev == "cuda" else _AUTO_ORDER
    reasons = []
    for cand in order:
        why = _refusal(cand, dev)
        if why is None:
            if cand not in _OPERAND_FALLBACK:
                return cand
            return "auto" if order == _AUTO_ORDER else "auto:" + ",".join(order)
        reasons.append(f"{cand}: {why}")
    raise RuntimeError(f"no backend can run on {dev} tensors: " + "; ".join(reasons))


class _AutoImplementation:
    """`implementation("auto")` where auto's choice may refuse operands (only on CUDA tensors:
    on CPU tensors auto is the torch backend). An op function tries, in auto's order, the
    backends that can run on its operands' device type and define it, and takes the first that
    does not raise Unsupported. Other attributes (flags such as FUSED_MOE) are those of auto's
    first choice, so "auto" behaves as that backend unless an operand is refused."""

    def __init__(self, order: tuple[str, ...]) -> None:
        self._order = order

    def _runnable(self, device_type: str) -> list[ModuleType]:
        return [_REGISTRY[c].load() for c in self._order if _REGISTRY[c].refusal(device_type) is None]

    def __getattr__(self, op: str):
        if op.startswith("__"):
            raise AttributeError(op)
        modules = self._runnable("cuda")
        if not modules:
            raise AttributeError(op)
        first = getattr(modules[0], op, None)
        if first is not None and not callable(first):
            return first
        if not any(callable(getattr(m, op, None)) for m in modules):
            raise AttributeError(f"no backend auto can choose defines {op!r}")

        def run(*args, **kwargs):
            dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cuda")
            reasons = []
            for mod in self._runnable(dev):
                fn = getattr(mod, op, None)
                if not callable(fn):
                    continue
                try:
                    return fn(*args, **kwargs)
                except Unsupported as exc:
                    reasons.append(str(exc))
            raise RuntimeError(f"no backend can run {op} on these {dev} operands: " + "; ".join(reasons))

        return run


_AUTO_IMPLEMENTATIONS: dict[tuple[str, ...], _AutoImplementation] = {}


def implementation(name: str) -> ModuleType | _AutoImplementation:
    """The module that implements backend `name` (functions named after the ops); for "auto" or
    "auto:<b1>,<b2>,..." (see `select`), an object whose functions fall back from backend to
    backend per call, in auto's static order or the given one."""
    if name == "auto" or name.startswith("auto:"):
        order = _AUTO_ORDER if name == "auto" else _parse_auto(name)
        if order not in _AUTO_IMPLEMENTATIONS:
            _AUTO_IMPLEMENTATIONS[order] = _AutoImplementation(order)
        return _AUTO_IMPLEMENTATIONS[order]
    return _REGISTRY[name].load()


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here, on `device`'s type if given, else on any device type.

    "triton" is listed for CPU tensors only under TRITON_INTERPRET=1 (tests); "cuda" needs the
    built extension and a device.
    """
    types = [torch.device(device).type] if device is not None else ["cpu", "cuda"]
    return [n for n in _AUTO_ORDER if any(_REGISTRY[n].refusal(t) is None for t in types)]
