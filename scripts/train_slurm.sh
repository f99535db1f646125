#!/usr/bin/env bash
# VkD training under Slurm: one task per GPU; ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
# and the first node of the allocation is the rendezvous (MASTER_ADDR, MASTER_PORT=29500 unless set).
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 scripts/train_slurm.sh
#   (DATA, OUT, CONFIG, TEACHER_PATH as in scripts/train_torchrun.sh).
# Two minutes before the time limit (or when a preemption signals the job) Slurm sends SIGUSR1 to this
# script, which passes it to the tasks: training stops at its next step, saves a mid-epoch checkpoint and
# exits with code 124; the job is then requeued and continues from that step (--resume auto).
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
DATA=${DATA:-/data/imagenet2012}
OUT=${OUT:-output/}
CONFIG=${CONFIG:-configs/deit_ti_vkd.yaml}
PYTHON=${PYTHON:-python}
PREEMPTED=124
srun "$PYTHON" main_distributed.py --config "$CONFIG" --data-path "$DATA" --output_dir "$OUT" --resume auto \
    ${TEACHER_PATH:+--teacher-path "$TEACHER_PATH"} "$@" &
tasks=$!
trap 'kill -USR1 "$tasks"' USR1   # srun passes the signal on to every task
wait "$tasks"; code=$?
while kill -0 "$tasks" 2>/dev/null; do wait "$tasks"; code=$?; done   # wait again after the trap ran
if [ "$code" -eq "$PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
