"""The benchmark CLI and the GPU suite's tooling, as far as a CPU allows.

The GPU timings themselves can only come from a lent GPU (benchmarks/gpu_suite.sh); here we
check that the CLI runs end to end on the CPU path, that every provider computes the same
block, that the result file passes its schema (and the schema rejects broken files), and that
the suite's log parsers never call a refused or unfinished sanitizer run "clean".
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import oracle
import pytest
import torch

from benchmarks import schema, suite_tools
from benchmarks.cli import junit_counts
from benchmarks.cli import main as bench_main
from benchmarks.providers import grouped_mm_forward, loop_forward, make_call, make_inputs, providers_for
from benchmarks.shapes import NAMED, parse_shape, quick, with_tokens
from benchmarks.timing import bench_interleaved
from cumo_kernels.testing import assert_close_rel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_quick_cpu_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench_main(
        [
            "--quick",
            "--device",
            "cpu",
            "--shapes",
            "connector-infer",
            "--providers",
            "cumo-torch,cumo-loop,grouped_mm,dense",
            "--reps",
            "1",
            "--no-ceilings",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "No CUDA device in use" in text and "GPU figures need a GPU" in text
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == []
    assert doc["complete"] is True and doc["device_type"] == "cpu"
    rows = {(r["pass"], r["provider"]) for r in doc["results"]}
    for p in ("fwd", "fwd+bwd"):
        for prov in ("cumo-torch", "cumo-loop", "grouped_mm", "dense"):
            assert (p, prov) in rows, (p, prov)
    for r in doc["results"]:
        assert r["ms"] > 0 and r["tflops"] > 0
        if r["pass"] == "fwd" and r["provider"] != "dense":
            assert r["rel_err_vs_loop"] < 1e-5, r


def test_cli_gated_shape_cpu_end_to_end(tmp_path):
    """A gated shape (issue 23) through the CLI at a tiny scale: every provider runs both passes
    on gated experts (none skipped), the error column agrees with the loop, and the result
    document says the shape is gated, with the gated FLOPs."""
    out = tmp_path / "r.json"
    provs = ["cumo-torch", "cumo-loop", "grouped_mm", "dense", "dense-mlp", "hf-eager"]
    argv = ["--quick", "--device", "cpu", "--shapes", "olmoe", "--tokens", "256", "--providers", ",".join(provs)]
    assert bench_main([*argv, "--reps", "1", "--no-ceilings", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["complete"] is True
    assert doc["skipped"] == [], doc["skipped"]
    name = "olmoe@T256@quick"
    info = doc["shapes"][name]
    assert info["glu"] is True and info["bias"] is False and info["w1_rows"] == 2 * info["hidden"]
    t, k, d_in, hid, d_out = info["tokens"], info["top_k"], info["in"], info["hidden"], info["out"]
    assert (t, k, info["experts"]) == (8, 8, 64)  # 256 tokens / 32, the quick scale
    assert info["flops_fwd"] == 2.0 * t * k * (d_in * 2 * hid + hid * d_out)
    rows = {(r["pass"], r["provider"]): r for r in doc["results"]}
    assert set(rows) == {(p, prov) for p in ("fwd", "fwd+bwd") for prov in provs}
    for (p, prov), r in rows.items():
        assert r["shape"] == name and r["ms"] > 0
        assert r["frac_dense"] is not None and r["speedup_vs_hf-eager"] is not None
        if p == "fwd" and not prov.startswith("dense"):
            assert r["rel_err_vs_loop"] < 1e-5, r


@pytest.mark.parametrize("name", ["olmoe", "gpt-oss"])
def test_gated_providers_match_the_oracle(name):
    """Every provider that runs a gated shape computes the block of the float64 oracle
    (tests/oracle.py, moe_oracle with glu="concat"): y, both losses, and the gradient into x of
    the fwd+bwd pass. gpt-oss: biases and the clamped SwiGLU, and hf-* through GPT-OSS's own
    experts class, whose weights are interleaved and transposed copies of the shape's."""
    shape = with_tokens(quick(NAMED[name]), 24)
    names = ["cumo-torch", "cumo-loop", "grouped_mm", "hf-eager", "hf-grouped_mm", "hf-cumo"]
    provs, left = providers_for(torch.device("cpu"), names)
    assert sorted(p.name for p in provs) == sorted(names), left
    inp = make_inputs(shape, torch.float32, torch.device("cpu"), seed=3)
    assert inp.w1.shape[1] == 2 * shape.hidden and (inp.b1 is not None) == shape.bias
    fields = (inp.x, inp.gate, inp.w1, inp.b1, inp.w2, inp.b2)
    leaves = {n: oracle.up(t, True) for n, t in zip(("x", "gate_weight", "w1", "b1", "w2", "b2"), fields)}
    y64, bal64, z64, _ = oracle.moe_oracle(
        **leaves, top_k=shape.top_k, activation=shape.activation, glu="concat", dtype=torch.float32
    )
    ((y64 * inp.dy.double()).sum() + bal64 + z64).backward()
    for prov in provs:
        assert prov.refuses(shape, torch.device("cpu"), torch.float32) is None, prov.name
        y, bal, z = make_call(prov, shape, inp, "fwd")()
        assert_close_rel(y, y64, torch.float32, f"{prov.name} y")
        assert_close_rel(bal, bal64, torch.float32, f"{prov.name} balance")
        assert_close_rel(z, z64, torch.float32, f"{prov.name} z")
        dx = make_call(prov, shape, inp, "fwd+bwd")()[0]
        assert_close_rel(dx, leaves["x"].grad, torch.float32, f"{prov.name} grad x")


