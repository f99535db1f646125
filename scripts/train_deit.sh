#!/usr/bin/env bash
# The paper's training command, for the student STUDENT (deit_ti_distilled or deit_s_distilled): distil it from
# RegNetY-160 with VkD, the paper's recipe (300 epochs). scripts/train_deit_ti.sh and train_deit_s.sh call it:
#   DATA=/data/imagenet2012 NGPU=1 OUT=output/ TEACHER_PATH=ckpts/regnety_160-a5fe301d.pth scripts/train_deit_ti.sh [flags]
# Without TEACHER_PATH, timm downloads DeiT's teacher (regnety_160.deit_in1k). lr = 5e-4 x 512 x NGPU / 512.
# The projector gets no weight decay (the paper's method); RECIPE=original reproduces the original code's decay,
# which zeroes the projector after the first step (README, "The projector and weight decay").
# Re-running the same command after a crash continues the run: add --resume auto.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/data/imagenet2012}
NGPU=${NGPU:-1}
OUT=${OUT:-output/}
PYTHON=${PYTHON:-python}
case "${RECIPE:-paper}" in
    paper) RECIPE_FLAGS=() ;;
    original) RECIPE_FLAGS=(--projector-weight-decay) ;;
    *) echo "error: RECIPE must be 'paper' or 'original', got '$RECIPE'" >&2; exit 2 ;;
esac
$PYTHON -m torch.distributed.launch --master_port "${MASTER_PORT:-1234}" --nproc_per_node="$NGPU" main_distributed.py \
    --teacher regnety_160 --student-model "${STUDENT:?set STUDENT, or use train_deit_ti.sh / train_deit_s.sh}" --batch-size 512 --data-path "$DATA" \
    --output_dir "$OUT" ${TEACHER_PATH:+--teacher-path "$TEACHER_PATH"} "${RECIPE_FLAGS[@]}" "$@"
