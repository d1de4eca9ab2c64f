#!/usr/bin/env bash
# GRCSF against its UNet++ baseline on isic2018-dev at 128 px (docs/grcsf.md): the MAE
# (grcsf_mae_tiny_isic2018, 180 s) and its residual maps of the train and val images made once,
# as pre-training; then 600 s of segmentation training for unetpp_tiny and grcsf_tiny under their
# shared recipe, seeds 0-2; then at seed 0 the Table 3 rows not already among those runs (row 1,
# UNet++, is unetpp_s0; row 4, GRCSF, is grcsf_s0): GRCSF w/o RCU and w/o importance score; and
# the paper's Dice + focal loss for both; and unetpp_tiny under GRCSF's first tiny recipe (Adam
# 1e-3, Dice + focal, half-epoch warm-up), the evidence for the shared recipe; and grcsf_tiny
# given as many steps as unetpp_tiny takes in 600 s (7 epochs, 1,057 steps; about 1,200 s).
# Two lanes, one run each at a time, one thread per run, nothing else on the machine; each run's
# best checkpoint evaluated on the validation split (GRCSF with its cached maps).
#   benchmarks/grcsf_isic2018_dev.sh [DEV_PATH] [OUT_DIR]
#   python benchmarks/grcsf_dev_table.py OUT_DIR        # the tables of docs/grcsf.md
# DEV_PATH defaults to $LESIONKIT_ISIC2018_DEV, then ../shared/data/isic2018-dev. Finished runs
# (an existing eval/metrics.json) are skipped, so the script can be restarted. LANES selects lanes
# (A and B: the runs above; C and D: the recipe choice below; E and F: the three seeds of each arm only;
# G and H: grcsf_tiny given unetpp_tiny's 7 epochs at seeds 0-2, to run after E and F in the same OUT_DIR;
# J: grcsf_tiny with the top stage's RCU disconnected (Sec. 4), seeds 0-2, beside lane F;
# K: the same as J on an MAE pre-trained three times as long (540 s, its own maps), beside lane F).
set -euo pipefail
DEV=${1:-${LESIONKIT_ISIC2018_DEV:-../shared/data/isic2018-dev}}
OUT=${2:-runs/grcsf_isic2018_dev}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "$(date -u +%H:%M:%S) $* | $(uptime | sed 's/.*load/load/')" | tee -a "$OUT/runs.txt"; }

MAPS="grcsf.mae_checkpoint=$OUT/mae/last.pt grcsf.residual_maps=$OUT/maps"
NO_MAE="grcsf.mae_checkpoint=null grcsf.residual_maps=null"
FOCAL="loss.name=dice_focal loss.kwargs.focal_alpha=0.25 loss.kwargs.focal_gamma=2.0"
# GRCSF's first tiny recipe, to choose the shared one on the baseline
OLD_GRCSF="$FOCAL optim.name=adam optim.lr=1e-3 optim.weight_decay=0 scheduler.warmup_epochs=0.5"
# As many epochs as unetpp_tiny trains in 600 s (7), with the cosine over those epochs
STEPS="time_budget=null scheduler.horizon=epochs epochs=7"
# name|config|seed|overrides
LANE_A=(
  "grcsf_s0|grcsf_tiny_isic2018|0|$MAPS" "grcsf_s1|grcsf_tiny_isic2018|1|$MAPS" "grcsf_s2|grcsf_tiny_isic2018|2|$MAPS"
  "no_rcu_s0|grcsf_tiny_isic2018|0|$NO_MAE model.kwargs.use_rcu=false"
  "grcsf_focal_s0|grcsf_tiny_isic2018|0|$MAPS $FOCAL"
  "grcsf_steps_s0|grcsf_tiny_isic2018|0|$MAPS $STEPS"
)
LANE_B=(
  "unetpp_s0|unetpp_tiny_isic2018|0|" "unetpp_s1|unetpp_tiny_isic2018|1|" "unetpp_s2|unetpp_tiny_isic2018|2|"
  "no_importance_s0|grcsf_tiny_isic2018|0|$MAPS model.kwargs.use_importance_score=false"
  "unetpp_focal_s0|unetpp_tiny_isic2018|0|$FOCAL"
  "unetpp_oldgrcsf_s0|unetpp_tiny_isic2018|0|$OLD_GRCSF"
)
# The recipe choice on three baseline seeds (LANES="C D", any machine): the shared recipe
# against GRCSF's first tiny recipe, both on unetpp_tiny, seeds 0-2, side by side.
LANE_C=("${LANE_B[@]:0:3}")  # unetpp_s0..2, the shared recipe's runs of lane B
LANE_D=("unetpp_oldgrcsf_s0|unetpp_tiny_isic2018|0|$OLD_GRCSF" "unetpp_oldgrcsf_s1|unetpp_tiny_isic2018|1|$OLD_GRCSF"
        "unetpp_oldgrcsf_s2|unetpp_tiny_isic2018|2|$OLD_GRCSF")
