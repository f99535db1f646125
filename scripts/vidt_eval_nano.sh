#!/usr/bin/env bash
# VkD README: COCO val2017 evaluation of the released ViDT Swin-nano checkpoint (reported AP 43.0).
# Env: COCO (COCO root), CKPT (checkpoint, default /ckpts/vidt_nano/checkpoint.pth),
# OUT (run name under vidt/logs/), NGPU (default 8).
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR (node 0's address); a second job on one machine: MASTER_PORT.
set -euo pipefail
cd "$(dirname "$0")/../vidt"
COCO=${COCO:?set COCO to the COCO 2017 root}
CKPT=${CKPT:-/ckpts/vidt_nano/checkpoint.pth}
OUT=${OUT:-eval_swin_nano}
NGPU=${NGPU:-8}
PYTHON=${PYTHON:-../.venv/bin/python}
exec "$PYTHON" -m torch.distributed.launch --nproc_per_node="$NGPU" --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  --use_env main.py \
  --method vidt --backbone_name swin_nano --batch_size 2 --num_workers 2 --aux_loss True --with_box_refine True \
  --resume "$CKPT" --pre_trained none --eval True --coco_path "$COCO" --output_dir "$OUT"
