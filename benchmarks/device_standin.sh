#!/usr/bin/env bash
# A stand-in for the lent GPU machine, here on a CPU: a venv with the device's package versions
# (../shared/GPU.md: Python 3.12, torch 2.11, triton 3.6.0, transformers 5.17.0, numpy 2.5) and
# the carried wheels, then benchmarks/gpu_suite.sh with GPU_SUITE_FORCE=1, then the checks of what
# the device tool would bring back (at most 8 files, at most 2 folders down, plain names).
#
#   bash benchmarks/device_standin.sh OUTDIR [BUDGET ...]
#
# Each BUDGET (default: 540) is one run of the suite with GPU_SUITE_BUDGET=BUDGET into
# OUTDIR/cut-BUDGET, as a cut at that second would leave it. The venv is .venv-standin (kept;
# STANDIN_FRESH=1 rebuilds it). Nothing here needs a GPU, and nothing it measures is a GPU figure:
# it checks install, build, test selection, budgets and file output.
#
# Where this machine has no CPU build of the device's torch for the device's Python (no network
# to download.pytorch.org, say), the venv takes the closest CPU build it can install
# (STANDIN_PYTHON, STANDIN_TORCH) and says so: torch's own version then differs from the device's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/device_standin.sh OUTDIR [BUDGET ...]}
shift
BUDGETS=("${@:-540}")
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
VENV=.venv-standin

pick_python() {
	local p
	for p in ${STANDIN_PYTHON:-python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python" python3.11 python3}; do
		command -v "$p" >/dev/null 2>&1 && { echo "$p"; return; }
	done
	echo python3
}

if [[ ${STANDIN_FRESH:-0} == 1 || ! -x $VENV/bin/python ]]; then
	rm -rf "$VENV"
	PYBIN=$(pick_python)
	"$PYBIN" -m venv "$VENV"
	"$VENV/bin/python" -m pip install -q --upgrade pip
	# torch first, a CPU build: the device's 2.11.0 where one exists for this Python, else the
	# newest CPU build pip finds (CI's pin), never a CUDA build.
	if ! "$VENV/bin/python" -m pip install -q "${STANDIN_TORCH:-torch==2.11.0+cpu}" \
		--extra-index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
		echo "device_standin: no CPU torch 2.11.0 for $("$VENV/bin/python" -V) here; the venv takes a CPU build it can get"
		rm -rf "$VENV"
		"${STANDIN_FALLBACK_PYTHON:-python3}" -m venv "$VENV"
		"$VENV/bin/python" -m pip install -q --upgrade pip
		"$VENV/bin/python" -m pip install -q torch==2.13.0
		"$VENV/bin/python" -c 'import torch, sys; assert not torch.version.cuda, "a CUDA build of torch: refused"; print("device_standin: torch", torch.__version__, "python", sys.version.split()[0])'
	fi
	# The device's versions of the rest (numpy 2.5 needs Python >= 3.12; Triton's interpreter is
	# not used here). The device has no matplotlib-free image, so matplotlib too.
	"$VENV/bin/python" -m pip install -q triton==3.6.0 transformers==5.17.0 "numpy>=2.2" pybind11 ninja \
		pytest pytest-xdist pytest-timeout matplotlib wheel
fi
"$VENV/bin/python" -c 'import torch, triton, transformers, numpy, sys; print("device_standin: python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)'

# The wheels the README says to carry (nvidia-cutlass for the headers, an exact setuptools).
mkdir -p wheels
compgen -G "wheels/nvidia_cutlass-*.whl" >/dev/null && compgen -G "wheels/setuptools-*.whl" >/dev/null ||
	"$VENV/bin/python" -m pip download -q --no-deps -d wheels "nvidia-cutlass==4.2.0.0" "setuptools==81.0.0"

status=0
for b in "${BUDGETS[@]}"; do
	d=$OUT/cut-$b
	rm -rf "$d"
	echo "device_standin: suite with GPU_SUITE_BUDGET=$b into $d"
	start=$(date +%s)
	# The CPU benchmark at full GPU shapes would take hours: quick shapes, one rep.
	GPU_SUITE_FORCE=1 GPU_SUITE_BUDGET=$b PYTHON=$VENV/bin/python MAX_JOBS=${MAX_JOBS:-2} GPU_SUITE_JOBS=2 \
		GPU_SUITE_BENCH_ARGS="${GPU_SUITE_BENCH_ARGS:---quick --device cpu --reps 1 --providers cumo-torch,cumo-loop,grouped_mm,dense}" \
		bash benchmarks/gpu_suite.sh "$d" >"$OUT/suite-$b.log" 2>&1 || true
	took=$(($(date +%s) - start))
	"$VENV/bin/python" - "$d" "$b" "$took" <<'EOF' || status=1
import json, os, re, sys
d, budget, took = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
problems = []
files = []
for root, dirs, names in os.walk(d):
    depth = os.path.relpath(root, d).count(os.sep) + (root != d)
    for n in names:
        files.append(os.path.relpath(os.path.join(root, n), d))
        if depth > 2:
            problems.append(f"{n}: more than 2 folders down")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", n):
            problems.append(f"{n}: a name the device tool does not bring back")
if len(files) > 8:
    problems.append(f"{len(files)} files (the device tool brings back 8)")
for need in ("results.json", "logs.tar.gz", "summary.txt"):
    if need not in files:
        problems.append(f"{need} missing")
if "results.json" in files:
    sys.path.insert(0, os.getcwd())
    from benchmarks import schema

    doc = json.load(open(os.path.join(d, "results.json")))
    problems += [f"results.json: {p}" for p in schema.validate(doc)]
    if doc["results"] and "plot.png" not in files:
        problems.append("rows but no plot.png")
    tests = doc.get("tests") or {}
    clean = tests.get("exit_code") == 0 and not tests.get("failed") and tests.get("passed", 0) > 0
    if "auto_table.json" in files and not clean:
        problems.append("auto_table.json written from a run whose GPU tests were not clean")
if took > budget + 60:
    problems.append(f"took {took}s for a budget of {budget}s")
print(f"device_standin: budget {budget}s took {took}s, files {sorted(files)}")
for p in problems:
    print("  PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
done
exit $status
