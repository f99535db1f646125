#!/usr/bin/env bash
# CPU detection demo: writes a synthetic COCO-format set of coloured shapes, trains a ViDT Swin-nano
# for EPOCHS epochs at 96-128 px (distilled from TEACHER when it is set, a vidt_base checkpoint), then
# evaluates the saved checkpoint and prints the COCO AP summary. Minutes on 2 cores.
# Env: DEMO_DIR (default /tmp/vidt_demo), EPOCHS (default 2), TEACHER (optional).
set -euo pipefail
cd "$(dirname "$0")/../vidt"
DEMO_DIR=${DEMO_DIR:-/tmp/vidt_demo}
EPOCHS=${EPOCHS:-2}
PYTHON=${PYTHON:-../.venv/bin/python}
"$PYTHON" tools/make_synthetic_coco.py "$DEMO_DIR/coco" --train 16 --val 8
SMALL=(--device cpu --num_workers 0 --train_sizes 96 112 128 --max_size 213 --eval_size 128 --print_freq 4)
COMMON=(--method vidt --backbone_name swin_nano --batch_size 2 --aux_loss True --with_box_refine True
        --pre_trained none --coco_path "$DEMO_DIR/coco")
DISTIL=()
if [[ -n "${TEACHER:-}" ]]; then DISTIL=(--distil_model vidt_base --distil_model_path "$TEACHER"); fi
"$PYTHON" main.py "${COMMON[@]}" "${SMALL[@]}" "${DISTIL[@]}" --epochs "$EPOCHS" --output_dir "$DEMO_DIR/train"
"$PYTHON" main.py "${COMMON[@]}" "${SMALL[@]}" --eval True --resume "$DEMO_DIR/train/checkpoint.pth" \
  --output_dir "$DEMO_DIR/eval"
