#!/usr/bin/env bash
# The one command for a lent GPU: build, GPU tests, benchmarks, compute-sanitizer.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Steps, in order of value, each under `timeout` inside the budget (default 540 s):
#   wheels     install the carried wheels (wheels/ and .whl/; the device has no network)
#   build      the package and its extension for this GPU's arch only, verbosely (build.log)
#   tests      only tests that run on CUDA (conftest's --cuda-only): first the GPU-only ones
#              (marker `cuda`), then the backend-parametrised ones on cuda-* (cuda, triton, torch)
#   bench      clip-train and connector-train first (fwd+bwd, then fwd), then CuMo's other shapes,
#              then the gated ones (olmoe, qwen3-moe, gpt-oss, mixtral)
#   sanitizer  memcheck (cuda backend first), racecheck (cuda), initcheck (cuda), as time allows
# Every step but the last reserves the guaranteed shares of the wanted steps after it
# (GPU_SUITE_{TESTS,BENCH,SAN}_MIN), so a slow build cannot starve the benchmark.
#
# Writes flat into OUTDIR, each file as soon as it exists (a run cut off still returns what it
# finished): results.json (every benchmark row as it is measured; the tests and sanitizer records
# are put in at the end, and a valid file with no rows is written if the benchmark never ran),
# plot.png (after every shape), logs.tar.gz (after every step), summary.txt, and auto_table.json
# only when the GPU tests finished with no failure and the sanitizer found nothing.
#
# Environment:
#   GPU_SUITE_BUDGET   seconds for the whole suite (default 540: well inside the device tool's 600)
#   GPU_SUITE_STEPS    comma list of wheels,build,tests,bench,sanitizer (default all)
#   GPU_SUITE_WORK     the folder for logs and records (default: a fresh mktemp folder; name the
#                      first call's folder, printed in its summary, to reuse its records)
#   GPU_SUITE_DRY=1    print the plan and run only a CPU smoke benchmark (also chosen when no GPU)
#   GPU_SUITE_FORCE=1  run the steps even when torch sees no GPU (the stand-in: device_standin.sh)
#   GPU_SUITE_BENCH_ARGS  extra arguments for python -m benchmarks (later ones win)
#   GPU_SUITE_JOBS     pytest-xdist workers for the tests (default 8)
#   GPU_SUITE_TEST_K   a pytest -k expression for both test phases (a second call reruns what failed)
#   GPU_SUITE_BUILD_MIN  seconds the build gets before later steps' shares (default 90)
#   CUMO_COMMIT, CUMO_COMMIT_DIRTY   the commit to record and whether the tree differed from it
#                      (the device's copy of the tree has no .git)
#   PYTHON             the interpreter (default python3)
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET:-540}
STEPS=${GPU_SUITE_STEPS:-wheels,build,tests,bench,sanitizer}
# The guaranteed shares are for the full budget; a smaller one (a second call) scales them down.
TESTS_MIN=${GPU_SUITE_TESTS_MIN:-$((120 * (BUDGET < 540 ? BUDGET : 540) / 540))}
BENCH_MIN=${GPU_SUITE_BENCH_MIN:-$((180 * (BUDGET < 540 ? BUDGET : 540) / 540))}
SAN_MIN=${GPU_SUITE_SAN_MIN:-$((90 * (BUDGET < 540 ? BUDGET : 540) / 540))}
JOBS=${GPU_SUITE_JOBS:-8}
START=$(date +%s)
WORK=${GPU_SUITE_WORK:-$(mktemp -d /tmp/cumo_gpu_suite.XXXXXX)}
LOGS=$WORK/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_suite +$(elapsed)s] $*" | tee -a "$LOGS/suite.log"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# reserve STEP: the guaranteed seconds of the wanted steps after STEP.
reserve() {
	local r=0 after=0 s
	for s in wheels build tests bench sanitizer; do
		if ((after)) && want "$s"; then
			case $s in
			tests) r=$((r + TESTS_MIN)) ;;
			bench) r=$((r + BENCH_MIN)) ;;
			sanitizer) r=$((r + SAN_MIN)) ;;
			esac
		fi
		[[ $s == "$1" ]] && after=1
	done
	echo "$r"
}
# tmo CAP RESERVE: a step's time limit, at most CAP, leaving RESERVE seconds for later steps;
# 0 when fewer than 5 seconds are left (the step is then not run: `timeout 0` would not limit it).
tmo() {
	local cap=$1 left=$((BUDGET - $(elapsed) - $2))
	((left < cap)) && cap=$left
	((cap < 5)) && cap=0
	echo "$cap"
}
pack() {
	tar -czf "$OUT/logs.tar.gz.part" -C "$WORK" logs 2>/dev/null && mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

: >>"$LOGS/suite.log"
log "start: budget ${BUDGET}s, steps $STEPS, work $WORK, out $OUT"

DRY=${GPU_SUITE_DRY:-0}
if [[ $DRY != 1 && ${GPU_SUITE_FORCE:-0} != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
	log "no CUDA device visible to $PY (torch.cuda.is_available() is False): dry run"
	DRY=1
fi

if [[ -z ${CUMO_COMMIT:-} ]]; then
	CUMO_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
	if [[ $CUMO_COMMIT == unknown ]]; then
		log "warning: no git here and CUMO_COMMIT unset: the result records commit 'unknown'"
	elif [[ -z ${CUMO_COMMIT_DIRTY:-} ]]; then
		[[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && CUMO_COMMIT_DIRTY=1 || CUMO_COMMIT_DIRTY=0
	fi
fi
export CUMO_COMMIT CUMO_COMMIT_DIRTY=${CUMO_COMMIT_DIRTY:-}

{
	echo "date: $(date -u +%FT%TZ)"
	echo "commit: $CUMO_COMMIT dirty: ${CUMO_COMMIT_DIRTY:-unknown}"
	echo "work: $WORK"
	uname -a
	nvidia-smi 2>&1 | head -20
	"$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
	"$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
	"$PY" -c 'import transformers, numpy; print("transformers", transformers.__version__, "numpy", numpy.__version__)' 2>&1
	command -v nvcc && nvcc --version | tail -2
	command -v compute-sanitizer
} >"$LOGS/env.log" 2>&1
pack

# CuMo's six shapes first: a cut (the bench's --time-budget) leaves their rows whole. Then the gated
# shapes (issue 23), many small experts first: olmoe, qwen3-moe, gpt-oss, mixtral. Each new shape
# costs its Triton autotunes (~3.4 s each on the H200, ~6-8 per shape for fwd and fwd+bwd), so on a
# first call the bench's share (~165-180 s) is spent on CuMo's shapes (126 s on the first H200 run,
# two of them cut) and the gated ones are reached only by a second call on the warm machine, whose
# autotunes are cached: GPU_SUITE_STEPS=bench GPU_SUITE_BENCH_ARGS="--shapes olmoe,qwen3-moe".
# hf-eager and hf-grouped_mm (transformers' experts classes on the same weights) run the gated
# shapes only (no autotune: torch ops); hf-cumo is left out (it would autotune its own kernels).
SHAPES=clip-train,connector-train,clip-infer,connector-infer,clip-train-crops,clip-train-whole,olmoe,qwen3-moe,gpt-oss,mixtral
PROVIDERS=cumo-cuda,cumo-triton,cumo-torch,cumo-loop,grouped_mm,dense,dense-mlp,hf-grouped_mm,hf-eager,scattermoe,megablocks

if [[ $DRY == 1 ]]; then
	log "DRY RUN: would run, each bounded by timeout within ${BUDGET}s:"
	log "  wheels:    $PY -m pip install --no-index --no-deps wheels/*.whl .whl/*.whl"
	log "  build:     CUMO_CUDA_ARCHS=<this GPU, e.g. 90a> $PY -m pip install -v --no-build-isolation --no-deps -e ."
	log "  tests:     CUMO_REQUIRE_CUDA_EXT=1 CUMO_TRITON_AUTOTUNE=0 $PY -m pytest tests --cuda-only -m cuda, then -m 'not cuda' (-n $JOBS)"
	log "  bench:     $PY -m benchmarks --shapes $SHAPES --passes fwd+bwd,fwd --out $OUT/results.json --plot $OUT/plot.png"
	log "  sanitizer: compute-sanitizer --tool {memcheck,racecheck,initcheck} $PY benchmarks/sanitize_case.py"
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
		t=$(tmo 60 "$(reserve wheels)")
		if ((t == 0)); then
			log "wheels: no time left"
			break
		fi
		log "wheels: installing $d/*.whl (limit ${t}s)"
		if ! timeout "$t" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir $d/*.whl >>"$LOGS/wheels.log" 2>&1; then
			log "wheels: system install failed; --target /tmp/site instead"
			timeout "$t" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site $d/*.whl >>"$LOGS/wheels.log" 2>&1 &&
				export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
		fi
	done
fi

# 2. Build the package and its extension here (a build from another machine does not load).
# The build gets at least GPU_SUITE_BUILD_MIN seconds (default 90; it took 55 s on an H200
# machine's 16 cores, and a 62 s cap cut it) where the budget has them: the later steps' shares
# give way, since everything of the cuda backend waits on it.
BUILD_MIN=${GPU_SUITE_BUILD_MIN:-90}
build_limit() {
	local t left
	t=$(tmo 180 "$(reserve build)")
	left=$(tmo "$BUILD_MIN" 0)
	((t < left)) && t=$left
	echo "$t"
}
BUILD_NOTE="build: not run"
if want build && (($(build_limit) == 0)); then
	BUILD_NOTE="build: not run (no time left in the budget)"
	log "$BUILD_NOTE"
elif want build; then
	t=$(build_limit)
	# Only this GPU's arch (sm_90a on H100/H200: the CUTLASS sm90 path), unless CUMO_CUDA_ARCHS is set.
	archs=${CUMO_CUDA_ARCHS:-$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}a" if M == 9 else f"{M}{m}")' 2>/dev/null || echo "80;90a")}
	log "build: CUMO_CUDA_ARCHS=$archs pip install -v --no-build-isolation --no-deps -e . (limit ${t}s)"
	CUMO_CUDA_ARCHS=$archs MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 "$t" "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1
	rc=$?
	log "build: exit $rc"
	grep "cumo-kernels:" "$LOGS/build.log" | tail -5 | tee -a "$LOGS/suite.log"
	"$PY" -c 'import cumo_kernels._cuda as e; print("cumo_kernels._cuda build:", e.build_info())' 2>&1 | tee -a "$LOGS/suite.log"
	backends=$("$PY" -c 'import cumo_kernels as c; print(",".join(c.available_backends("cuda")))' 2>>"$LOGS/suite.log")
	log "build: available_backends('cuda') = [$backends]"
	if [[ $rc == 0 && ",$backends," == *",cuda,"* && ",$backends," == *",triton,"* ]]; then
		BUILD_NOTE="build: ok (exit 0), backends on cuda: $backends"
	else
		BUILD_NOTE="build: FAILED or incomplete (exit $rc), backends on cuda: [$backends]; the steps below ran without what is missing (see build.log)"
		log "$BUILD_NOTE"
	fi
	pack
fi

# 3. Tests on CUDA only (CI runs the CPU ones). SIGINT at the limit: pytest still writes its junit XML.
TEST_PHASES=()
if want tests; then
	xdist=()
	"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n "$JOBS")
	# A missing extension fails its tests instead of skipping them; one fixed Triton config per
	# kernel (test_triton_every_autotune_config still runs each config of the set).
	export CUMO_REQUIRE_CUDA_EXT=1
	t_all=$(tmo 300 "$(reserve tests)")
	end=$(($(elapsed) + t_all))
	for phase in gpu-only parametrised; do
		if [[ $phase == gpu-only ]]; then
			mark=cuda
			t=$((t_all < 120 ? t_all : 120))
		else
			mark="not cuda"
			t=$((end - $(elapsed)))
		fi
		if ((t < 5)); then
			log "tests ($phase): no time left in the tests' share"
			echo "NOT RUN: no time left in the tests' share" >"$LOGS/pytest-$phase.log"
			TEST_PHASES+=("$phase" "$LOGS/junit-$phase.xml" "$LOGS/pytest-$phase.log" 124)
			continue
		fi
		log "tests ($phase): pytest tests --cuda-only -m '$mark' ${xdist[*]} (limit ${t}s)"
		kexpr=()
		[[ -n ${GPU_SUITE_TEST_K:-} ]] && kexpr=(-k "$GPU_SUITE_TEST_K")
		CUMO_TRITON_AUTOTUNE=0 timeout -s INT -k 15 "$t" "$PY" -m pytest -q tests --cuda-only -m "$mark" "${kexpr[@]}" "${xdist[@]}" \
			-p no:cacheprovider --timeout 150 --junitxml="$LOGS/junit-$phase.xml" >"$LOGS/pytest-$phase.log" 2>&1
		rc=$?
		TEST_PHASES+=("$phase" "$LOGS/junit-$phase.xml" "$LOGS/pytest-$phase.log" "$rc")
		log "tests ($phase): exit $rc; $(grep -E '[0-9]+ (passed|failed|error|skipped)' "$LOGS/pytest-$phase.log" | tail -1)"
		grep -E "^(FAILED|ERROR) " "$LOGS/pytest-$phase.log" | head -20 | tee -a "$LOGS/suite.log"
	done
	"$PY" -m benchmarks.suite_tools tests "$LOGS/tests.json" "${TEST_PHASES[@]}" >>"$LOGS/suite.log" 2>&1
	pack
fi

# 4. The benchmarks: results.json after every row, plot.png after every shape. Autotuning happens
# in each provider's untimed warm-up call.
if want bench; then
	t=$(tmo 420 "$(reserve bench)")
	if ((t > 0)); then
		log "bench: python -m benchmarks (limit ${t}s) ${GPU_SUITE_BENCH_ARGS:-}"
		# TRITON_PRINT_AUTOTUNING: each autotune's time goes to bench.log (its compile share; NOTES.md)
		# shellcheck disable=SC2086
		TRITON_PRINT_AUTOTUNING=1 timeout -s INT -k 10 "$t" "$PY" -m benchmarks --shapes "$SHAPES" --passes fwd+bwd,fwd \
			--providers "$PROVIDERS" --out "$OUT/results.json" --plot "$OUT/plot.png" \
			--time-budget $((t > 90 ? t - 45 : t / 2)) ${GPU_SUITE_BENCH_ARGS:-} >"$LOGS/bench.log" 2>"$LOGS/bench.err"
		log "bench: exit $?"
		grep -v "^Triton autotuning\|^with key as\|^finished after\|^best config selected" "$LOGS/bench.log" | tail -60
	else
		log "bench: no time left"
	fi
	pack
fi

# 5. compute-sanitizer on a small case, autotuning off, after one warm run without the sanitizer
# (the Triton kernels compiled into the cache). A refused device is recorded as skipped.
if want sanitizer; then
	rm -f "$LOGS"/sanitizer-*.log "$LOGS"/sanitizer-*.rc
	export CUMO_TRITON_AUTOTUNE=0
	if command -v compute-sanitizer >/dev/null; then
		t=$(tmo 40 0)
		if ((t > 0)); then
			log "sanitizer: warm run without the sanitizer (limit ${t}s)"
			SANITIZE_CASE_BACKENDS=cuda,triton,torch,auto timeout -k 5 "$t" "$PY" benchmarks/sanitize_case.py >"$LOGS/sanitize-warm.log" 2>&1
			log "sanitizer: warm run exit $?"
		fi
	fi
	for tool in memcheck racecheck initcheck; do
		lg=$LOGS/sanitizer-$tool.log
		if ! command -v compute-sanitizer >/dev/null; then
			echo "NOT RUN: compute-sanitizer is not on the PATH" >"$lg"
			continue
		fi
		# memcheck over every backend, the cuda backend first; racecheck and initcheck on the
		# cuda backend (shared-memory races and uninitialised reads in our own kernels).
		case $tool in
		memcheck) bks=cuda,triton,torch,auto cap=90 ;;
		*) bks=cuda cap=60 ;;
		esac
		t=$(tmo $cap 0)
		if ((t == 0)); then
			echo "NOT RUN: the suite's time budget left no time for it" >"$lg"
			continue
		fi
		log "sanitizer: $tool on backends $bks (limit ${t}s)"
		# No caching allocator under memcheck/initcheck: every tensor is its own allocation,
		# so an out-of-bounds access cannot land silently in a neighbour inside a pooled block.
		SANITIZE_CASE_BACKENDS=$bks PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t" compute-sanitizer --tool "$tool" \
			--error-exitcode 99 --print-limit 30 "$PY" benchmarks/sanitize_case.py >"$lg" 2>&1
		echo $? >"$LOGS/sanitizer-$tool.rc"
		grep -E "SUMMARY|Device not supported|SANITIZE_CASE" "$lg" | tail -3 | tee -a "$LOGS/suite.log"
	done
	"$PY" -m benchmarks.suite_tools sanitizer "$LOGS" "$LOGS/sanitizer.json" >>"$LOGS/suite.log" 2>&1
	pack
fi

# 6. The records into the result file; auto's measured order only from a clean run.
"$PY" -m benchmarks.suite_tools finalize "$OUT/results.json" "$LOGS/tests.json" "$LOGS/sanitizer.json" 2>&1 | tee -a "$LOGS/suite.log"
rm -f "$OUT/auto_table.json"
"$PY" -m benchmarks.auto_table "$OUT/results.json" --out "$OUT/auto_table.json" 2>&1 | tee -a "$LOGS/suite.log"
[[ -f $OUT/results.json && ! -f $OUT/plot.png ]] && "$PY" -c "
import json, sys
from benchmarks import report
doc = json.load(open(sys.argv[1]))
why = report.plot(doc, sys.argv[2]) if doc['results'] else 'no rows'
print('plot:', why or 'written')" "$OUT/results.json" "$OUT/plot.png" 2>&1 | tee -a "$LOGS/suite.log"
rm -f "$OUT"/*.part "$OUT"/*.part.png "$OUT"/*.tmp

{
	echo "gpu_suite finished in $(elapsed)s of ${BUDGET}s; commit $CUMO_COMMIT (dirty: ${CUMO_COMMIT_DIRTY:-unknown}); work $WORK"
	echo "$BUILD_NOTE"
	[[ -f $LOGS/tests.json ]] && echo "tests: $("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ("passed","failed","skipped","exit_code","interrupted")}, "by backend:", d.get("by_backend"))' "$LOGS/tests.json")"
	grep -hE "^(FAILED|ERROR) " "$LOGS"/pytest-*.log 2>/dev/null | head -30
	[[ -f $LOGS/sanitizer.json ]] && echo "sanitizer: $(tr -d '\n' <"$LOGS/sanitizer.json")"
	[[ -f $OUT/auto_table.json ]] && echo "auto_table.json: written (the tests and sanitizer were clean)" || echo "auto_table.json: not written (see suite.log)"
	[[ -f $OUT/results.json ]] && "$PY" -m benchmarks --validate "$OUT/results.json"
	[[ -f $OUT/results.json ]] && "$PY" -c 'import json,sys; from benchmarks import report; print(report.table(json.load(open(sys.argv[1]))))' "$OUT/results.json"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
log "done"
pack
