#!/usr/bin/env bash
# The paper's evaluation command for the student STUDENT (deit_ti_distilled or deit_s_distilled): evaluate a
# VkD checkpoint (released layout or ours) on ImageNet val. scripts/eval_deit_ti.sh and eval_deit_s.sh call it.
# Prints " * Acc@1 X Acc@5 Y" and "Accuracy of the student network on the N test images: Z%".
#   DATA=/data/imagenet2012 CKPT=/ckpts/deit_tiny/latest.pth.tar NGPU=1 [OUT=eval_out/] scripts/eval_deit_ti.sh [flags]
# Any NGPU gives the same numbers (every image is counted once). Extra flags are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/data/imagenet2012}
CKPT=${CKPT:-/ckpts/deit_tiny/latest.pth.tar}
NGPU=${NGPU:-1}
PYTHON=${PYTHON:-python}
$PYTHON -m torch.distributed.launch --master_port "${MASTER_PORT:-1234}" --nproc_per_node="$NGPU" main_distributed.py \
    --teacher regnety_160 --student-model "${STUDENT:?set STUDENT, or use eval_deit_ti.sh / eval_deit_s.sh}" --eval-student --student-ckpt "$CKPT" \
    --batch-size 512 --data-path "$DATA" ${OUT:+--output_dir "$OUT"} "$@"
