"""auto's measured order: the table made from GPU result files (benchmarks/auto_table.py), its
lookup per layer shape and pass (cumo_kernels/tuning.py), and dispatch.choose following it.

No GPU here: the result documents are synthetic (named so), and the CUDA backends are fakes in the
registry, as in test_cuda_ext's fallback test. What this checks is the plumbing; which backend is
fastest is for a GPU run to say."""

from __future__ import annotations

import json
import types

import pytest
import torch

from benchmarks import auto_table
from cumo_kernels import dispatch, tuning
from cumo_kernels.ops.moe import _workload

CLIP = {"in": 1024, "hidden": 4096, "out": 1024, "experts": 4, "top_k": 2}
CONN = {"in": 2048, "hidden": 4096, "out": 4096, "experts": 4, "top_k": 2}


def _result_doc(times: dict, *, device_type="cuda", failed=0, date="2026-11-23T00:00:00+00:00") -> dict:
    """A synthetic GPU result file: times[(shape, pass)] = {provider: ms}, with the `tests` and
    `sanitizer` records of a good suite run (benchmarks/suite_tools.py's shapes)."""
    shapes = {
        "clip-train": dict(CLIP, tokens=23080),
        "connector-infer": dict(CONN, tokens=576),
    }
    rows = [
        {"shape": s, "pass": p, "provider": prov, "ms": ms, "tflops": 1.0, "peak_mem_gib": None}
        for (s, p), by in times.items()
        for prov, ms in by.items()
    ]
    return {
        "device": "SYNTHETIC H100" if device_type == "cuda" else "CPU",
        "device_type": device_type,
        "capability": "9.0" if device_type == "cuda" else None,
        "dtype": "bfloat16",
        "torch": "2.13",
        "triton": "3.6.0",
        "cuda": "13.0",
        "commit": "abc",
        "date": date,
        "ceilings": {"matmul_tflops": 700.0, "copy_gbps": 3000.0},
        "tests": {"passed": 10, "failed": failed, "skipped": 0, "exit_code": 1 if failed else 0},
        "sanitizer": {
            "memcheck": {"status": "clean", "errors": 0, "exit_code": 0, "case_completed": True},
            "racecheck": {"status": "skipped", "reason": "Device not supported", "exit_code": 1},
            "initcheck": {"status": "not run", "reason": "no time left"},
        },
        "shapes": shapes,
        "results": rows,
    }


TIMES = {
    ("clip-train", "fwd+bwd"): {"cumo-triton": 5.0, "cumo-cuda": 4.0, "cumo-torch": 9.0, "grouped_mm": 3.0},
    ("connector-infer", "fwd"): {"cumo-triton": 0.2, "cumo-cuda": 0.3, "dense": 0.1},
}


