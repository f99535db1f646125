#!/usr/bin/env bash
# VkD training through torchrun, on one node or several (the recipe comes from a config file).
#   One node:   DATA=/data/imagenet2012 NGPU=8 OUT=output/ TEACHER_PATH=... scripts/train_torchrun.sh [flags]
#   M nodes:    run the same line on every node with NNODES=M MASTER_ADDR=<first node> [MASTER_PORT=29500]
#               (c10d rendezvous; every node needs the same DATA layout and a shared OUT).
# CONFIG defaults to configs/deit_ti_vkd.yaml (configs/deit_s_vkd.yaml for DeiT-S). lr scales with the
# global batch (512 x NGPU x NNODES); add --unscale-lr to keep 5e-4. CONFIG=configs/deit_ti_vkd_original.yaml
# reproduces the original code's projector weight decay (README).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/data/imagenet2012}
NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
OUT=${OUT:-output/}
CONFIG=${CONFIG:-configs/deit_ti_vkd.yaml}
PYTHON=${PYTHON:-python}
if [ "$NNODES" -eq 1 ]; then
    LAUNCH=(--standalone --nproc_per_node="$NGPU")
else
    LAUNCH=(--nnodes="$NNODES" --nproc_per_node="$NGPU" --rdzv-backend=c10d
            --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR to the first node}:${MASTER_PORT:-29500}"
            --rdzv-id="${RDZV_ID:-vkd}")
fi
$PYTHON -m torch.distributed.run "${LAUNCH[@]}" main_distributed.py --config "$CONFIG" \
    --data-path "$DATA" --output_dir "$OUT" --resume auto ${TEACHER_PATH:+--teacher-path "$TEACHER_PATH"} "$@"