def test_schema_rejects_broken_documents():
    good = {
        "device": "x",
        "torch": "2",
        "triton": None,
        "cuda": None,
        "commit": "abc",
        "date": "2026-11-23T00:00:00+00:00",
        "ceilings": {"matmul_tflops": 1.0, "copy_gbps": 1.0},
        "tests": None,
        "sanitizer": None,
        "results": [{"shape": "s", "pass": "fwd", "provider": "p", "ms": 1.0, "tflops": 1.0, "peak_mem_gib": None}],
    }
    assert schema.validate(good) == []
    for key, bad in (
        ("date", "yesterday"),
        ("commit", ""),
        ("results", [{"shape": "s", "pass": "sideways", "provider": "p", "ms": 1.0, "tflops": 1.0}]),
    ):
        doc = dict(good, **{key: bad})
        assert schema.validate(doc), f"{key}={bad!r} accepted"
    doc = dict(good)
    del doc["triton"]
    assert schema.validate(doc)
    assert schema.validate([1, 2])


def test_baselines_match_the_loop():
    """grouped_mm's sorted dispatch computes CuMo's block (y and both losses)."""
    shape = quick(NAMED["clip-infer"])
    inp = make_inputs(shape, torch.float32, torch.device("cpu"))  # grouped_mm takes no float64
    y0, b0, z0 = loop_forward(inp, shape)
    y1, b1, z1 = grouped_mm_forward(inp, shape)
    assert float((y1 - y0).norm() / y0.norm()) < 1e-5
    torch.testing.assert_close(b1, b0)
    torch.testing.assert_close(z1, z0)


def test_parse_shape_and_errors():
    s = parse_shape("64,32,48,40,4,2,silu", 2)
    assert (s.tokens, s.d_in, s.hidden, s.d_out, s.experts, s.top_k, s.activation, s.samples) == (
        64,
        32,
        48,
        40,
        4,
        2,
        "silu",
        2,
    )
    with pytest.raises((ValueError, SystemExit)):
        parse_shape("64,32,48", 1)


def test_bench_interleaved_times_every_callable():
    calls = []
    out = bench_interleaved([lambda: calls.append(0), lambda: calls.append(1)], reps=3)
    assert len(out) == 2 and all(ms >= 0 for ms in out)
    assert calls.count(0) == 3 and calls.count(1) == 3


