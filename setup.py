"""Build script of cumo-kernels.

torch is never imported here: it is a runtime dependency only, so `pip install .` works under
build isolation. The CUDA extension `cumo_kernels._cuda` (pybind11, compiled with nvcc, no torch
ABI; ../shared/DESIGN.md) is built from csrc/ when nvcc is found and CUMO_SKIP_CUDA_BUILD is not
set; without nvcc the package installs without it and says so.

Switches (environment):
    CUMO_CUDA_ARCHS       ";"-separated archs, default "80;90a" (sm80 path, sm90a CUTLASS path)
    CUMO_SKIP_CUDA_BUILD  1: install without the extension
    MAX_JOBS              parallel compile jobs (default: CPU count, at most 4 per 8 GB is not checked)
    CUDA_HOME             CUDA toolkit root (default: from nvcc on PATH)
    CUTLASS_INCLUDE_DIR   CUTLASS headers (default: the nvidia-cutlass package's, found without importing it)

The build is a ninja file written by `CudaBuildExt` below (torch's BuildExtension would import
torch): each .cu is compiled by nvcc with one -gencode per arch, bindings.cpp by the host
compiler, and the module is linked by the host compiler against the static CUDA runtime, with no
libcuda, so it imports on a machine without a GPU driver.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"
# Sources compiled only for some archs: file-name prefix -> a test of the arch. The CUTLASS sm90
# kernels need sm_90a, the CUTLASS 2.x sm80 ones are for the 8.x archs; everything else is built
# for every arch in the list.
ARCH_ONLY: dict[str, tuple[str, str]] = {"cutlass_sm90": ("90a", "sm_90a"), "cutlass_sm80": ("8", "8.x archs")}


def _arch_only(name: str) -> tuple[str, str] | None:
    """(arch prefix, description) for sources built only for some archs, else None."""
    return next((rule for prefix, rule in ARCH_ONLY.items() if name.startswith(prefix)), None)


def _say(msg: str) -> None:
    print(f"cumo-kernels: {msg}", file=sys.stderr, flush=True)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cudart_dir(cuda_home: Path) -> Path:
    """The folder holding libcudart_static.a (lib64, lib or targets/*/lib of the toolkit)."""
    homes = [cuda_home, Path("/usr/local/cuda")]
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        homes.insert(0, Path(env))
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (home / sub / "libcudart_static.a").exists():
                return home / sub
    raise SystemExit(f"cumo-kernels: libcudart_static.a not found under {[str(h) for h in homes]}: set CUDA_HOME")


def _cuda_build_plan() -> str | None:
    """Why the extension is not built, or None when it should be."""
    if os.environ.get("CUMO_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "CUMO_SKIP_CUDA_BUILD is set"
    if not sorted(CSRC.glob("*.cu")):
        return "csrc/ holds no CUDA sources"
    if _nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _package_dir(name: str) -> Path | None:
    """A package's directory, found without importing it (cutlass_library's import pulls scipy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _cutlass_includes() -> list[Path]:
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    lib = _package_dir("cutlass_library")
    if lib is None:
        raise SystemExit(
            "cumo-kernels: CUTLASS headers not found: pip install nvidia-cutlass (a build requirement) "
            "or set CUTLASS_INCLUDE_DIR"
        )
    return [lib / "source" / "include", lib / "source" / "tools" / "util" / "include"]


def _pybind11_include() -> Path:
    pkg = _package_dir("pybind11")
    if pkg is None or not (pkg / "include").is_dir():
        raise SystemExit("cumo-kernels: pybind11 not found: pip install pybind11 (a build requirement)")
    return pkg / "include"


def _ninja() -> str:
    exe = shutil.which("ninja")
    if exe:
        return exe
    pkg = _package_dir("ninja")
    if pkg is not None:
        for cand in (pkg / "data" / "bin" / "ninja", pkg / "bin" / "ninja"):
            if cand.exists():
                return str(cand)
    raise SystemExit("cumo-kernels: ninja not found: pip install ninja (a build requirement)")


def _archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("CUMO_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    for a in archs:
        if not a[:2].isdigit():
            raise SystemExit(f"cumo-kernels: CUMO_CUDA_ARCHS: {a!r} is not an arch like 80 or 90a")
    return archs


def _jobs() -> int:
    env = os.environ.get("MAX_JOBS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


class CudaBuildExt(build_ext):
    """Builds cumo_kernels._cuda with a ninja file of its own (no torch at build time)."""

    def build_extension(self, ext: Extension) -> None:
        nvcc = _nvcc()
        cuda_home = Path(nvcc).resolve().parent.parent
        archs = _archs()
        build_dir = Path(self.build_temp).resolve() / "cumo_cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)

        includes = [CSRC, _pybind11_include(), *_cutlass_includes(), Path(sysconfig.get_paths()["include"])]
        inc = " ".join(f"-I{shlex.quote(str(p))}" for p in includes)
        defines = "-DNDEBUG " + shlex.quote(f'-DCUMO_ARCHS="{",".join(archs)}"')
        if "90a" in archs:
            defines += " -DCUMO_WITH_SM90"
        sm80 = [a for a in archs if a.startswith("8")]
        if sm80:
            defines += " " + shlex.quote(f'-DCUMO_SM80_ARCHS="{",".join(sm80)}"')
        nvcc_flags = (
            "-O3 -std=c++17 -lineinfo --expt-relaxed-constexpr -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
            "-Xcudafe --diag_suppress=177 " + defines
        )
        cxx = os.environ.get("CXX", "c++")
        cxx_flags = f"-O2 -std=c++17 -fPIC -fvisibility=hidden {defines}"
        lib_dir = _cudart_dir(cuda_home)

        def gencode(name: str) -> tuple[str, list[str]]:
            only = _arch_only(name)
            use = [a for a in archs if only is None or a.startswith(only[0])]
            return " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in use), use

        lines = [
            f"nvcc = {nvcc}",
            f"cxx = {cxx}",
            f"inc = {inc}",
            f"nvcc_flags = {nvcc_flags}",
            f"cxx_flags = {cxx_flags}",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags $inc $gencode -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in ($archs)",
            "rule cxx",
            "  command = $cxx $cxx_flags $inc -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            f"  command = $cxx -shared $in -o $out -L{shlex.quote(str(lib_dir))} -l:libcudart_static.a "
            "-ldl -lpthread -lrt",
            "  description = link $out",
        ]
        objects, plan = [], []
        for src in sorted(CSRC.glob("*.cu")):
            flags, use = gencode(src.name)
            if not use:
                plan.append(f"{src.name}: skipped (built for {_arch_only(src.name)[1]}; archs are {archs})")
                continue
            obj = build_dir / (src.stem + ".o")
            lines += [f"build {obj}: nvcc {src}", f"  gencode = {flags}", f"  archs = {','.join(use)}"]
            objects.append(obj)
            plan.append(f"{src.name}: nvcc for sm_{', sm_'.join(use)}")
        for src in sorted(CSRC.glob("*.cpp")):
            obj = build_dir / (src.stem + ".cpp.o")
            lines.append(f"build {obj}: cxx {src}")
            objects.append(obj)
            plan.append(f"{src.name}: host compiler")
        lines.append(f"build {out}: link {' '.join(str(o) for o in objects)}")
        lines.append(f"default {out}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        jobs = _jobs()
        _say(f"building the CUDA extension {ext.name} with {nvcc} for archs {';'.join(archs)}, {jobs} jobs:")
        for p in plan:
            _say(f"  {p}")
        start = time.time()
        subprocess.run([_ninja(), "-C", str(build_dir), "-j", str(jobs)], check=True)
        _say(f"built {out.name} in {time.time() - start:.0f} s")


_why_not = _cuda_build_plan()
if _why_not is not None:
    _say(f"installing without the CUDA extension: {_why_not}")
    ext_modules: list = []
else:
    _sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))]
    ext_modules = [Extension("cumo_kernels._cuda", sources=_sources)]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CudaBuildExt})
