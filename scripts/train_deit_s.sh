#!/usr/bin/env bash
# Seed command (SPEC.md section 4): distil DeiT-S from RegNetY-160 with VkD, the paper's recipe (300 epochs).
#   DATA=/data/imagenet2012 NGPU=1 OUT=output/ TEACHER_PATH=ckpts/regnety_160-a5fe301d.pth scripts/train_deit_s.sh [flags]
# Without TEACHER_PATH the teacher's weights are downloaded from timm (the original DeiT file is ~0.5% better).
# lr = 5e-4 x 512 x NGPU / 512; the original always trained at 5e-4: add --unscale-lr to match it on 2+ GPUs.
# Re-running the same command after a crash continues the run: add --resume auto.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/data/imagenet2012}
NGPU=${NGPU:-1}
OUT=${OUT:-output/}
PYTHON=${PYTHON:-python}
$PYTHON -m torch.distributed.launch --master_port "${MASTER_PORT:-1234}" --nproc_per_node="$NGPU" main_distributed.py \
    --teacher regnety_160 --student-model deit_s_distilled --batch-size 512 --data-path "$DATA" \
    --output_dir "$OUT" ${TEACHER_PATH:+--teacher-path "$TEACHER_PATH"} "$@"