def test_junit_and_sanitizer_records(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite tests="10" failures="1" errors="1" skipped="3"/></testsuites>')
    rec = junit_counts(str(junit))
    assert (rec["passed"], rec["failed"], rec["skipped"]) == (5, 2, 3)

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "sanitizer-memcheck.log").write_text("SANITIZE_CASE OK\n========= ERROR SUMMARY: 0 errors\n")
    (logs / "sanitizer-memcheck.rc").write_text("0\n")
    (logs / "sanitizer-racecheck.log").write_text("========= Error: Device not supported\n")
    (logs / "sanitizer-racecheck.rc").write_text("1\n")
    (logs / "sanitizer-initcheck.log").write_text("SANITIZE_CASE OK\n========= ERROR SUMMARY: 2 errors\n")
    (logs / "sanitizer-initcheck.rc").write_text("99\n")
    assert suite_tools.sanitizer_record(str(logs), "memcheck")["status"] == "clean"
    assert suite_tools.sanitizer_record(str(logs), "racecheck")["status"] == "skipped"
    assert suite_tools.sanitizer_record(str(logs), "initcheck")["status"] == "errors"
    (logs / "sanitizer-memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")  # the case crashed
    assert suite_tools.sanitizer_record(str(logs), "memcheck")["status"] == "failed"
    assert suite_tools.sanitizer_record(str(tmp_path / "none"), "memcheck")["status"] == "not run"


