#!/usr/bin/env bash
# Pretrained vs scratch on one task, each arm choosing its fine-tuning learning rate and
# pooling on the validation split (the same grid for both); the test split is scored once,
# for the chosen settings only. Prints accuracy ± SE per arm and the gap with its paired SE
# (both arms score the same test items) and combined SE; JSON records go to OUT.
#
#   scripts/encoder_vs_scratch.sh <export dir> <task> <out dir> [extra stlm.classify flags]
#   e.g. scripts/encoder_vs_scratch.sh runs/bert1_wiki800/export agnews runs/cmp --max_train=1000
#
# The scratch arm is the export's own config (same shape, same tokenizer), untrained.
# DATA defaults to $STLM_DATA_DIR or ../shared/data; LR_GRID / POOL_GRID / SEED override.
set -euo pipefail
EXPORT=$1; TASK=$2; OUT=$3; shift 3
DATA=${DATA:-${STLM_DATA_DIR:-../shared/data}}
LR_GRID=${LR_GRID:-1e-3,3e-3}
POOL_GRID=${POOL_GRID:-first,mean}
SEED=${SEED:-0}
mkdir -p "$OUT"
COMMON=(--task="$TASK" --data_dir="$DATA/classification/$TASK" --lr_grid="$LR_GRID"
        --pool_grid="$POOL_GRID" --seed="$SEED" "$@")
python -m stlm.classify --checkpoint="$EXPORT" "${COMMON[@]}" \
  --output="$OUT/${TASK}_pretrained.json"
python -m stlm.classify --checkpoint="scratch:$EXPORT" "${COMMON[@]}" \
  --output="$OUT/${TASK}_scratch.json"
python -m stlm.classify.compare "$OUT/${TASK}_pretrained.json" "$OUT/${TASK}_scratch.json"
