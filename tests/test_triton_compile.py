"""Every Triton kernel of the backend compiles for the GPUs it targets (sm90 and sm80, through
ptxas, which the triton wheel ships), without a GPU: what the interpreter runs in CI is also code
the real compiler accepts (loop-carried types, dot shapes and dtypes, constexpr branches).

One representative variant per kernel and option set, in bf16 (the dtype the interpreter cannot
run) and fp32 (ieee dot). Runs in the plain (not interpreted) test run: under TRITON_INTERPRET=1
the kernels are interpreted functions and cannot be handed to the compiler.
"""

from __future__ import annotations

import importlib
import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("kernels are interpreted in this process; the plain test run compiles them", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

gg = importlib.import_module("cumo_kernels.triton.grouped_gemm")
rt = importlib.import_module("cumo_kernels.triton.routing")
pm = importlib.import_module("cumo_kernels.triton.permutation")

_I64 = {"offsets_ptr", "idx_ptr", "ids_ptr", "sort_ptr", "inv_ptr"}
_F32 = {"ps_part", "fc_part", "z_part", "ps_ptr", "fc_ptr", "z_ptr", "gp_ptr", "gz_ptr"}
_T = dict(BM=64, BN=64, BK=32)

# (kernel name, constexprs)
VARIANTS = [
    ("_grouped_fwd_kernel", dict(HAS_BIAS=True, ACT=2, GATHER=True, SCATTER=False, STORE_PRE=True, PREC="ieee", **_T)),
    ("_grouped_fwd_kernel", dict(HAS_BIAS=True, ACT=0, GATHER=False, SCATTER=True, STORE_PRE=False, PREC="ieee", **_T)),
    (
        "_grouped_fwd_tma_kernel",
        dict(HAS_BIAS=True, ACT=1, GATHER=True, SCATTER=False, STORE_PRE=True, PREC="ieee", **_T),
    ),
    (
        "_grouped_fwd_tma_kernel",
        dict(HAS_BIAS=True, ACT=0, GATHER=False, SCATTER=True, STORE_PRE=False, PREC="ieee", **_T),
    ),
    ("_grouped_dx_kernel", dict(ACT=1, GATHER_G=False, SCATTER=True, GW=False, PREC="ieee", **_T)),
    ("_grouped_dx_kernel", dict(ACT=0, GATHER_G=True, SCATTER=False, GW=True, PREC="ieee", **_T)),
    ("_grouped_dw_kernel", dict(HAS_BIAS=True, ACT=3, GATHER_X=True, GATHER_G=False, PREC="ieee", **_T)),
    ("_grouped_dw_kernel", dict(HAS_BIAS=True, ACT=0, GATHER_X=False, GATHER_G=True, PREC="ieee", **_T)),
    ("_route_x_kernel", dict(TOPK=2, PREC="ieee", BT=64, BE=16, BD=64)),
    ("_route_kernel", dict(TOPK=2, BT=64, BE=4)),
    ("_route_reduce_kernel", dict(BE=16)),
    ("_route_bwd_kernel", dict(TOPK=2, BT=64, BE=4)),
    ("_route_x_bwd_kernel", dict(TOPK=2, PREC="ieee", BT=64, BE=16, BD=64)),
    ("_dgate_kernel", dict(PREC="ieee", BT=64, BE=16, BD=64)),
    ("_dgate_reduce_kernel", dict(BLOCK=1024)),
    ("_hist_kernel", dict(BS=512, BE=4)),
    ("_sort_scatter_kernel", dict(BS=512, BE=4)),
    ("_gather_rows_kernel", dict(BR=32, BC=128)),
    ("_invert_kernel", dict(BR=512)),
    ("_slot_sum_kernel", dict(INDIRECT=True, HAS_W=True, BR=32, BC=128)),
    ("_unpermute_bwd_kernel", dict(BR=32, BC=128)),
]


def _kernel(name: str):
    for mod in (gg, rt, pm):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def _compile(name: str, consts: dict, dtype: str, arch: int) -> None:
    fn = _kernel(name)
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg == "a_desc":
            sig[arg] = f"tensordesc<{dtype}[{consts['BM']},{consts['BK']}]>"
        elif arg == "w_desc":
            sig[arg] = f"tensordesc<{dtype}[{consts['BN']},{consts['BK']}]>"
        elif arg.endswith(("_ptr", "_part")):
            sig[arg] = (
                "*i64" if arg in _I64 else "*i32" if arg == "hist_ptr" else "*fp32" if arg in _F32 else f"*{dtype}"
            )
        else:
            sig[arg] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})


def _variants(arch: int) -> list:
    # TMA descriptors exist from sm90 on; the TMA forward is never chosen below it.
    return [v for v in VARIANTS if arch >= 90 or "tma" not in v[0]]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_triton_kernels_compile_for_gpus(arch, dtype):
    failures = []
    for name, consts in _variants(arch):
        try:
            _compile(name, consts, dtype, arch)
        except Exception as exc:  # noqa: BLE001 - collect every kernel's failure
            failures.append(f"{name} {consts}: {type(exc).__name__}: {str(exc)[:800]}")
    assert not failures, f"kernels that do not compile for sm{arch} {dtype}:\n" + "\n".join(failures)
