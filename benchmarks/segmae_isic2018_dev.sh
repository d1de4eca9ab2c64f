#!/usr/bin/env bash
# SegMAE against its TransUNet baseline on isic2018-dev at 128 px (docs/segmae.md): segmae_tiny and
# transunet_tiny under one recipe (their tiny recipes differ only in model and the MAE branch),
# seeds 0-2, under both protocols:
#   time_*   equal wall time: 600 s each, SegMAE's MAE epoch and reconstruction steps included;
#   steps_*  equal segmentation steps (the paper's Table 4 protocol): EPOCHS epochs of segmentation
#            for both, SegMAE's MAE epoch and reconstruction steps not charged; cosine over epochs.
# Then one-seed rows under the equal-time protocol: mask_mode pixel, mae_epochs 0 (Table 4 row 6),
# mask ratio 0.5, per-task optimisers, and the old restart between the stages; then mask_mode pixel
# (the best of those rows) on seeds 1-2 and under the equal-steps protocol. PIXEL= (empty) once the
# recipe itself masks pixels.
# Two lanes, one run each at a time, one thread per run, nothing else on the machine; each run's
# best checkpoint evaluated on the validation split.
#   benchmarks/segmae_isic2018_dev.sh [DEV_PATH] [OUT_DIR]
#   python benchmarks/segmae_dev_table.py OUT_DIR       # the tables of docs/segmae.md
# DEV_PATH defaults to $LESIONKIT_ISIC2018_DEV, then ../shared/data/isic2018-dev. Finished runs
# (an existing eval/metrics.json) are skipped, so the script can be restarted. LANES selects lanes.
set -euo pipefail
DEV=${1:-${LESIONKIT_ISIC2018_DEV:-../shared/data/isic2018-dev}}
OUT=${2:-runs/segmae_isic2018_dev}
PY=${PYTHON:-.venv/bin/python}
BUDGET=${BUDGET:-600}
EPOCHS=${EPOCHS:-10}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%H:%M:%S) $* | $(uptime | sed 's/.*load/load/')" | tee -a "$OUT/runs.txt"; }

PIXEL=${PIXEL-model.kwargs.mask_mode=pixel}
STEPS="time_budget=null scheduler.horizon=epochs epochs=$EPOCHS"
# name|config|seed|overrides; two lanes of about equal length, the 3-seed pairs first
LANE_A=(
  "seg_time_s0|segmae_tiny_isic2018|0|" "tu_time_s1|transunet_tiny_isic2018|1|" "seg_time_s2|segmae_tiny_isic2018|2|"
  "seg_steps_s0|segmae_tiny_isic2018|0|$STEPS" "tu_steps_s1|transunet_tiny_isic2018|1|$STEPS"
  "seg_steps_s2|segmae_tiny_isic2018|2|$STEPS"
  "pixel_s0|segmae_tiny_isic2018|0|$PIXEL" "ratio05_s0|segmae_tiny_isic2018|0|model.kwargs.mask_ratio=0.5"
  "pixel_s1|segmae_tiny_isic2018|1|$PIXEL" "pixel_steps_s0|segmae_tiny_isic2018|0|$PIXEL $STEPS"
  "pixel_steps_s2|segmae_tiny_isic2018|2|$PIXEL $STEPS"
)
LANE_B=(
  "tu_time_s0|transunet_tiny_isic2018|0|" "seg_time_s1|segmae_tiny_isic2018|1|" "tu_time_s2|transunet_tiny_isic2018|2|"
  "tu_steps_s0|transunet_tiny_isic2018|0|$STEPS" "seg_steps_s1|segmae_tiny_isic2018|1|$STEPS"
  "tu_steps_s2|transunet_tiny_isic2018|2|$STEPS"
  "mae0_s0|segmae_tiny_isic2018|0|segmae.mae_epochs=0" "pertask_s0|segmae_tiny_isic2018|0|segmae.optimizers=per_task"
  "pixel_s2|segmae_tiny_isic2018|2|$PIXEL" "pixel_steps_s1|segmae_tiny_isic2018|1|$PIXEL $STEPS"
  "restart_s0|segmae_tiny_isic2018|0|segmae.stage_transition=restart"
)
LANES=${LANES:-"A B"}

run_one() {  # name|config|seed|overrides
  local name config seed overrides
  IFS='|' read -r name config seed overrides <<< "$1"
  local dir="$OUT/$name"
  [ -f "$dir/eval/metrics.json" ] && return 0
  rm -rf "$dir"
  log "start $name"
  # shellcheck disable=SC2086
  "$PY" -m lesionkit train --config "$config" --data "isic:$DEV:train" --val-data "isic:$DEV:val" --out "$dir" \
    --seed "$seed" --no-progress --set data.num_workers=1 $overrides > "$dir.log" 2>&1
  "$PY" -m lesionkit evaluate --checkpoint "$dir/best.pt" --data "isic:$DEV:val" --out "$dir/eval" \
    --no-progress > "$dir.eval.log" 2>&1
  log "done $name: $(tail -1 "$dir.log" | cut -c1-100)"
}

lane() { local job; for job in "$@"; do run_one "$job"; done; }
pids=()
for l in $LANES; do
  if [ "$l" = A ]; then lane "${LANE_A[@]}" & else lane "${LANE_B[@]}" & fi
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
log "all done"