# The three-seed table alone (LANES="E F"): lanes A and B cut to their first three runs.
LANE_E=("${LANE_A[@]:0:3}")
LANE_F=("${LANE_B[@]:0:3}")
# GRCSF at UNet++'s step count on three seeds (LANES="G H"; its seed 0 is lane A's grcsf_steps_s0).
LANE_G=("${LANE_A[5]}" "grcsf_steps_s2|grcsf_tiny_isic2018|2|$MAPS $STEPS")
LANE_H=("grcsf_steps_s1|grcsf_tiny_isic2018|1|$MAPS $STEPS")
# GRCSF without the RCU at the input's resolution, the costliest of the three (LANES="F J").
NOTOP="model.kwargs.rcu_disconnected=[0]"
LANE_J=("grcsf_notop_s0|grcsf_tiny_isic2018|0|$MAPS $NOTOP" "grcsf_notop_s1|grcsf_tiny_isic2018|1|$MAPS $NOTOP"
        "grcsf_notop_s2|grcsf_tiny_isic2018|2|$MAPS $NOTOP")
MAPS_LONG="grcsf.mae_checkpoint=$OUT/mae_long/last.pt grcsf.residual_maps=$OUT/maps_long"
LANE_K=("grcsf_notop_longmae_s0|grcsf_tiny_isic2018|0|$MAPS_LONG $NOTOP"
        "grcsf_notop_longmae_s1|grcsf_tiny_isic2018|1|$MAPS_LONG $NOTOP"
        "grcsf_notop_longmae_s2|grcsf_tiny_isic2018|2|$MAPS_LONG $NOTOP")
LANES=${LANES:-"A B"}

pretrain() {  # the MAE and the maps, once; lane A waits for them, lane B starts with unetpp
  # pretrain [TAG SECONDS]: another MAE ($OUT/mae$TAG, maps in $OUT/maps$TAG) with that time budget
  local tag=${1:-} budget=${2:-} extra=""
  [ -n "$budget" ] && extra="time_budget=$budget"
  if [ ! -f "$OUT/mae$tag/last.pt" ]; then
    log "start mae$tag"
    # shellcheck disable=SC2086
    "$PY" -m lesionkit train --config grcsf_mae_tiny_isic2018 --data "isic:$DEV:train" --out "$OUT/mae$tag" \
      --no-progress --set data.num_workers=1 $extra > "$OUT/mae$tag.log" 2>&1
    log "done mae$tag: $(tail -1 "$OUT/mae$tag.log" | cut -c1-100)"
  fi
  local split
  for split in train val; do
    if [ ! -f "$OUT/maps$tag.$split.log" ]; then
      log "start maps$tag $split"
      "$PY" -m lesionkit residual-maps --checkpoint "$OUT/mae$tag/last.pt" --data "isic:$DEV:$split" \
        --out "$OUT/maps$tag" --image-size 128 --no-progress > "$OUT/maps$tag.$split.log.tmp" 2>&1
      mv "$OUT/maps$tag.$split.log.tmp" "$OUT/maps$tag.$split.log"
      log "done maps$tag $split: $(tail -1 "$OUT/maps$tag.$split.log" | cut -c1-120)"
    fi
  done
}

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
  case "$l" in
    A) (pretrain && lane "${LANE_A[@]}") & ;;
    B) lane "${LANE_B[@]}" & ;;
    C) lane "${LANE_C[@]}" & ;;
    D) lane "${LANE_D[@]}" & ;;
    E) (pretrain && lane "${LANE_E[@]}") & ;;
    F) lane "${LANE_F[@]}" & ;;
    G) (pretrain && lane "${LANE_G[@]}") & ;;
    H) lane "${LANE_H[@]}" & ;;
    J) (pretrain && lane "${LANE_J[@]}") & ;;
    K) (pretrain _long 540 && lane "${LANE_K[@]}") & ;;
    *) echo "unknown lane $l (A, B, C, D, E, F, G, H, J, K)" >&2; exit 2 ;;
  esac
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
log "all done"
