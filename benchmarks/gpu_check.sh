#!/usr/bin/env bash
# One-shot GPU validation, sized for a GPU lent for a few minutes: 420 s of step limits in all.
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run] [--plan]
#
# On a machine with a GPU and torch already installed (no network needed), in this order, each
# step under its own time limit (STEPS below) and all of them inside TOTAL_LIMIT (420 s):
#   env    : GPU, driver, torch, triton and the test plugins present go into the log.
#   build  : the extension, in place, for the GPU present only (TORCH_CUDA_ARCH_LIST = its
#            compute capability), then a check that its CPU and CUDA kernels loaded.
#   tests  : the CUDA and Triton tests of the five ops (cross_scan, selective_scan and its 2-D
#            form, patchwise_softmax_loss, patch_cross_attention, kmeans) with the compiled
#            library required (LESIONKIT_REQUIRE_OPS=1): `pytest -v` with a per-test timeout
#            (when pytest-timeout is installed; otherwise only the step limit applies) and the
#            slowest tests listed. TEST_SELECT keeps the GPU cases and drops the hypothesis
#            property runs, so the cold Triton compiles fit.
#   compile: torch.compile (Inductor) of every op on every backend, forward + backward, against
#            the reference (benchmarks/compile_check.py), kernel backends first.
#   bench  : every op against its unfused PyTorch reference: forward / forward + backward ms,
#            speed-up, GB/s and share of HBM bandwidth (benchmarks/quick_bench.py).
# Writes into DIR (default gpu_check_out/<gpu>-<date>): gpu_check.log, one log per step,
# tests.xml, results/<gpu>-gpu_check.json (copy it into benchmarks/results/ to commit it) and
# summary.md, which is rewritten after every step, so a run killed from outside still returns
# what it did. With the device tool, whose $OUT folder comes back: --out "$OUT/gpu".
# The exit status is non-zero when any step failed or ran out of time.
#
# --dry-run runs the same steps on the CPU (tiny shapes, the build only checked, the test
# selection collected but only one test run); --plan prints the steps, their limits and the test
# selection and exits. tests/test_gpu_check.py runs both.
set -uo pipefail
cd "$(dirname "$0")/.."

# name:limit_s, in order; the limits sum to at most TOTAL_LIMIT. GPU_CHECK_STEPS="env:10 build:90 ..."
# resizes them for a longer lease (all five names, in this order).
read -r -a STEPS <<< "${GPU_CHECK_STEPS:-env:10 build:100 tests:200 compile:55 bench:55}"
TOTAL_LIMIT="${TOTAL_LIMIT:-420}"
# The test files of the five ops (plus the launch-level and library checks), most telling first.
TEST_FILES=(tests/test_required_ops.py tests/test_kernel_launches.py tests/test_patch_cross_attention.py
            tests/test_kmeans.py tests/test_cross_scan.py tests/test_selective_scan.py tests/test_vmunet.py
            tests/test_patchwise_softmax_loss.py)
# GPU backends by parameter id (cuda-cuda, triton-cuda), the library checks, VM-UNet's 2-D scan
# tests; no hypothesis property runs.
TEST_SELECT="(cuda or triton or required or library or ss2d or vss_block) and not property"
PER_TEST_TIMEOUT=60

