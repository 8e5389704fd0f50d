#!/usr/bin/env bash
# GPU runbook: on a bare CUDA machine, in one call, check manualbp and benchmark it.
#
#   experiments/gpu_check.sh DIR
#
# Run from anywhere; it works in the repository that holds this script. Steps, each with its own
# time limit so the whole run stays under ~8 minutes:
#   1. environment: GPU, python, torch, triton -> DIR/summary.log
#   2. install: `pip install --no-deps --no-build-isolation -e .` into the machine's own python
#      (its torch and triton are kept; `manualbp.triton_kernels` maps to ./triton_kernels only
#      through the installed package-dir mapping). If that fails (old setuptools, no pip), a
#      symlink manualbp/triton_kernels -> ../triton_kernels plus PYTHONPATH does the same job
#      and is removed on exit. Missing test/plot dependencies are installed from ./.whl when
#      that folder of wheels exists (the machine has no network).
#   3. the test suite with CUDA tensors (MANUALBP_CUDA_TESTS=1): the `cuda`-marked tests first (the
#      Triton kernels on the GPU), then `not cuda and not interpreter` in the time left
#      -> DIR/tests.log
#   4. a benchmark subset (python -m manualbp.bench, bfloat16, all contenders)
#      -> DIR/bench.log, DIR/bench.csv, DIR/bench.md, DIR/bench.png
#   5. experiments/bench_triton_layer.py, if it exists -> DIR/triton_layer.log (its Markdown
#      table) and DIR/bench_triton_layer.csv
# DIR ends up with at most 8 files, one level deep. The exit status is the first failing step's.
#
# Knobs (environment): PYTHON (default: python or python3, whichever imports torch),
# TESTS_TIMEOUT (s, 180), BENCH_TIMEOUT (s, 180), BENCH_BUDGET (s, 120: no new bench case after
# this), TRITON_TIMEOUT (s, 150), TESTS (pytest paths, "tests"), BENCH_SHAPES / BENCH_LOSS_SHAPES (MxNxK lists),
# BENCH_DEVICE (cuda; "cpu" with small shapes for a dry run on a machine without a GPU).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR   (DIR receives the logs, CSV, Markdown and PNG)" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# The machine's own python with torch: $PYTHON, else the first of python, python3 that has torch.
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PY="$(command -v "$candidate")"
            break
        fi
    done
    PY="${PY:-python3}"
fi
TESTS_TIMEOUT="${TESTS_TIMEOUT:-180}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-180}"
BENCH_BUDGET="${BENCH_BUDGET:-120}"
TRITON_TIMEOUT="${TRITON_TIMEOUT:-150}"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
BENCH_SHAPES="${BENCH_SHAPES:-2048x2048x2048 8192x8192x8192}"
BENCH_LOSS_SHAPES="${BENCH_LOSS_SHAPES:-4096x32768x4096}"
TESTS="${TESTS:-tests}"
SUMMARY="$OUT/summary.log"
STATUS=0
START=$SECONDS

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }
step_done() {  # name rc
    log "$1: exit status $2"
    if [[ $2 -ne 0 && $STATUS -eq 0 ]]; then STATUS=$2; fi
}

: >"$SUMMARY"
log "gpu_check in $REPO -> $OUT (python: $PY)"

# ------------------------------------------------------------------------------- environment
{
    echo "--- nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi not available"
    echo "--- python"
    "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except Exception as e:
    print("torch: import failed:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: import failed:", e)
EOF
    echo "--- git"
    git -C "$REPO" log -1 --oneline 2>/dev/null || echo "(no git metadata)"
    git -C "$REPO" status --short 2>/dev/null | head -40
} >>"$SUMMARY" 2>&1

# ----------------------------------------------------------------------------------- install
LINK="$REPO/manualbp/triton_kernels"
cleanup() { if [[ -L "$LINK" ]]; then rm -f "$LINK"; fi; }
trap cleanup EXIT

installed_ok() {  # from outside the repository, so that only the installed mapping counts
    (cd / && "$PY" -c "import manualbp, manualbp.triton_kernels, manualbp.bench" >/dev/null 2>&1)
}

editable_install() {
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e "$REPO" >>"$SUMMARY" 2>&1
}
log "install: pip install --no-deps --no-build-isolation -e ."
editable_install
if ! installed_ok && [[ -d "$REPO/.whl" ]]; then
    # pyproject's `license = "MIT"` (PEP 639) needs setuptools >= 77; older ones reject it.
    log "install: retrying after installing setuptools>=77 from $REPO/.whl"
    "$PY" -m pip install -q --no-index --find-links "$REPO/.whl" "setuptools>=77" >>"$SUMMARY" 2>&1
    editable_install
fi
if installed_ok; then
    log "install: editable install OK"
