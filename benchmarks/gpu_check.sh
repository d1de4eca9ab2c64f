#!/usr/bin/env bash
# One-shot GPU validation: run once whenever an NVIDIA GPU is available (a few minutes of it).
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# On a machine with a GPU and torch already installed (no network needed), in this order, each
# step under its own time limit and all of them inside TOTAL_LIMIT (8 min):
#   1. env    : GPU, driver, torch, triton; what the run is on goes into the log.
#   2. deps   : installs what the tests need and is missing (pytest, hypothesis, ...) from the
#               wheels in benchmarks/wheels/ (git-ignored), never from the network. Fill that
#               folder once, where there is network, for the GPU machine's Python version:
#                 pip download -d benchmarks/wheels --only-binary=:all: --python-version 3.12 \
#                     pytest pytest-benchmark hypothesis expecttest ninja nibabel scipy scikit-learn
#   3. build  : the extension with CPU and CUDA kernels for the GPU present only
#               (TORCH_CUDA_ARCH_LIST = its compute capability).
#   4. tests  : the kernel tests (CUDA and Triton cases run on the GPU) with the compiled
#               library required (LESIONKIT_REQUIRE_OPS=1).
#   5. compile: torch.compile (Inductor) over every op on every backend, forward + backward,
#               against the reference (benchmarks/compile_check.py).
#   6. bench  : a short timing of every op and provider, torch.compile included
#               (benchmarks/quick_bench.py).
# Writes into DIR (default gpu_check_out/<gpu>-<date>): gpu_check.log, one log per step,
# results/<gpu>-gpu_check.json (copy it into benchmarks/results/ to commit it) and summary.md.
# The exit status is non-zero when any step failed or ran out of time.
#
# --dry-run runs the same steps on the CPU with tiny shapes (no install, the build only checked,
# a test subset), so the script is tested without a GPU (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
TOTAL_LIMIT="${TOTAL_LIMIT:-480}"
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

# step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left), output to the step log.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( TOTAL_LIMIT - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    log "== $name: skipped, the ${TOTAL_LIMIT}s budget is spent"
    STATUS+=("| $name | skipped (no time left) | 0 |"); FAILED=1; return
  fi
  log "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  if declare -F "$1" > /dev/null; then  # a function of this script: run it in a child bash
    timeout --kill-after=10 "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$? dt=$(( $(date +%s) - t0 ))
  tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; FAILED=1
  elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; FAILED=1; fi
  log "== $name: $verdict in ${dt}s"
  STATUS+=("| $name | $verdict | $dt |")
}

deps() {
  local missing=()
  for mod in pytest pytest_benchmark hypothesis expecttest ninja scipy sklearn; do
    "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  echo "missing: ${missing[*]:-none}"
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: would install from benchmarks/wheels"; return 0; fi
  local pkgs=()
  for mod in "${missing[@]}"; do
    case "$mod" in pytest_benchmark) pkgs+=(pytest-benchmark) ;; sklearn) pkgs+=(scikit-learn) ;; *) pkgs+=("$mod") ;; esac
  done
  "$PYTHON" -m pip install --no-index --find-links benchmarks/wheels "${pkgs[@]}"
}

build() {
  if [ "$DRY_RUN" = 1 ]; then
    # The CPU build is what `make setup` already did; check it loads instead of rebuilding.
    LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m lesionkit.kernels
    "$PYTHON" -c "from lesionkit.kernels import _library as l; assert l.HAS_OPS, l.LOAD_ERROR"
    return
  fi
  local arch
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  echo "building for compute capability $arch only"
  TORCH_CUDA_ARCH_LIST="$arch" LESIONKIT_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
    && "$PYTHON" -m lesionkit.kernels
}

tests() {
  local files=(tests/test_required_ops.py::test_compiled_library_loaded)  # the dry run's subset
  if [ "$DRY_RUN" = 0 ]; then
    files=(tests/test_required_ops.py tests/test_kernel_launches.py tests/test_patchwise_softmax_loss.py
           tests/test_selective_scan.py tests/test_cross_scan.py tests/test_scan_regimes.py
           tests/test_op_properties.py tests/test_kernels_backend.py)
  fi
  LESIONKIT_REQUIRE_OPS=1 "$PYTHON" -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT/tests.xml" "${files[@]}"
}

export PYTHON DRY_RUN OUT
export -f deps build tests
size=$([ "$DRY_RUN" = 1 ] && echo tiny || echo gpu)
log "lesionkit gpu_check on $GPU ($(date -u +%FT%TZ)), dry run: $DRY_RUN, output: $OUT"
step env 30 bash -c "nvidia-smi 2>/dev/null || echo 'no nvidia-smi'; '$PYTHON' -m lesionkit.kernels 2>&1 || true; \
  '$PYTHON' -c 'import torch, platform; print(platform.platform(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda)'"
step deps 60 deps
step build 240 build
step tests 150 tests
step compile 90 "$PYTHON" benchmarks/compile_check.py --size "$size"
step bench 90 "$PYTHON" benchmarks/quick_bench.py --size "$size" --json "$OUT/results/$GPU-gpu_check.json" \
  --markdown "$OUT/bench.md"

{
  echo "# gpu_check on $GPU"
  echo
  echo "$(date -u +%FT%TZ), dry run: $DRY_RUN, total $(( $(date +%s) - START )) s of ${TOTAL_LIMIT} s."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
} > "$OUT/summary.md"
log "summary: $OUT/summary.md"
exit $FAILED
