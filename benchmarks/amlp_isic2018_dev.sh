#!/usr/bin/env bash
# AMLP against BASE (MAE-style random masking) and from-scratch training on isic2018-dev at 128 px
# (docs/amlp.md): pre-train amlp_unet_tiny on the training images (AMLP and BASE, seeds 0 and 1),
# fine-tune unet_tiny with 5 % and 10 % of the training labels (AMLP-init, BASE-init, scratch;
# the same seeded subset for the three at one seed), evaluate each on the validation split.
# One process at a time, one thread, equal time budgets per arm; two such lanes may run side by
# side (SEEDS, PRE_ARMS and FT_INITS split the work; a lane skips what another finished).
#   benchmarks/amlp_isic2018_dev.sh [DEV_PATH] [OUT_DIR]
#   python benchmarks/amlp_dev_table.py OUT_DIR        # the table of docs/amlp.md
# DEV_PATH defaults to $LESIONKIT_ISIC2018_DEV, then ../shared/data/isic2018-dev. Finished runs
# (an existing eval/metrics.json or best.pt) are skipped, so the script can be restarted.
set -euo pipefail
DEV=${1:-${LESIONKIT_ISIC2018_DEV:-../shared/data/isic2018-dev}}
OUT=${2:-runs/amlp_isic2018_dev}
PY=${PYTHON:-.venv/bin/python}
PRE_BUDGET=${PRE_BUDGET:-180}
FT_BUDGET=${FT_BUDGET:-120}
SEEDS=${SEEDS:-"0 1"}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
log() { echo "$(date -u +%H:%M:%S) $* | $(uptime | sed 's/.*load/load/')" | tee -a "$OUT/runs.txt"; }

# Pre-training arms (PRE_ARMS) as overrides of the tiny AMLP recipe: Table 3's rows (BASE, MPS,
# AMR, CRCL, AMLP) and Table 4's other masking order (h2e); FT_INITS: the fine-tuning inits.
PRE_ARMS=${PRE_ARMS:-"amlp base"}
# EXTRA_SET: --set overrides for every pre-training and fine-tuning run, e.g. the input
# standardisation "model.kwargs.input_mean=dataset model.kwargs.input_std=dataset".
EXTRA_SET=${EXTRA_SET:-}
FT_INITS=${FT_INITS:-"amlp base scratch"}
arm_set() {
  case "$1" in
    amlp) echo "" ;;
    base) echo "amlp.strategy=random amlp.amr=false amlp.mask_ratio=0.75 amlp.arl_weight=0 amlp.ccl_weight=0" ;;
    mps) echo "amlp.amr=false amlp.arl_weight=0 amlp.ccl_weight=0" ;;
    amr) echo "amlp.strategy=random amlp.arl_weight=0 amlp.ccl_weight=0" ;;
    crcl) echo "amlp.strategy=random amlp.amr=false" ;;
    h2e) echo "amlp.strategy=hard_to_easy" ;;
    *) echo "unknown arm $1" >&2; exit 2 ;;
  esac
}
for seed in $SEEDS; do
  for arm in $PRE_ARMS; do
    dir="$OUT/pretrain_${arm}_s${seed}"
    [ -f "$dir/best.pt" ] && continue
    extra=$(arm_set "$arm")
    log "start pretrain $arm seed $seed"
    # shellcheck disable=SC2086
    "$PY" -m lesionkit pretrain --config amlp_pretrain_tiny_isic2018 --data "isic:$DEV:train" --out "$dir" \
      --seed "$seed" --time-budget "$PRE_BUDGET" --no-progress --set data.num_workers=1 $extra $EXTRA_SET > "$dir.log" 2>&1
    log "done pretrain $arm seed $seed: $(tail -1 "$dir.log" | cut -c1-80)"
  done
done
for seed in $SEEDS; do
  for frac in 0.05 0.1; do
    for init in $FT_INITS; do
      dir="$OUT/finetune_${init}_f${frac}_s${seed}"
      [ -f "$dir/eval/metrics.json" ] && continue
      init_args=()
      [ "$init" != scratch ] && init_args=(--init-from "$OUT/pretrain_${init}_s${seed}/best.pt")
      log "start finetune $init fraction $frac seed $seed"
      "$PY" -m lesionkit train --config amlp_finetune_tiny_isic2018 --data "isic:$DEV:train" --out "$dir" \
        --seed "$seed" --label-fraction "$frac" --time-budget "$FT_BUDGET" "${init_args[@]}" --no-progress \
        --set data.num_workers=1 $EXTRA_SET > "$dir.log" 2>&1
      "$PY" -m lesionkit evaluate --checkpoint "$dir/best.pt" --data "isic:$DEV:val" --out "$dir/eval" \
        --no-progress > "$dir.eval.log" 2>&1
      log "done finetune $init fraction $frac seed $seed"
    done
  done
done
log "all done"