def _write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_table_from_result_files(tmp_path, capsys):
    src = _write(tmp_path, "r.json", _result_doc(TIMES))
    out = tmp_path / "table.json"
    assert auto_table.main([str(src), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    entries = tuning.check_table(doc)
    by = {(e["shape"], e["pass"]): e for e in entries}
    # only the cumo backends, fastest first; baselines (grouped_mm, dense) are not candidates
    assert by["clip-train", "fwd+bwd"]["order"] == ["cuda", "triton", "torch"]
    assert by["connector-infer", "fwd"]["order"] == ["triton", "cuda"]
    assert by["clip-train", "fwd+bwd"]["tokens"] == 23080 and by["clip-train", "fwd+bwd"]["capability"] == "9.0"
    assert "cuda > triton > torch" in capsys.readouterr().out


def test_table_leaves_gated_shapes_out():
    """moe_mlp's gated calls take auto's static order; a gated shape's timings must not enter the
    table (lookup, by FLOPs and widths, would hand them to plain calls of similar widths)."""
    doc = _result_doc(TIMES)
    doc["shapes"]["olmoe"] = {"in": 2048, "hidden": 1024, "out": 2048, "experts": 64, "top_k": 8, "tokens": 4096}
    doc["shapes"]["olmoe"]["glu"] = True
    doc["results"].append(
        {"shape": "olmoe", "pass": "fwd", "provider": "cumo-cuda", "ms": 1.0, "tflops": 1.0, "peak_mem_gib": None}
    )
    shapes = {e["shape"] for e in auto_table.entries_of(doc, "r.json")}
    assert shapes == {"clip-train", "connector-infer"}


def test_table_refuses_failed_tests_and_skips_cpu_runs(tmp_path, capsys):
    bad = _write(tmp_path, "bad.json", _result_doc(TIMES, failed=2))
    assert auto_table.main([str(bad), "--out", str(tmp_path / "t.json")]) == 2
    assert "2 failures" in capsys.readouterr().err
    assert auto_table.main([str(bad), "--out", str(tmp_path / "t.json"), "--allow-failed-tests"]) == 0
    cpu = _write(tmp_path, "cpu.json", _result_doc(TIMES, device_type="cpu"))
    assert auto_table.main([str(cpu), "--out", str(tmp_path / "t2.json")]) == 1
    assert not (tmp_path / "t2.json").exists()
    invalid = _write(tmp_path, "invalid.json", {"device": "x"})
    assert auto_table.main([str(invalid)]) == 2


SANITIZER_CLEAN = {"status": "clean", "errors": 0, "exit_code": 0, "case_completed": True}
GOOD = "good"  # keep _result_doc's record


@pytest.mark.parametrize(
    "tests, sanitizer, reason",
    [
        (None, None, "records no test run"),
        (
            {"passed": 40, "failed": 0, "skipped": 1, "exit_code": 124, "interrupted": "hit the time limit"},
            None,
            "interrupted",
        ),
        ({"passed": 0, "failed": 0, "skipped": 0, "exit_code": 5}, None, "no tests collected"),
        ({"passed": 0, "failed": 0, "skipped": 3, "exit_code": 0}, None, "at least one must pass"),
        ({"passed": 9, "failed": 0, "skipped": 0, "exit_code": 2, "note": "pytest exited 2"}, None, "exited 2"),
        ({"passed": 9, "failed": 0, "skipped": 0}, None, "no pytest exit code"),
        ({"passed": 9, "failed": 1, "skipped": 0, "exit_code": 1}, None, "1 failures"),
        (GOOD, {"memcheck": dict(SANITIZER_CLEAN, status="errors", errors=3)}, "sanitizer memcheck: errors (3 errors)"),
        (GOOD, {"racecheck": {"status": "timeout", "reason": "killed at the limit"}}, "sanitizer racecheck: timeout"),
        (GOOD, {"initcheck": {"status": "failed", "reason": "the case raised"}}, "sanitizer initcheck: failed"),
    ],
)
def test_table_refuses_runs_not_known_good(tmp_path, capsys, tests, sanitizer, reason):
    """Interrupted, absent, empty or failed test runs, and failed sanitizer tools, are refused,
    with the reason; --allow-failed-tests takes the timings anyway and says what it overlooked."""
    doc = _result_doc(TIMES)
    if tests is not GOOD:
        doc["tests"] = tests
    if sanitizer is not None:
        doc["sanitizer"] = dict(doc["sanitizer"], **sanitizer)
    src = _write(tmp_path, "r.json", doc)
    out = tmp_path / "t.json"
    assert auto_table.main([str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and reason in err, err
    assert not out.exists()
    assert auto_table.main([str(src), "--out", str(out), "--allow-failed-tests"]) == 0
    assert "taken despite" in capsys.readouterr().out and out.exists()


def test_table_takes_runs_whose_sanitizer_was_skipped_or_absent(tmp_path):
    doc = _result_doc(TIMES)
    assert auto_table.run_problems(doc) == []  # clean, skipped and not run tools
    doc["sanitizer"] = None
    assert auto_table.run_problems(doc) == []
    out = tmp_path / "t.json"
    assert auto_table.main([str(_write(tmp_path, "r.json", doc)), "--out", str(out)]) == 0


def test_newest_file_wins(tmp_path):
    old = _result_doc(TIMES, date="2026-11-01T00:00:00+00:00")
    new_times = {("clip-train", "fwd+bwd"): {"cumo-triton": 3.0, "cumo-cuda": 4.0}}
    new = _result_doc(new_times, date="2026-11-20T00:00:00+00:00")
    doc, _ = auto_table.build([_write(tmp_path, "new.json", new), _write(tmp_path, "old.json", old)])
    by = {(e["shape"], e["pass"]): e for e in doc["entries"]}
    assert by["clip-train", "fwd+bwd"]["order"] == ["triton", "cuda"]
    assert by["connector-infer", "fwd"]["order"] == ["triton", "cuda"]  # only the old file measured it


def _entry(order, tokens, pass_="fwd+bwd", dims=CLIP, device="SYNTHETIC H100", capability="9.0", dtype="bfloat16"):
    return dict(dims, device=device, capability=capability, dtype=dtype, tokens=tokens, order=order, **{"pass": pass_})


def _w(tokens, pass_="fwd+bwd", dims=CLIP, dtype="bfloat16"):
    return tuning.Workload(
        tokens, dims["in"], dims["hidden"], dims["out"], dims["experts"], dims["top_k"], dtype, pass_
    )


def test_lookup_rules():
    entries = [
        _entry(["cuda", "triton"], 23080),
        _entry(["triton", "cuda"], 2308),
        _entry(["torch"], 23080, pass_="fwd"),
        _entry(["triton"], 576, dims=CONN),
    ]
    look = tuning.lookup
    # nearest FLOPs among the same GPU, dtype, pass and layer widths
    assert look(entries, "SYNTHETIC H100", "9.0", _w(20000))["order"] == ["cuda", "triton"]
    assert look(entries, "SYNTHETIC H100", "9.0", _w(3000))["order"] == ["triton", "cuda"]
    assert look(entries, "SYNTHETIC H100", "9.0", _w(23080, "fwd"))["order"] == ["torch"]
    # another GPU of the same compute capability takes the entries; another capability does not
    assert look(entries, "OTHER", "9.0", _w(20000))["order"] == ["cuda", "triton"]
    assert look(entries, "OTHER", "8.0", _w(20000)) is None
    # dtype must match; beyond a factor of 8 in FLOPs nothing applies
    assert look(entries, "SYNTHETIC H100", "9.0", _w(20000, dtype="float16")) is None
    assert look(entries, "SYNTHETIC H100", "9.0", _w(100)) is None
    assert look(entries, "SYNTHETIC H100", "9.0", _w(10**6)) is None
    # other layer widths: the nearest entry in FLOPs (a connector-sized call near clip-train's)
    other = {"in": 1280, "hidden": 5120, "out": 1280, "experts": 8, "top_k": 2}
    assert look(entries, "SYNTHETIC H100", "9.0", _w(15000, dims=other))["order"] == ["cuda", "triton"]
    # the same widths win over a nearer FLOP count of other widths (within the factor of 8)
    conn_fwdbwd = [_entry(["torch"], 576, dims=CONN), _entry(["cuda"], 5000)]
    assert look(conn_fwdbwd, "SYNTHETIC H100", "9.0", _w(1000))["order"] == ["cuda"]


def test_check_table_names_the_bad_field():
    good = {"schema": tuning.SCHEMA, "entries": [_entry(["cuda"], 10)]}
    assert len(tuning.check_table(good)) == 1
    for field, bad, msg in (
        ("order", ["cuda", "cuda"], "order"),
        ("order", ["fast"], "order"),
        ("tokens", 0, "tokens"),
        ("pass", "bwd", "pass"),
        ("dtype", "", "dtype"),
    ):
        doc = {"schema": tuning.SCHEMA, "entries": [dict(_entry(["cuda"], 10), **{field: bad})]}
        with pytest.raises(ValueError, match=rf"entries\[0\]\.{msg}"):
            tuning.check_table(doc)
    with pytest.raises(ValueError, match="schema"):
        tuning.check_table({"entries": []})


def test_table_file_from_environment(tmp_path, monkeypatch):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"schema": tuning.SCHEMA, "entries": [_entry(["triton"], 100)]}))
    monkeypatch.setenv(tuning.ENV_VAR, str(p))
    assert [e["order"] for e in tuning.table()] == [["triton"]]
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match=tuning.ENV_VAR):
        tuning.table()
    monkeypatch.delenv(tuning.ENV_VAR)
    # the packaged table: absent until a GPU run made one (then it must be valid)
    tuning.table()