def test_sanitize_case_refusal_is_only_unsupported_from_an_explicit_backend(monkeypatch, capsys):
    """benchmarks/sanitize_case.py in-process on CPU tensors (SANITIZE_CASE_DEVICE=cpu): a plain
    RuntimeError from a backend (CUTLASS's "cannot implement") is FAILED, not REFUSED; only
    dispatch.Unsupported from an explicitly chosen backend is a refusal (out of auto it is FAILED:
    auto must fall back). The backends run in the order asked for, and the summary names them."""
    from benchmarks import sanitize_case
    from cumo_kernels import dispatch, reference

    monkeypatch.setenv("SANITIZE_CASE_DEVICE", "cpu")
    monkeypatch.delenv(sanitize_case.BACKENDS_ENV, raising=False)

    def cannot_implement(*args, **kwargs):
        raise RuntimeError("CUTLASS grouped GEMM: cannot implement this problem")

    def unsupported(*args, **kwargs):
        raise dispatch.Unsupported("the torch backend refuses these operands (a test)")

    real_grouped_linear = reference.grouped_linear
    monkeypatch.setattr(reference, "grouped_linear", cannot_implement)
    assert sanitize_case.main(["--backends", "torch"]) == 1
    out = capsys.readouterr().out
    assert "torch   aligned-bf16       FAILED RuntimeError: CUTLASS grouped GEMM: cannot implement" in out
    assert "0 refused, 4 failed" in out
    assert out.rstrip().endswith("SANITIZE_CASE FAILED (4)") and "SANITIZE_CASE OK" not in out

    monkeypatch.setattr(reference, "grouped_linear", unsupported)
    monkeypatch.setenv(sanitize_case.BACKENDS_ENV, "auto,torch")
    assert sanitize_case.main([]) == 1
    out = capsys.readouterr().out
    assert "backends ['auto', 'torch']" in out
    assert out.index("auto    aligned-bf16") < out.index("torch   aligned-bf16")
    assert "auto    aligned-bf16       FAILED Unsupported:" in out
    assert "torch   misaligned-fp32    REFUSED Unsupported:" in out
    assert "4 refused, 4 failed" in out and "  torch: refused aligned-bf16 (Unsupported:" in out

    assert sanitize_case.main(["--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "4 refused, 0 failed" in out and out.rstrip().endswith("SANITIZE_CASE OK")

    monkeypatch.setattr(reference, "grouped_linear", real_grouped_linear)
    monkeypatch.delenv(sanitize_case.BACKENDS_ENV)
    assert sanitize_case.main(["--backends", "torch,auto"]) == 0
    out = capsys.readouterr().out
    assert "8 (backend, case) ran ok, 0 refused, 0 failed" in out
    assert "  torch: ok aligned-bf16, empty-expert-bf16, aligned-fp16, misaligned-fp32" in out
    # a backend asked for that cannot run here is a failure, not a silent skip; bad lists are refused
    assert sanitize_case.main(["--backends", "cuda,torch"]) == 1
    assert "cuda    (every case)       UNAVAILABLE" in capsys.readouterr().out
    for bad in ("torch,nonesuch", "torch,torch", ","):
        assert sanitize_case.main(["--backends", bad]) == 2


def test_gpu_suite_dry_run(tmp_path):
    """Without a GPU the suite says so, runs a CPU smoke benchmark, and writes a valid result file."""
    script = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
    subprocess.run(["bash", "-n", script], check=True)
    env = dict(os.environ, GPU_SUITE_DRY="1", PYTHON=sys.executable, CUMO_COMMIT="test")
    proc = subprocess.run(
        ["bash", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DRY RUN" in proc.stdout
    files = set(os.listdir(tmp_path))
    required = {"logs.tar.gz", "results.json", "summary.txt"}
    assert required <= files <= required | {"plot.png"}, files  # the plot needs matplotlib
    doc = json.loads((tmp_path / "results.json").read_text())
    assert schema.validate(doc) == []
    assert doc["commit"] == "test"
    assert "no GPU" in (tmp_path / "summary.txt").read_text()


def test_gpu_suite_selection_is_cuda_only_gpu_only_first():
    """What `pytest tests --cuda-only` runs on a GPU, collected here with CUDA faked: only tests
    on a CUDA device, none of the CPU-only or compile-only files, the GPU-only ones first, every
    CUDA backend present (the cuda backend only where the extension is built)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cuda_selection"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    gpu_only = [ln.startswith("gpu-only ") for ln in lines]
    ids = [ln[len("gpu-only ") :] for ln in lines]
    assert len(ids) > 500, proc.stdout[-2000:]
    # the GPU-only tests form a prefix
    assert gpu_only[0] and sum(gpu_only) == gpu_only.index(False), "GPU-only tests are not all first"
    files = {nid.split("::")[0] for nid in ids}
    for cpu_only in ("test_triton_compile.py", "test_benchmarks.py", "test_auto_table.py", "test_cumo_checkpoint.py"):
        assert not any(f.endswith(cpu_only) for f in files), cpu_only
    for nid, g in zip(ids, gpu_only):
        params = nid.partition("[")[2]
        assert g or params.startswith("cuda"), f"not a CUDA test: {nid}"
        assert "cpu-" not in params and not params.startswith("cpu"), nid
    names = " ".join(ids)
    for must in ("test_cuda_gpu.py::", "test_triton_cuda_design_shapes", "test_triton_layer_no_sync_and_cuda_graph"):
        assert must in names, must
    from cumo_kernels import cuda as cuda_backend

    backends = ["triton", "torch"] + (["cuda"] if cuda_backend._cuda is not None else [])
    for b in backends:
        assert f"[cuda-{b}" in names, b
    # among the parametrised tests (torch.compile's, marked slow, last) triton's come before torch's
    param = [nid for nid, g in zip(ids, gpu_only) if not g and "test_compile.py" not in nid]
    compiled = [i for i, nid in enumerate(ids) if "test_compile.py" in nid]
    assert compiled and compiled == list(range(len(ids) - len(compiled), len(ids))), "torch.compile tests not last"
    first_torch = next(i for i, nid in enumerate(param) if "[cuda-torch" in nid)
    assert not any("[cuda-triton" in nid for nid in param[first_torch:])


def test_saved_bytes_counts_saved_storages_once_and_maps_dims():
    from dataclasses import replace

    from benchmarks import saved_bytes
    from benchmarks.shapes import NAMED

    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def fn():
        h = x @ w  # saves x and w: both excluded
        s = torch.sigmoid(h)  # saves s
        return h * s  # saves h and s (s once)

    saved, out = saved_bytes.count_saved(fn, [x, w])
    assert out.shape == (6, 8)
    assert sorted(nb for _, _, nb in saved) == [6 * 8 * 4, 6 * 8 * 4]
    full = NAMED["clip-train"]
    small = replace(full, tokens=72, samples=1, d_in=128, hidden=512, d_out=128)
    # [T*k, hidden] fp16 and [T, E] fp32 at the full shape; one expert's 30 rows scale with T
    got = saved_bytes.full_size_bytes([((144, 512), 2, 144 * 512 * 2), ((72, 4), 4, 72 * 4 * 4)], small, full, 8)
    assert got == full.tokens * 2 * 4096 * 2 + full.tokens * 4 * 4
    got = saved_bytes.full_size_bytes([((30, 128), 2, 30 * 128 * 2)], small, full, 8)
    assert got == pytest.approx(30 * full.tokens / 72 * 1024 * 2)


def test_saved_bytes_cli(capsys):
    from benchmarks import saved_bytes

    before = os.environ.get("TRITON_INTERPRET")
    assert saved_bytes.main(["--shapes", "connector-train", "--providers", "cumo-torch,grouped_mm"]) == 0
    out = capsys.readouterr().out
    assert "connector-train  grouped_mm" in out and "1.00x grouped_mm" in out
    assert saved_bytes.main(["--shapes", "clip-train", "--tokens", "128", "--providers", "grouped_mm"]) == 2
    assert saved_bytes.main(["--shapes", "nonesuch", "--providers", "grouped_mm"]) == 2
    # TRITON_INTERPRET is set only when cumo-triton is asked for (it would change later tests)
    assert os.environ.get("TRITON_INTERPRET") == before


def test_peak_memory_sums_allocations_in_order():
    from benchmarks.peak_memory import peak_bytes

    def fn():
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(2000, dtype=torch.float32)
        del a
        c = torch.empty(500, dtype=torch.float32)
        return b, c

    peak, held, out = peak_bytes(fn)
    assert (peak, held) == (12000, 10000)
    assert out[0].numel() == 2000


def test_peak_memory_cli(capsys):
    from triton.runtime import interpreter

    from benchmarks import peak_memory

    gl = importlib.import_module("cumo_kernels.reference.grouped_linear")  # the module: the package's name is the op

    before = (os.environ.get("TRITON_INTERPRET"), os.environ.get("CUMO_KERNELS_TORCH_GEMM"))
    caps = (gl._BLOCK_BYTES, gl._CHUNK_ELEMS, interpreter.GridExecutor.__call__)
    args = ["--shapes", "connector-train", "--providers", "cumo-torch,grouped_mm", "--scale", "16"]
    assert peak_memory.main(args) == 0
    out = capsys.readouterr().out
    assert "connector-train  grouped_mm   peak" in out and "1.00x grouped_mm" in out
    assert "connector-train  cumo-torch   peak" in out
    # the stand-in settings are undone, and TRITON_INTERPRET is set only when cumo-triton is asked for
    assert (os.environ.get("TRITON_INTERPRET"), os.environ.get("CUMO_KERNELS_TORCH_GEMM")) == before
    assert (gl._BLOCK_BYTES, gl._CHUNK_ELEMS, interpreter.GridExecutor.__call__) == caps
    # the cuda backend's Python side with no-op kernels (where the extension is built), undone after
    from cumo_kernels import cuda

    kept = (cuda._cuda, cuda._check, cuda._stream, cuda._use_cutlass, cuda.refusal)
    assert peak_memory.main(["--shapes", "connector-train", "--providers", "cumo-cuda", "--scale", "16"]) == 0
    out = capsys.readouterr().out
    if cuda._cuda is None:
        assert "skip cumo-cuda: the extension cumo_kernels._cuda is not built" in out
    else:
        assert "connector-train  cumo-cuda    peak" in out
    assert (cuda._cuda, cuda._check, cuda._stream, cuda._use_cutlass, cuda.refusal) == kept
    assert peak_memory.main(["--shapes", "clip-train", "--scale", "7", "--providers", "grouped_mm"]) == 2
    assert peak_memory.main(["--shapes", "nonesuch", "--providers", "grouped_mm"]) == 2
    assert peak_memory.main(["--torch-gemm", "fast", "--providers", "grouped_mm"]) == 2
