#!/usr/bin/env bash
# Evaluate a VkD student checkpoint through torchrun on NGPU processes (one node).
#   DATA=/data/imagenet2012 CKPT=/ckpts/deit_tiny/latest.pth.tar NGPU=8 [STUDENT=deit_s_distilled] [OUT=...] scripts/eval_torchrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/data/imagenet2012}
CKPT=${CKPT:-/ckpts/deit_tiny/latest.pth.tar}
NGPU=${NGPU:-1}
STUDENT=${STUDENT:-deit_ti_distilled}
PYTHON=${PYTHON:-python}
$PYTHON -m torch.distributed.run --standalone --nproc_per_node="$NGPU" main_distributed.py \
    --student-model "$STUDENT" --eval-student --student-ckpt "$CKPT" --batch-size 512 --data-path "$DATA" \
    ${OUT:+--output_dir "$OUT"} "$@"