def _fake_backends(monkeypatch, refused=()):
    """cuda and triton backends that can run anything (but those named in `refused`)."""
    for name in ("cuda", "triton"):
        reasons = [f"{name}: refused (a test)"] if name in refused else []
        fake = types.SimpleNamespace(not_supported_reasons=lambda call, r=reasons: r, COMPOSITION="unfused")
        monkeypatch.setitem(dispatch._REGISTRY, name, dispatch.Backend(name, lambda f=fake: f))


def test_choose_follows_the_measured_order(monkeypatch):
    _fake_backends(monkeypatch)
    cuda = torch.device("cuda", 0)
    w = _w(23080)
    measured = {}
    monkeypatch.setattr(tuning, "measured_order", lambda device, workload: measured.get(workload))

    def choose(backend=None, device=cuda):
        return dispatch.choose(backend, device, torch.float32, 4, workload=w)

    # nothing measured: the static order, triton first
    assert choose() == "triton"
    # measured cuda first: auto follows it
    measured[w] = ("cuda",)
    assert choose() == "cuda"
    # measured torch first: the torch backend
    measured[w] = ("torch", "triton", "cuda")
    assert choose() == "torch"
    # an explicit backend ignores the table; CPU tensors are always torch under auto
    assert choose("triton") == "triton"
    assert choose(device=torch.device("cpu")) == "torch"
    # a measured first choice that cannot run this call is passed over, for the next in order
    measured[w] = ("cuda", "triton")
    _fake_backends(monkeypatch, refused=("cuda",))
    assert choose() == "triton"
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run moe_mlp on cuda tensors.*cuda: refused"):
        choose("cuda")


