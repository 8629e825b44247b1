"""Every Triton kernel of the backend compiles for the GPUs it targets (sm90 and sm80, through
ptxas, which the triton wheel ships), without a GPU: what the interpreter runs in CI is also code
the real compiler accepts (loop-carried types, dot shapes and dtypes, constexpr branches).

One representative variant per kernel and option set, in bf16 (the dtype the interpreter cannot
run) and fp32 (ieee dot). Runs in the plain (not interpreted) test run: under TRITON_INTERPRET=1
the kernels are interpreted functions and cannot be handed to the compiler.

Also the GEMM kernels' shared memory for sm90, compiled with every config of the autotune set:
the estimate the autotuner prunes by is an upper bound, and what the prune keeps fits.
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

gg = importlib.import_module("cumo_kernels.triton.grouped_linear")
tma = importlib.import_module("cumo_kernels.triton.grouped_linear_tma")
rt = importlib.import_module("cumo_kernels.triton.routing")
pm = importlib.import_module("cumo_kernels.triton.permute")
glu = importlib.import_module("cumo_kernels.triton.grouped_linear_glu")

_I64 = {"offsets_ptr", "idx_ptr", "ids_ptr", "sort_ptr", "inv_ptr"}
_F32 = {"ps_part", "fc_part", "z_part", "ps_ptr", "fc_ptr", "z_ptr", "gp_ptr", "gz_ptr"}
_T = dict(BM=64, BN=64, BK=32, GROUP_M=8)
_NO_GLU = dict(GLU=0, INTERLEAVED=False)

# (kernel name, constexprs)
VARIANTS = [
    (
        "_grouped_linear_kernel",
        dict(HAS_BIAS=True, ACT=2, GATHER=True, SCATTER=False, STORE_PRE=True, PREC="ieee", **_T),
    ),
    (
        "_grouped_linear_kernel",
        dict(HAS_BIAS=True, ACT=0, GATHER=False, SCATTER=True, STORE_PRE=False, PREC="ieee", **_T),
    ),
    (
        "_grouped_linear_tma_kernel",
        dict(HAS_BIAS=True, ACT=1, GATHER=True, SCATTER=False, STORE_PRE=True, PREC="ieee", **_T),
    ),
    (
        "_grouped_linear_tma_kernel",
        dict(HAS_BIAS=True, ACT=0, GATHER=False, SCATTER=True, STORE_PRE=False, PREC="ieee", **_T),
    ),
    ("_grouped_linear_dx_kernel", dict(GATHER_G=False, SCATTER=True, GW=False, **_NO_GLU, PREC="ieee", **_T)),
    ("_grouped_linear_dx_kernel", dict(GATHER_G=True, SCATTER=False, GW=True, **_NO_GLU, PREC="ieee", **_T)),
    # gated experts (issue 23): fc2's dX with the gated derivative in its epilogue, the gated forward
    (
        "_grouped_linear_dx_kernel",
        dict(GATHER_G=True, SCATTER=False, GW=True, GLU=4, INTERLEAVED=False, PREC="ieee", **_T),
    ),
    (
        "_grouped_linear_dx_kernel",
        dict(GATHER_G=True, SCATTER=False, GW=True, GLU=7, INTERLEAVED=True, PREC="ieee", **_T),
    ),
    (
        "_glu_fwd_kernel",
        dict(HAS_BIAS=True, ACT=4, GATHER=True, SCATTER=False, STORE_PRE=True, PREC="ieee", INTERLEAVED=False, **_T),
    ),
    (
        "_glu_fwd_kernel",
        dict(HAS_BIAS=False, ACT=7, GATHER=False, SCATTER=False, STORE_PRE=False, PREC="ieee", INTERLEAVED=True, **_T),
    ),
    ("_glu_grad_kernel", dict(ACT=7, INTERLEAVED=True, BLOCK=1024)),
    ("_grouped_linear_dw_kernel", dict(HAS_BIAS=True, GATHER_X=True, GATHER_G=False, PREC="ieee", **_T)),
    ("_grouped_linear_dw_kernel", dict(HAS_BIAS=True, GATHER_X=False, GATHER_G=True, PREC="ieee", **_T)),
    ("_act_grad_kernel", dict(ACT=2, BLOCK=1024)),
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
    for mod in (gg, tma, rt, pm, glu):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def _compile(name: str, consts: dict, dtype: str, arch: int, options: dict | None = None, aligned: bool = False):
    """The compiled kernel; `aligned`: as Triton specialises a launch whose pointers are 16-byte
    aligned and whose N and K are multiples of 16 (wider loads, the pipeliner's async copies)."""
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
    attrs = {}
    if aligned:
        div16 = [["tt.divisibility", 16]]
        attrs = {(i,): div16 for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or a in ("N", "K")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = options or {"num_warps": 4, "num_stages": 3}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


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


# The GEMM variants the ops launch, by the autotuned kernel whose estimate covers them (grouped
# linear: plain; the fused gather / combine ops and their backward: GATHER, SCATTER, GATHER_G, GW).
# The forward's variants differ only in the epilogue, and take the same memory (measured): one
# non-TMA forward; the TMA forward with A gathered and through TMA.
_GEMM = [
    ("forward", "_grouped_linear_kernel", dict(HAS_BIAS=True, ACT=1, GATHER=True, SCATTER=False, STORE_PRE=True)),
    ("forward", "_grouped_linear_tma_kernel", dict(HAS_BIAS=True, ACT=1, GATHER=True, SCATTER=False, STORE_PRE=True)),
    ("forward", "_grouped_linear_tma_kernel", dict(HAS_BIAS=True, ACT=0, GATHER=False, SCATTER=True, STORE_PRE=False)),
    ("dX", "_grouped_linear_dx_kernel", dict(GATHER_G=False, SCATTER=True, GW=False, **_NO_GLU)),
    ("dX", "_grouped_linear_dx_kernel", dict(GATHER_G=True, SCATTER=False, GW=True, **_NO_GLU)),
    ("dX", "_grouped_linear_dx_kernel", dict(GATHER_G=False, SCATTER=False, GW=False, **_NO_GLU)),
    ("dX", "_grouped_linear_dx_kernel", dict(GATHER_G=True, SCATTER=False, GW=True, GLU=7, INTERLEAVED=True)),
    (
        "glu_forward",
        "_glu_fwd_kernel",
        dict(HAS_BIAS=True, ACT=4, GATHER=True, SCATTER=False, STORE_PRE=True, INTERLEAVED=False),
    ),
    ("dW", "_grouped_linear_dw_kernel", dict(HAS_BIAS=True, GATHER_X=True, GATHER_G=False)),
    ("dW", "_grouped_linear_dw_kernel", dict(HAS_BIAS=True, GATHER_X=False, GATHER_G=True)),
    ("dW", "_grouped_linear_dw_kernel", dict(HAS_BIAS=False, GATHER_X=False, GATHER_G=False)),
]
# (dtype, dot precision, aligned): fp32 with ieee and tf32 dots (TF32 allowed), bf16; fp32 also
# unaligned (a few of its kernels take a little more memory so). No fp16: it compiled to exactly
# bf16's shared memory for every variant and config, on triton 3.6 and 3.9 alike (same element
# size and MMA shapes), and CI runs this test on both.
_DOTS = [
    ("fp32", "ieee", True),
    ("fp32", "tf32", True),
    ("bf16", "ieee", True),
    ("fp32", "ieee", False),
    ("fp32", "tf32", False),
]
_ELT = {"fp32": 4, "fp16": 2, "bf16": 2}
_ESTIMATES = {**gg.SMEM_ESTIMATES, "glu_forward": glu.smem_glu_fwd}


def _gemm_configs(name: str, consts: dict) -> list:
    """The autotune set a GEMM variant launches with (the gated ones: register-limited subsets)."""
    if consts.get("GLU"):
        return gg.glu_dx_configs()
    if name == "_glu_fwd_kernel":
        return glu.glu_fwd_configs()
    return gg._configs()


def _gemm_id(v) -> str:
    flags = "-".join(k.lower() for k, val in v[2].items() if val and k not in ("HAS_BIAS", "STORE_PRE"))
    return f"{v[1].strip('_').removesuffix('_kernel')}-{flags or 'plain'}"


@pytest.mark.slow
@pytest.mark.parametrize("dot", _DOTS, ids=lambda d: f"{d[0]}-{d[1]}-{'aligned' if d[2] else 'unaligned'}")
@pytest.mark.parametrize("variant", _GEMM, ids=_gemm_id)
def test_gemm_shared_memory_estimate_sm90(variant, dot):
    """Each config of the autotune set, compiled for sm90: the kernel's shared memory (the compiled
    metadata's `shared`) is at most the estimate the autotuner prunes by, and at most sm90's
    limit for every config the prune keeps in this dtype."""
    from cumo_kernels.triton import _common

    kernel, name, consts = variant
    dtype, prec, aligned = dot
    est, elt, limit = _ESTIMATES[kernel], _ELT[dtype], _common.SMEM_SM90
    configs = _gemm_configs(name, consts)
    kept = [_common.config_meta(c) for c in _common.smem_fits(configs, est, elt, limit)]
    failures, table = [], []
    for cfg in configs:
        meta = _common.config_meta(cfg)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        shared = _compile(
            name, {**consts, "PREC": prec, "GROUP_M": 8, **cfg.kwargs}, dtype, 90, opts, aligned
        ).metadata.shared
        want = est(meta, elt)
        table.append(f"{cfg.kwargs} stages={cfg.num_stages}: {shared} B (estimate {want}, kept {meta in kept})")
        if shared > want:
            failures.append(f"{table[-1]}: over the estimate")
        if meta in kept and shared > limit:
            failures.append(f"{table[-1]}: kept by the prune, over the {limit} B limit")
    assert not failures, f"{kernel} kernel {name} {consts} {dtype} {prec}:\n" + "\n".join(failures + ["all:"] + table)


ROUTING_VARIANTS = [
    ("_route_kernel", dict(BT=64, BE=4)),
    ("_route_x_kernel", dict(PREC="ieee", BT=64, BE=16, BD=64)),
    ("_route_bwd_kernel", dict(BT=64, BE=4)),
    ("_route_x_bwd_kernel", dict(PREC="ieee", BT=64, BE=16, BD=64)),
]


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("name,consts", ROUTING_VARIANTS, ids=[v[0] for v in ROUTING_VARIANTS])
def test_routing_divides_with_ieee_rounding(name, consts, topk):
    """The routing kernels divide with div.rn.f32, never Triton's default div.full.f32 (up to 2 ulp
    off): for k = 1 the renormalised weight sel / sel must be exactly 1, else its rounding noise,
    times <y_slot, grad_out>, reaches the gate's gradient (the first GPU run: 2.5e-5 relative error
    in float32 at k = 1, tolerance 1e-5); and float32 probabilities must tie where torch's do."""
    ptx = _compile(name, dict(consts, TOPK=topk), "fp32", 90).asm["ptx"]
    assert "div.full.f32" not in ptx, f"{name}: approximate float32 division in the PTX"
    assert "div.rn.f32" in ptx


def _ptxas_spills(ptx: str, arch: str = "sm_90a") -> tuple[int, int, str]:
    """(spill store bytes, spill load bytes, ptxas's -v report) of a kernel's PTX, through the
    ptxas the triton wheel ships (what the GPU build would run)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run(
            [get_ptxas(90).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    report = proc.stderr
    stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", report))
    loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", report))
    return stores, loads, report


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("variant", _GEMM, ids=_gemm_id)
def test_gemm_configs_do_not_spill_sm90(variant, dtype):
    """Every config of the autotune set in bf16 and fp16, compiled for sm90 with the divisibility a
    GPU launch has: ptxas (the triton wheel's, -v) reports no register spill."""
    _, name, consts = variant
    failures = []
    for cfg in _gemm_configs(name, consts):
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        k = _compile(name, {**consts, "PREC": "ieee", "GROUP_M": 8, **cfg.kwargs}, dtype, 90, opts, True)
        stores, loads, report = _ptxas_spills(k.asm["ptx"])
        if stores or loads:
            failures.append(f"{cfg.kwargs} stages={cfg.num_stages}: {stores} B spill stores, {loads} B spill loads")
    assert not failures, f"{name} {consts} spills:\n" + "\n".join(failures)
