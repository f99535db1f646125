#!/usr/bin/env bash
# VkD training under Slurm: one task per GPU; ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
# and the first node of the allocation is the rendezvous (MASTER_ADDR, MASTER_PORT=29500 unless set).
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 scripts/train_slurm.sh
#   (DATA, OUT, CONFIG, TEACHER_PATH as in scripts/train_torchrun.sh). Requeued jobs continue (--resume auto).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
DATA=${DATA:-/data/imagenet2012}
OUT=${OUT:-output/}
CONFIG=${CONFIG:-configs/deit_ti_vkd.yaml}
PYTHON=${PYTHON:-python}
srun "$PYTHON" main_distributed.py --config "$CONFIG" --data-path "$DATA" --output_dir "$OUT" --resume auto \
    ${TEACHER_PATH:+--teacher-path "$TEACHER_PATH"} "$@"
