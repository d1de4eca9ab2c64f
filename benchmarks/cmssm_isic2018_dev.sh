#!/usr/bin/env bash
# CM-SSM U-Net against VM-UNet on isic2018-dev at 128 px (docs/cmssm.md): vmunet_tiny and
# cmssm_tiny under one recipe (their tiny recipes differ only in model, trainer and the cmssm:
# block), 600 s each, seeds 0-2, plus one-seed rows: Table 4 row 1 (no SE / CMN / CRA, FD on),
# Table 5 row 1 (no FD), the tiny recipe's choices (CMN ratio 2, drop path 0.1, distillation
# from epoch 1) and cmssm_tiny at equal steps (a 744 s budget). Table 4 row 8 and Table 5 row 4
# are cmssm_tiny itself. Two runs at a time, one
# thread each, nothing else on the machine; each run's best checkpoint evaluated on the
# validation split.
#   benchmarks/cmssm_isic2018_dev.sh [DEV_PATH] [OUT_DIR]
#   python benchmarks/cmssm_dev_table.py OUT_DIR       # the tables of docs/cmssm.md
# DEV_PATH defaults to $LESIONKIT_ISIC2018_DEV, then ../shared/data/isic2018-dev. Finished runs
# (an existing eval/metrics.json) are skipped, so the script can be restarted. RUNS selects pairs.
set -euo pipefail
DEV=${1:-${LESIONKIT_ISIC2018_DEV:-../shared/data/isic2018-dev}}
OUT=${2:-runs/cmssm_isic2018_dev}
PY=${PYTHON:-.venv/bin/python}
BUDGET=${BUDGET:-600}
STEPS_BUDGET=${STEPS_BUDGET:-744}  # cmssm_steps: as many steps as vmunet_tiny makes in BUDGET
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%H:%M:%S) $* | $(uptime | sed 's/.*load/load/')" | tee -a "$OUT/runs.txt"; }

# name|config|seed|budget (s)|overrides (the 3-seed float32 rows of 4 December pin precision=fp32)
ALL_PAIRS=(
  "vmunet_s0|vmunet_tiny_isic2018|0|$BUDGET|precision=fp32 ; cmssm_s0|cmssm_tiny_isic2018|0|$BUDGET|precision=fp32"
  "vmunet_s1|vmunet_tiny_isic2018|1|$BUDGET|precision=fp32 ; cmssm_s1|cmssm_tiny_isic2018|1|$BUDGET|precision=fp32"
  "vmunet_s2|vmunet_tiny_isic2018|2|$BUDGET|precision=fp32 ; cmssm_s2|cmssm_tiny_isic2018|2|$BUDGET|precision=fp32"
  "t4r1_s0|cmssm_tiny_isic2018|0|$BUDGET|model.kwargs.se=false model.kwargs.cmn=false model.kwargs.cra=false ; t5r1_s0|cmssm_tiny_isic2018|0|$BUDGET|cmssm.cfd=false cmssm.ifd=false"
  "cmn2_s0|cmssm_tiny_isic2018|0|$BUDGET|model.kwargs.cmn_ratio=2 ; dp01_s0|cmssm_tiny_isic2018|0|$BUDGET|model.kwargs.drop_path_rate=0.1"
  # Equal steps: cmssm_tiny's step takes 1.24x vmunet_tiny's (benchmarks/cmssm_step_time.py).
  "fdstart1_s0|cmssm_tiny_isic2018|0|$BUDGET|cmssm.fd_start_epochs=1 ; cmssm_steps_s0|cmssm_tiny_isic2018|0|$STEPS_BUDGET|"
  "cmssm_steps_s1|cmssm_tiny_isic2018|1|$STEPS_BUDGET| ; cmssm_steps_s2|cmssm_tiny_isic2018|2|$STEPS_BUDGET|"
  # The bf16 recipes (December 2026; docs/cmssm.md "Training speed"): two seeds each.
  "vmunet_bf16_s0|vmunet_tiny_isic2018|0|$BUDGET|precision=bf16 ; cmssm_bf16_s0|cmssm_tiny_isic2018|0|$BUDGET|precision=bf16"
  "vmunet_bf16_s1|vmunet_tiny_isic2018|1|$BUDGET|precision=bf16 ; cmssm_bf16_s1|cmssm_tiny_isic2018|1|$BUDGET|precision=bf16"
)
RUNS=${RUNS:-"0 1 2 3 4 5 6 7 8"}

run_one() {  # name config seed budget overrides...
  local name=$1 config=$2 seed=$3 budget=$4; shift 4
  local dir="$OUT/$name"
  [ -f "$dir/eval/metrics.json" ] && return 0
  rm -rf "$dir"
  # shellcheck disable=SC2068
  "$PY" -m lesionkit train --config "$config" --data "isic:$DEV:train" --val-data "isic:$DEV:val" --out "$dir" \
    --seed "$seed" --time-budget "$budget" --no-progress --set data.num_workers=1 $@ > "$dir.log" 2>&1
  "$PY" -m lesionkit evaluate --checkpoint "$dir/best.pt" --data "isic:$DEV:val" --out "$dir/eval" \
    --no-progress > "$dir.eval.log" 2>&1
}

for i in $RUNS; do
  IFS=';' read -r a b <<< "${ALL_PAIRS[$i]}"
  IFS='|' read -r na ca sa ba oa <<< "$(echo "$a" | xargs)"
  IFS='|' read -r nb cb sb bb ob <<< "$(echo "$b" | xargs)"
  log "start $na + $nb"
  # shellcheck disable=SC2086
  run_one "$na" "$ca" "$sa" "$ba" $oa &
  pa=$!
  # shellcheck disable=SC2086
  run_one "$nb" "$cb" "$sb" "$bb" $ob &
  pb=$!
  wait $pa; wait $pb
  log "done $na + $nb"
done
log "all done"
