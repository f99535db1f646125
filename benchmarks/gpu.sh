#!/usr/bin/env bash
# The GPU check of benchmarks/RESULTS.md in one run (about 3 minutes on one H100): for DeiT-Ti and
# DeiT-S, the whole VkD step with each projector at batch 256 under fp16 AMP, then evaluation img/s.
# One JSON line per measurement goes to stdout and to $OUT/gpu.jsonl.
#   bash benchmarks/gpu.sh                       # on the GPU machine, from the repository root
#   DEVICE=cpu BATCH=2 INPUT=32 AMP=none TEACHER=resnet10t STEPS=1 WARMUP=0 bash benchmarks/gpu.sh  # dry run
set -euo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
INPUT=${INPUT:-224}
AMP=${AMP:-fp16}
TEACHER=${TEACHER:-regnety_160}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"


[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for student in deit_ti_distilled deit_s_distilled; do
  for impl in fast torch; do
    "$PY" -m benchmarks.train_step --device "$DEVICE" --student "$student" --teacher "$TEACHER" \
      --batch-size "$BATCH" --input-size "$INPUT" --amp "$AMP" --projector-impl "$impl" \
      --steps "$STEPS" --warmup "$WARMUP" | tee -a "$OUT/gpu.jsonl"
  done
  "$PY" -m benchmarks.eval --device "$DEVICE" --student "$student" --batch-size "$BATCH" \
    --input-size "$INPUT" --amp "$AMP" --steps "$STEPS" --warmup "$WARMUP" | tee -a "$OUT/gpu.jsonl"
done
