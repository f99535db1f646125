#!/usr/bin/env bash
# One generation run (a paper row) on one or several GPUs of one node; gradients are averaged over processes.
#   CONFIG=configs/generation/c10_10pct_vkd_whiten.yaml DATA=/data/cifar10 OUT=output/c10_10pct_vkd_whiten \
#   NGPU=1 scripts/gen_train.sh [flags]
# DATA holds torchvision's cifar-10-batches-py/ (or cifar-100-python/), or receives it: a CIFAR missing there is
# downloaded (--download), and so are open_clip's OpenAI ViT-B/32 weights (the VkD rows) and torch-fidelity's
# Inception weights, once, into their caches. Without a network, local files: CLIP=open_clip_pytorch_model.bin
# (Hugging Face timm/vit_base_patch32_clip_224.openai) INCEPTION=weights-inception-2015-12-05-6726825d.pth.
# An interrupted run continues (--resume auto).
# The per-process batch is the config's (50); with NGPU > 1 the global batch grows, pass --batch-size to keep 50.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:?set CONFIG to a file of configs/generation/}
DATA=${DATA:?set DATA to the CIFAR folder}
OUT=${OUT:?set OUT to the output folder}
NGPU=${NGPU:-1}
PYTHON=${PYTHON:-python}
$PYTHON -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m generation.main --config "$CONFIG" \
    --data-path "$DATA" --download --output-dir "$OUT" --resume auto ${INCEPTION:+--fid-weights "$INCEPTION"} \
    ${CLIP:+--teacher-path "$CLIP"} "$@"