else
    log "install: editable install failed; falling back to a symlink and PYTHONPATH" \
        "(tests/test_install.py, which checks the installed mapping, will then fail)"
    if [[ ! -e "$LINK" ]]; then ln -s ../triton_kernels "$LINK"; fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    (cd / && "$PY" -c "import manualbp.triton_kernels" >>"$SUMMARY" 2>&1)
    step_done "install (fallback)" $?
fi

missing=()
for module in pytest hypothesis matplotlib rich xdist lightning torchmetrics jsonargparse sklearn; do
    "$PY" -c "import $module" >/dev/null 2>&1 || missing+=("$module")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "missing python modules: ${missing[*]}"
    if [[ -d "$REPO/.whl" ]]; then
        declare -A PIPNAME=([xdist]=pytest-xdist [sklearn]=scikit-learn)
        names=()
        for module in "${missing[@]}"; do names+=("${PIPNAME[$module]:-$module}"); done
        log "installing ${names[*]} from $REPO/.whl (no network)"
        "$PY" -m pip install -q --no-index --find-links "$REPO/.whl" "${names[@]}" >>"$SUMMARY" 2>&1
        step_done "wheels" $?
    else
        log "no ./.whl folder of wheels: tests needing those modules will fail to import"
    fi
fi

# ------------------------------------------------------------------------------------- tests
# The CUDA-marked tests first (the Triton kernels on the GPU: what CI cannot run), then the rest
# of the suite in the time left; both with CUDA tensors (MANUALBP_CUDA_TESTS=1).
parallel=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then parallel=(-n 8); fi
run_tests() {  # marker-expression seconds
    echo "===== pytest -m '$1' (limit $2 s)" >>"$OUT/tests.log"
    MANUALBP_CUDA_TESTS=1 timeout -s INT -k 20 "$2" \
        "$PY" -m pytest -q -m "$1" ${parallel[@]+"${parallel[@]}"} -p no:cacheprovider \
        --continue-on-collection-errors --durations=10 -rfE $TESTS >>"$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 1 "$OUT/tests.log" | tee -a "$SUMMARY"
    if [[ $rc -eq 5 ]]; then rc=0; fi  # 5: no test matched the marker
    return $rc
}
: >"$OUT/tests.log"
tests_start=$SECONDS
log "tests: MANUALBP_CUDA_TESTS=1 pytest -m cuda, then -m 'not cuda and not interpreter and not aot' (limit ${TESTS_TIMEOUT}s)"
run_tests "cuda" $((TESTS_TIMEOUT * 2 / 3))
step_done "tests (cuda)" $?
left=$((TESTS_TIMEOUT - (SECONDS - tests_start)))
if [[ $left -lt 30 ]]; then left=30; fi
run_tests "not cuda and not interpreter and not aot" "$left"
step_done "tests (the rest)" $?

# --------------------------------------------------------------------------------- benchmark
# bfloat16 (the tensor-core path) on two square layers, the same shapes for the MLP step (depth
# 4) and memory, and a vocabulary-sized linear + cross-entropy head (4096 tokens, 32768 classes,
# 4096 hidden). Cases run suite by suite, so a spent budget cuts the memory suite first; the
# memory suite leaves torch.compile out (one compile per case would not fit the budget).
log "bench: python -m manualbp.bench (budget ${BENCH_BUDGET}s, limit ${BENCH_TIMEOUT}s)"
timeout -s INT -k 20 "$BENCH_TIMEOUT" \
    "$PY" -m manualbp.bench --device "$BENCH_DEVICE" --dtypes bfloat16 --activations gelu \
    --shapes $BENCH_SHAPES --loss-shapes $BENCH_LOSS_SHAPES \
    --suites layer mlp loss memory --depth 4 \
    --contenders manualbp-triton manualbp-torch native compile \
    --memory-contenders manualbp-triton manualbp-torch native \
    --time-budget "$BENCH_BUDGET" --no-progress --out "$OUT" --name bench >"$OUT/bench.log" 2>&1
rc=$?
tail -n 2 "$OUT/bench.log" | tee -a "$SUMMARY"
step_done "bench" $rc

# ------------------------------------------------------------------- the Triton layer script
if [[ -f "$REPO/experiments/bench_triton_layer.py" ]]; then
    log "experiments/bench_triton_layer.py (limit ${TRITON_TIMEOUT}s)"
    timeout -s INT -k 10 "$TRITON_TIMEOUT" "$PY" "$REPO/experiments/bench_triton_layer.py" \
        --out "$OUT" >"$OUT/triton_layer.log" 2>&1
    step_done "bench_triton_layer" $?
else
    log "experiments/bench_triton_layer.py does not exist: skipped"
fi

files=$(find "$OUT" -type f | wc -l)
log "done in $((SECONDS - START))s; $files files in $OUT; exit status $STATUS"
if [[ $files -gt 8 ]]; then log "warning: more than 8 files in $OUT; only 8 come back from the GPU machine"; fi
exit "$STATUS"