DRY_RUN=0
PLAN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --plan) PLAN=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --dry-run, --plan, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$PLAN" = 1 ]; then
  total=0
  for s in "${STEPS[@]}"; do echo "step ${s%%:*} ${s##*:}"; total=$(( total + ${s##*:} )); done
  echo "total $total of $TOTAL_LIMIT"
  echo "test_select $TEST_SELECT"
  printf 'test_file %s\n' "${TEST_FILES[@]}"
  exit 0
fi

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of this checkout
START=$(date +%s)

if [ "$DRY_RUN" = 1 ]; then
  GPU="dry-run-cpu"
else
  GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())" 2>/dev/null) || {
    echo "no CUDA device visible to torch; use --dry-run on a CPU machine" >&2; exit 2; }
fi
OUT="${OUT:-gpu_check_out/$GPU-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: > "$LOG"
STATUS=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

write_summary() {
  {
    echo "# gpu_check on $GPU"
    echo
    echo "$(date -u +%FT%TZ), dry run: $DRY_RUN, $(( $(date +%s) - START )) s so far of ${TOTAL_LIMIT} s."
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    if [ -f "$OUT/tests.log" ]; then
      echo "Tests: $(grep -cE ' PASSED' "$OUT/tests.log") passed, $(grep -cE ' FAILED| ERROR' "$OUT/tests.log") failed or errors, $(grep -cE ' SKIPPED' "$OUT/tests.log") skipped."
      grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -40
      echo
    fi
    [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
  } > "$OUT/summary.md"
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left), output to the step log.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( TOTAL_LIMIT - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    log "== $name: skipped, the ${TOTAL_LIMIT}s budget is spent"
    STATUS+=("| $name | skipped (no time left) | 0 |"); FAILED=1; write_summary; return
  fi
  log "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; FAILED=1
  elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; FAILED=1; fi
  log "== $name: $verdict in ${dt}s"
  STATUS+=("| $name | $verdict | $dt |")
  write_summary
}

env_info() {
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" - <<'EOF'
import importlib.util, platform
import torch
print(platform.platform(), "python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
for mod in ("pytest", "pytest_timeout", "hypothesis", "ninja", "sklearn", "scipy"):
    print(f"{mod:15s}", "yes" if importlib.util.find_spec(mod) else "MISSING")
EOF
}

build() {
  if [ "$DRY_RUN" = 1 ]; then
    # The CPU build is what `make setup` already did; check it loads instead of rebuilding.
    "$PYTHON" -c "from lesionkit.kernels import _library as l; assert l.HAS_OPS, l.LOAD_ERROR"
    LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m lesionkit.kernels
    return
  fi
  local arch
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  "$PYTHON" -c "import ninja" 2>/dev/null && echo "ninja: yes (parallel compile)" \
    || echo "ninja: MISSING (the sources compile one at a time)"
  echo "building in place for compute capability $arch only"
  TORCH_CUDA_ARCH_LIST="$arch" LESIONKIT_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" setup.py build_ext --inplace || return 1
  LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m lesionkit.kernels
}

tests() {
  set -o pipefail
  local flags=(-v -p no:cacheprovider -rfEs --durations=25 --junitxml "$OUT/tests.xml")
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    flags+=(--timeout="$PER_TEST_TIMEOUT")
  else
    echo "pytest-timeout missing: no per-test timeout, only the step limit"
  fi
  if [ "$DRY_RUN" = 1 ]; then
    # The selection must collect from every file; one test then runs.
    LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider -k "$TEST_SELECT" \
      "${TEST_FILES[@]}" | tail -n 3 || return 1
    LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m pytest "${flags[@]}" tests/test_required_ops.py::test_compiled_library_loaded
    return
  fi
  LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m pytest "${flags[@]}" -k "$TEST_SELECT" "${TEST_FILES[@]}"
}

export PYTHON DRY_RUN OUT TEST_SELECT PER_TEST_TIMEOUT
export TEST_FILES_LIST="${TEST_FILES[*]}"
export -f env_info build tests
# bash cannot export arrays: the tests step rebuilds TEST_FILES from the exported string.
tests_step() { read -r -a TEST_FILES <<< "$TEST_FILES_LIST"; tests; }
export -f tests_step
size=$([ "$DRY_RUN" = 1 ] && echo tiny || echo gpu)
log "lesionkit gpu_check on $GPU ($(date -u +%FT%TZ)), dry run: $DRY_RUN, output: $OUT"
for s in "${STEPS[@]}"; do
  name=${s%%:*} limit=${s##*:}
  budget=$(( limit > 30 ? limit - 15 : limit ))  # the Python steps stop starting work in time to write it out
  case "$name" in
    env) step env "$limit" env_info ;;
    build) step build "$limit" build ;;
    tests) step tests "$limit" tests_step ;;
    compile) step compile "$limit" "'$PYTHON' benchmarks/compile_check.py --size $size --budget-s $budget" ;;
    bench) step bench "$limit" "'$PYTHON' benchmarks/quick_bench.py --size $size --skip-compiled --budget-s $budget \
      --json '$OUT/results/$GPU-gpu_check.json' --markdown '$OUT/bench.md'" ;;
  esac
done
write_summary
log "summary: $OUT/summary.md"
exit $FAILED
