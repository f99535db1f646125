#!/usr/bin/env bash
# Inception FID / IS of a trained generator (the G_ema of best.pth or latest.pth), averaged over REPEATS
# evaluations of 10k fresh samples against the test split.
#   CKPT=output/c10_10pct_vkd_whiten/best.pth DATASET=C10 DATA=/data/cifar10 scripts/gen_eval.sh
# CIFAR missing from DATA and torch-fidelity's Inception weights are downloaded; without a network, pass
# INCEPTION=weights-inception-2015-12-05-6726825d.pth (a local copy).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:?set CKPT to best.pth or latest.pth of a run}
DATASET=${DATASET:-C10}
DATA=${DATA:?set DATA to the CIFAR folder}
PYTHON=${PYTHON:-python}
$PYTHON -m generation.main --config configs/generation/kd_dlgan_cifar.yaml --dataset "$DATASET" --data-path "$DATA" \
    --download ${INCEPTION:+--fid-weights "$INCEPTION"} --eval-checkpoint "$CKPT" --eval-repeats "${REPEATS:-3}" "$@"
