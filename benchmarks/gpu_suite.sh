#!/usr/bin/env bash
# The one command for a lent GPU: build, tests on CUDA, compute-sanitizer, benchmarks.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Writes into OUTDIR, each file as soon as it exists (a run cut off still returns what it
# finished): results.json (rewritten after every benchmark row), plot.png, logs.tar.gz
# (refreshed after every step), summary.txt. Four files, flat.
#
# Environment:
#   GPU_SUITE_BUDGET   seconds for the whole suite (default 540: well inside the device tool's 600)
#   GPU_SUITE_STEPS    comma list of wheels,build,tests,sanitizer,bench (default all)
#   GPU_SUITE_DRY=1    print the plan and run only a CPU smoke benchmark (also chosen when no GPU)
#   GPU_SUITE_FORCE=1  run the steps even when torch sees no GPU (to test the script itself on a CPU)
#   GPU_SUITE_BENCH_ARGS  extra arguments for python -m benchmarks (e.g. "--shapes clip-train")
#   CUMO_COMMIT        the git commit to record (the device's copy of the tree has no .git)
#   PYTHON             the interpreter (default python3)
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET:-540}
STEPS=${GPU_SUITE_STEPS:-wheels,build,tests,sanitizer,bench}
START=$(date +%s)
# A fixed place: a second call on a still-warm machine (GPU_SUITE_STEPS=bench) finds the
# tests.json / sanitizer.json of the first.
WORK=/tmp/cumo_gpu_suite
LOGS=$WORK/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_suite +$(elapsed)s] $*" | tee -a "$LOGS/suite.log"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# tmo CAP RESERVE: a step's time limit, at most CAP, leaving RESERVE seconds for later steps.
tmo() {
	local cap=$1 left=$((BUDGET - $(elapsed) - $2))
	((left < cap)) && cap=$left
	((cap < 5)) && cap=0
	echo "$cap"
}
pack() {
	tar -czf "$OUT/logs.tar.gz.part" -C "$WORK" logs 2>/dev/null && mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

: >"$LOGS/suite.log"
log "start: budget ${BUDGET}s, steps $STEPS, out $OUT"

DRY=${GPU_SUITE_DRY:-0}
if [[ $DRY != 1 && ${GPU_SUITE_FORCE:-0} != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
	log "no CUDA device visible to $PY (torch.cuda.is_available() is False): dry run"
	DRY=1
fi

if [[ -z ${CUMO_COMMIT:-} ]]; then
	CUMO_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
	[[ $CUMO_COMMIT == unknown ]] && log "warning: no git here and CUMO_COMMIT unset: the result records commit 'unknown'"
fi
export CUMO_COMMIT

{
	echo "date: $(date -u +%FT%TZ)"
	echo "commit: $CUMO_COMMIT"
	uname -a
	nvidia-smi 2>&1 | head -20
	"$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
	"$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
	command -v nvcc && nvcc --version | tail -2
	command -v compute-sanitizer
} >"$LOGS/env.log" 2>&1
pack

if [[ $DRY == 1 ]]; then
	log "DRY RUN: would run, each bounded by timeout within ${BUDGET}s:"
	log "  wheels:    $PY -m pip install --no-index --no-deps wheels/*.whl (and .whl/*.whl)"
	log "  build:     MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e ."
	log "  tests:     CUMO_TRITON_AUTOTUNE=0 $PY -m pytest -q tests --junitxml=$LOGS/junit.xml"
	log "  sanitizer: compute-sanitizer --tool {memcheck,racecheck,initcheck} $PY benchmarks/sanitize_case.py"
	log "  bench:     $PY -m benchmarks --out $OUT/results.json --plot $OUT/plot.png --tests-json ... --sanitizer-json ..."
	log "dry run: checking the pipeline with a CPU smoke benchmark instead (--quick, no tests, no sanitizer)"
	"$PY" -m benchmarks.suite_tools sanitizer "$WORK/none" "$LOGS/sanitizer.json" >/dev/null
	timeout -s INT -k 10 "$(tmo 300 10)" "$PY" -m benchmarks --quick --device cpu --providers cumo-torch,cumo-loop,grouped_mm,dense \
		--reps 1 --out "$OUT/results.json" --plot "$OUT/plot.png" --sanitizer-json "$LOGS/sanitizer.json" \
		>"$LOGS/bench.log" 2>"$LOGS/bench.err"
	rc=$?
	log "dry-run benchmark exit $rc"
	tail -5 "$LOGS/bench.log"
	"$PY" -m benchmarks --validate "$OUT/results.json" | tee -a "$LOGS/suite.log"
	pack
	echo "DRY RUN (no GPU): nothing was built, tested or sanitized on a GPU" >"$OUT/summary.txt"
	exit 0
fi

# 1. Carried wheels (no network there): wheels/ as this README names it, .whl/ as the device README does.
if want wheels; then
	for d in wheels .whl; do
		compgen -G "$d/*.whl" >/dev/null || continue
		log "wheels: installing $d/*.whl"
		if ! timeout "$(tmo 90 400)" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir $d/*.whl >>"$LOGS/wheels.log" 2>&1; then
			log "wheels: system install failed; --target /tmp/site instead"
			timeout "$(tmo 90 400)" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site $d/*.whl >>"$LOGS/wheels.log" 2>&1 &&
				export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
		fi
	done
fi

# 2. Build the package and its extension here (a build from another machine does not load).
if want build; then
	t=$(tmo 240 270)
	# Only this GPU's arch (sm_90a on H100/H200: the CUTLASS sm90 path), unless CUMO_CUDA_ARCHS is set.
	archs=${CUMO_CUDA_ARCHS:-$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}a" if M == 9 else f"{M}{m}")' 2>/dev/null || echo "80;90a")}
	log "build: CUMO_CUDA_ARCHS=$archs pip install --no-build-isolation --no-deps -e . (limit ${t}s)"
	CUMO_CUDA_ARCHS=$archs MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 "$t" "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1
	log "build: exit $?"
	"$PY" -c 'import cumo_kernels._cuda as e; print("cumo_kernels._cuda build:", e.build_info())' 2>&1 | tee -a "$LOGS/suite.log"
	"$PY" -c 'import cumo_kernels as c; print("cumo_kernels", c.__version__, "backends on cuda:", c.available_backends("cuda"))' 2>&1 | tee -a "$LOGS/suite.log"
	pack
fi

# 3. The test suite on CUDA. SIGINT first: pytest then still writes its junit XML and summary.
if want tests; then
	t=$(tmo 150 210)
	log "tests: python -m pytest -q tests (limit ${t}s)"
	# One fixed Triton config instead of autotuning every small test shape (compile time only);
	# test_triton_every_autotune_config still runs each config of the set against the oracle.
	CUMO_TRITON_AUTOTUNE=0 timeout -s INT -k 15 "$t" "$PY" -m pytest -q tests -p no:cacheprovider \
		--junitxml="$LOGS/junit.xml" >"$LOGS/pytest.log" 2>&1
	rc=$?
	"$PY" -m benchmarks.suite_tools tests "$LOGS/junit.xml" "$LOGS/pytest.log" "$rc" "$LOGS/tests.json" | tee -a "$LOGS/suite.log"
	tail -3 "$LOGS/pytest.log"
	pack
fi

# 4. compute-sanitizer on a small case; a refused device is recorded as skipped, never as passed.
if want sanitizer; then
	rm -f "$LOGS"/sanitizer-*.log "$LOGS"/sanitizer-*.rc
	tools=(memcheck racecheck initcheck)
	for i in "${!tools[@]}"; do
		tool=${tools[$i]}
		lg=$LOGS/sanitizer-$tool.log
		if ! command -v compute-sanitizer >/dev/null; then
			echo "NOT RUN: compute-sanitizer is not on the PATH" >"$lg"
			continue
		fi
		t=$(tmo 60 $((170 + 20 * (2 - i))))
		if ((t == 0)); then
			echo "NOT RUN: the suite's time budget left no time for it" >"$lg"
			continue
		fi
		log "sanitizer: $tool (limit ${t}s)"
		# No caching allocator under memcheck/initcheck: every tensor is its own allocation,
		# so an out-of-bounds access cannot land silently in a neighbour inside a pooled block.
		PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t" compute-sanitizer --tool "$tool" --error-exitcode 99 \
			--print-limit 30 "$PY" benchmarks/sanitize_case.py >"$lg" 2>&1
		echo $? >"$LOGS/sanitizer-$tool.rc"
		grep -E "SUMMARY|Device not supported|SANITIZE_CASE" "$lg" | tail -3
	done
	"$PY" -m benchmarks.suite_tools sanitizer "$LOGS" "$LOGS/sanitizer.json" | tee -a "$LOGS/suite.log"
	pack
fi

# 5. The benchmarks: results.json is rewritten after every row, so a cut-off run still returns rows.
if want bench; then
	t=$(tmo 400 15)
	extra=()
	[[ -f $LOGS/tests.json ]] && extra+=(--tests-json "$LOGS/tests.json")
	[[ -f $LOGS/sanitizer.json ]] && extra+=(--sanitizer-json "$LOGS/sanitizer.json")
	log "bench: python -m benchmarks (limit ${t}s) ${GPU_SUITE_BENCH_ARGS:-}"
	# TRITON_PRINT_AUTOTUNING: each autotune's time goes to bench.log (its compile share; NOTES.md)
	# shellcheck disable=SC2086
	TRITON_PRINT_AUTOTUNING=1 timeout -s INT -k 10 "$t" "$PY" -m benchmarks --out "$OUT/results.json" --plot "$OUT/plot.png" \
		--time-budget $((t > 60 ? t - 40 : t / 2)) "${extra[@]}" ${GPU_SUITE_BENCH_ARGS:-} \
		>"$LOGS/bench.log" 2>"$LOGS/bench.err"
	log "bench: exit $?"
	grep -v "^Triton autotuning\|^with key as\|^finished after\|^best config selected" "$LOGS/bench.log"
	# auto's measured order from this run (commit it as cumo_kernels/auto_table.json once the
	# tests passed; the tool refuses a run with test failures)
	[[ -f $OUT/results.json ]] && "$PY" -m benchmarks.auto_table "$OUT/results.json" --out "$OUT/auto_table.json" \
		2>&1 | tee -a "$LOGS/suite.log"
	pack
fi

{
	echo "gpu_suite finished in $(elapsed)s; commit $CUMO_COMMIT"
	[[ -f $LOGS/tests.json ]] && echo "tests: $(cat "$LOGS/tests.json" | tr -d '\n ')"
	[[ -f $LOGS/sanitizer.json ]] && echo "sanitizer: $(cat "$LOGS/sanitizer.json" | tr -d '\n')"
	[[ -f $OUT/results.json ]] && "$PY" -m benchmarks --validate "$OUT/results.json"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
log "done"
pack
