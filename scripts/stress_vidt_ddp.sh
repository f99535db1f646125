#!/usr/bin/env bash
# Stress test of two-process detection training (not part of the tests): N plain runs in a row of
# `torchrun --nproc_per_node=2 -m vidt.main` (gloo, CPU, one epoch of a tiny synthetic COCO set), each in a
# fresh run folder; prints the number of failed runs and keeps their output. A start-up race between the
# processes (a rank that reaches the run folder late, a collective that one rank skips) shows up as a
# failure here long before it shows up on a cluster. Exit code 1 when a run failed.
# Env: N (default 20), STRESS_DIR (default /tmp/vidt_stress), PYTHON (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
STRESS_DIR=${STRESS_DIR:-/tmp/vidt_stress}
PYTHON=${PYTHON:-.venv/bin/python}
# Only what an earlier stress run left there is removed.
rm -rf "$STRESS_DIR/coco" "$STRESS_DIR"/run*
mkdir -p "$STRESS_DIR"
"$PYTHON" vidt/tools/make_synthetic_coco.py "$STRESS_DIR/coco" --train 4 --val 2 || exit 2
FLAGS=(--method vidt --backbone_name swin_nano --aux_loss True --with_box_refine True --pre_trained none
       --device cpu --num_workers 0 --train_sizes 96 112 128 --max_size 213 --eval_size 128 --batch_size 1
       --epochs 1 --print_freq 100 --coco_path "$STRESS_DIR/coco")
failures=0
for run in $(seq 1 "$N"); do
  log="$STRESS_DIR/run$run.log"
  if OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m vidt.main \
      "${FLAGS[@]}" --output_dir "$STRESS_DIR/run$run" >"$log" 2>&1; then
    rm -rf "$STRESS_DIR/run$run" "$log"
  else
    code=$?
    failures=$((failures + 1))
    echo "run $run of $N failed (exit code $code): $log"
  fi
done
echo "$failures of $N two-process runs failed"
[[ $failures -eq 0 ]]