def test_workload_is_only_built_for_cuda_tensors():
    x = torch.randn(3, 8)
    assert _workload(x, 16, 8, 4, 2, (x,)) is None


def test_workload_flops_are_the_benchmarks():
    from benchmarks.shapes import NAMED

    for shape in NAMED.values():
        if shape.glu:  # gated (ours, or a transformers family's block): moe_mlp passes no workload
            continue
        dims = {"in": shape.d_in, "hidden": shape.hidden, "out": shape.d_out, "experts": shape.experts}
        dims["top_k"] = shape.top_k
        for pass_ in ("fwd", "fwd+bwd"):
            assert _w(shape.tokens, pass_, dims).flops == shape.flops(pass_), (shape.name, pass_)


def test_same_gpu_entries_of_another_pass_do_not_hide_same_capability_ones():
    entries = [
        _entry(["triton"], 23080, pass_="fwd", device="H100 SXM"),
        _entry(["cuda"], 23080, pass_="fwd+bwd", device="H100 PCIe"),
    ]
    assert tuning.lookup(entries, "H100 SXM", "9.0", _w(23080))["order"] == ["cuda"]
    assert tuning.lookup(entries, "H100 SXM", "9.0", _w(23080, "fwd"))["order"] == ["triton"]


def test_measured_order_reads_the_table_once_per_workload(tmp_path, monkeypatch):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"schema": tuning.SCHEMA, "entries": [_entry(["cuda", "torch"], 23080)]}))
    monkeypatch.setenv(tuning.ENV_VAR, str(p))
    monkeypatch.setattr(tuning, "device_key", lambda index: ("SYNTHETIC H100", "9.0"))
    tuning.reload()
    try:
        cuda = torch.device("cuda", 0)
        assert tuning.measured_order(cuda, _w(23080)) == ("cuda", "torch")
        assert tuning.measured_order(cuda, _w(23080, "fwd")) is None
        assert tuning.measured_order(torch.device("cpu"), _w(23080)) is None
        p.write_text(json.dumps({"schema": tuning.SCHEMA, "entries": []}))
        assert tuning.measured_order(cuda, _w(23080)) == ("cuda", "torch")  # cached
        tuning.reload()
        assert tuning.measured_order(cuda, _w(23080)) is None
    finally:
        tuning.reload()


def test_dates_with_and_without_zone_compare(tmp_path):
    a = _result_doc(TIMES, date="2026-11-01T00:00:00")
    b = _result_doc({("clip-train", "fwd+bwd"): {"cumo-triton": 1.0}}, date="2026-11-20T00:00:00+00:00")
    doc, _ = auto_table.build([_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a)])
    by = {(e["shape"], e["pass"]): e for e in doc["entries"]}
    assert by["clip-train", "fwd+bwd"]["order"] == ["triton"]
