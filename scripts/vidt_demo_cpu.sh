#!/usr/bin/env bash
# CPU detection demo of VkD distillation on a synthetic COCO-format set of coloured shapes (96-128 px):
#   1. a teacher: a plain ViDT Swin-nano trained for EPOCHS epochs (skipped when TEACHER names a
#      vidt_base checkpoint, e.g. NAVER's vidt_base_150.pth);
#   2. a ViDT Swin-nano student trained with VkD from that teacher, so loss_distil appears in its log;
#   3. COCO evaluation of the student's checkpoint.
# It shows that the pipeline runs end to end, nothing more: AP on synthetic shapes after seconds of
# training means nothing. Minutes on 2 cores.
# Env: DEMO_DIR (default /tmp/vidt_demo), EPOCHS (default 2), TEACHER (optional vidt_base checkpoint).
set -euo pipefail
cd "$(dirname "$0")/../vidt"
DEMO_DIR=${DEMO_DIR:-/tmp/vidt_demo}
EPOCHS=${EPOCHS:-2}
PYTHON=${PYTHON:-../.venv/bin/python}
# The demo's own run folders are replaced on every run (its teacher, student and eval, nothing else).
rm -rf "$DEMO_DIR/teacher" "$DEMO_DIR/student" "$DEMO_DIR/eval"
"$PYTHON" tools/make_synthetic_coco.py "$DEMO_DIR/coco" --train 16 --val 8
SMALL=(--device cpu --num_workers 0 --train_sizes 96 112 128 --max_size 213 --eval_size 128 --print_freq 4)
COMMON=(--method vidt --backbone_name swin_nano --batch_size 2 --aux_loss True --with_box_refine True
        --pre_trained none --coco_path "$DEMO_DIR/coco")

if [[ -n "${TEACHER:-}" ]]; then
  DISTIL=(--distil_model vidt_base --distil_model_path "$TEACHER")
else
  echo "== 1/3 teacher: plain ViDT Swin-nano, $EPOCHS epochs (no distillation)"
  "$PYTHON" main.py "${COMMON[@]}" "${SMALL[@]}" --epochs "$EPOCHS" --output_dir "$DEMO_DIR/teacher"
  DISTIL=(--distil_model vidt_nano --distil_model_path "$DEMO_DIR/teacher/checkpoint.pth")
fi
echo "== 2/3 student: ViDT Swin-nano with VkD (${DISTIL[*]}), $EPOCHS epochs"
"$PYTHON" main.py "${COMMON[@]}" "${SMALL[@]}" "${DISTIL[@]}" --epochs "$EPOCHS" --output_dir "$DEMO_DIR/student"
echo "== 3/3 evaluation of the student"
"$PYTHON" main.py "${COMMON[@]}" "${SMALL[@]}" --eval True --resume "$DEMO_DIR/student/checkpoint.pth" \
  --output_dir "$DEMO_DIR/eval"
echo "== done. The AP above is that of seconds of training on synthetic shapes: it means nothing. Run folders:"
echo "   $DEMO_DIR/{teacher,student,eval} (args.json, log.txt, tensorboard/, eval.pth)"
