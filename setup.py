"""Build script of cumo-kernels.

torch is never imported here: it is a runtime dependency only, so `pip install .` works under
build isolation. The CUDA extension `cumo_kernels._cuda` (pybind11, compiled with nvcc, no torch
ABI; ../shared/DESIGN.md) is built from csrc/*.cu when it has sources, nvcc is found and
CUMO_SKIP_CUDA_BUILD is not set. Switches: CUMO_CUDA_ARCHS (default "80;90a"),
CUMO_SKIP_CUDA_BUILD=1, MAX_JOBS.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_build_plan() -> str | None:
    """Why the extension is not built, or None when it should be."""
    if os.environ.get("CUMO_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "CUMO_SKIP_CUDA_BUILD is set"
    if not sorted((ROOT / "csrc").glob("*.cu")):
        return "csrc/ holds no CUDA sources in this release"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


_why_not = _cuda_build_plan()
if _why_not is not None:
    print(f"cumo-kernels: installing without the CUDA extension: {_why_not}", file=sys.stderr)
    ext_modules: list = []
else:  # pragma: no cover - the extension arrives with the CUDA backend
    raise SystemExit("cumo-kernels: csrc/ has CUDA sources but this setup.py has no builder for them yet")

setup(ext_modules=ext_modules)
