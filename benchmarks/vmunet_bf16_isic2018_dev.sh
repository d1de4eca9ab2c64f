#!/usr/bin/env bash
# Does the paper-scale VM-UNet hold its accuracy in bfloat16 (docs/cmssm.md, "The paper-scale
# recipes in bf16")? `vmunet_isic2018` at 256 px on isic2018-dev (train 1,212 / val 301) in fp32
# and in bf16, two seeds each, the same number of epochs (EPOCHS, default 3) so the two
# precisions make the same steps; batch 8 instead of the recipe's 32 so that a CPU run makes a few
# hundred steps (the same for both arms). Two runs at a time, one per precision (each
# precision's seeds one after the other), one thread each, nothing else on the machine; each
# run's best checkpoint is evaluated on the validation split.
#   benchmarks/vmunet_bf16_isic2018_dev.sh [DEV_PATH] [OUT_DIR]
#   python benchmarks/cmssm_dev_table.py OUT_DIR       # the table (dataset / per-image Dice)
# DEV_PATH defaults to $LESIONKIT_ISIC2018_DEV, then ../shared/data/isic2018-dev. Finished runs
# (an existing eval/metrics.json) are skipped, so the script can be restarted.
set -euo pipefail
DEV=${1:-${LESIONKIT_ISIC2018_DEV:-../shared/data/isic2018-dev}}
OUT=${2:-runs/vmunet_bf16_isic2018_dev}
PY=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-3}
SEEDS=${SEEDS:-"0 1"}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%H:%M:%S) $* | $(uptime | sed 's/.*load/load/')" | tee -a "$OUT/runs.txt"; }

run_one() {  # name seed precision
  local name=$1 seed=$2 precision=$3
  local dir="$OUT/$name"
  [ -f "$dir/eval/metrics.json" ] && return 0
  rm -rf "$dir"
  "$PY" -m lesionkit train --config vmunet_isic2018 --data "isic:$DEV:train" --val-data "isic:$DEV:val" \
    --out "$dir" --seed "$seed" --epochs "$EPOCHS" --batch-size 8 --precision "$precision" --no-progress \
    --set data.num_workers=1 > "$dir.log" 2>&1
  "$PY" -m lesionkit evaluate --checkpoint "$dir/best.pt" --data "isic:$DEV:val" --out "$dir/eval" \
    --no-progress > "$dir.eval.log" 2>&1
}

lane() {  # precision: its runs one after the other, seeds in order
  local precision=$1 seed
  for seed in $SEEDS; do
    log "start vmunet256_${precision}_s$seed"
    run_one "vmunet256_${precision}_s$seed" "$seed" "$precision"
    log "done vmunet256_${precision}_s$seed"
  done
}

lane fp32 &
pa=$!
lane bf16 &
pb=$!
wait $pa; wait $pb
log "all done"
