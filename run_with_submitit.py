"""Submit a classification, detection or generation run to Slurm with submitit (DeiT's ``run_with_submitit.py``),
requeued after a preemption or a time limit until it has finished.

    python run_with_submitit.py --nodes 2 --gpus-per-node 8 --timeout-min 2880 --partition PART \\
        -- --config configs/deit_ti_vkd.yaml --data-path /imagenet --output_dir runs/deit_ti_vkd
    python run_with_submitit.py --tree detection --gpus-per-node 8 -- --method vidt --backbone_name swin_nano \\
        --coco_path /coco --output_dir runs/vidt_nano ...
    python run_with_submitit.py --tree generation --gpus-per-node 1 -- \\
        --config configs/generation/c10_10pct_vkd_whiten.yaml --data-path /cifar --output-dir runs/c10_10pct ...
    python run_with_submitit.py --local --gpus-per-node 1 -- ...     (the same on this host, without Slurm)

The entry point's flags are checked here before the job is submitted. Each task runs the entry point from the
repository (its folder on PYTHONPATH, whatever the folder it was submitted from) with ``--resume auto`` in a
child process. When submitit's signal arrives (``--signal-delay-s`` before the time limit, or at a
preemption), the task passes it on as SIGUSR1: the run stops at its next step boundary and saves a mid-epoch
checkpoint (exit code 124), then submitit requeues the job, which continues from that step.
"""
import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
from typing import List

import submitit

from config import check_arguments, parse_arguments
from generation.arguments import checked_arguments as generation_arguments
from vidt.arguments import check_supported
from vidt.arguments import parse_arguments as detection_arguments
from vkd.cli import ENTRY_POINTS, entry_point
from vkd.config import OneLineErrorParser
from vkd.errors import BadInput, RunFailed
from vkd.preemption import EXIT_PREEMPTED

REPO = os.path.dirname(os.path.abspath(__file__))
OUTPUT_FLAGS = ("--output_dir", "--output-dir")  # every tree accepts both


class Trainer(submitit.helpers.Checkpointable):
    """One task of the job: the entry point in a child process, which gets the stop signal before requeuing."""

    def __init__(self, command: List[str]):
        self.command = command

    def __call__(self) -> int:
        submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_ADDR... for env://
        child = subprocess.Popen([sys.executable, *self.command], cwd=REPO)
        stop_signal = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(stop_signal)  # submitit's: calls checkpoint() below, then requeues the job
        # Passed on as the loop's stop request, which checkpoints at the next step; the requeue waits for it.
        signal.signal(stop_signal, lambda number, frame: child.send_signal(signal.SIGUSR1))
        code = child.wait()
        if code == EXIT_PREEMPTED and callable(requeue):
            requeue(stop_signal, None)
        if code != 0:
            raise RunFailed(f"{' '.join(self.command[:2])} exited with code {code}; its log is in the job folder")
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.command))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("Submit a VkD run with submitit; the entry point's flags follow '--'")
    parser.add_argument("--tree", default="classification", choices=sorted(ENTRY_POINTS))
    parser.add_argument("--job-dir", default="submitit/%j", help="submitit's logs and pickles (%%j: the job id)")
    parser.add_argument("--nodes", default=1, type=int)
    parser.add_argument("--gpus-per-node", default=8, type=int, help="one task per GPU (default: 8)")
    parser.add_argument("--cpus-per-task", default=10, type=int)
    parser.add_argument("--mem-gb", default=None, type=float, help="memory per node (default: the cluster's)")
    parser.add_argument("--timeout-min", default=2880, type=int, help="time limit of each submission (default: 48 h)")
    parser.add_argument("--signal-delay-s", default=120, type=int,
                        help="seconds before the time limit that the run is told to stop (default: 120)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--local", action="store_true",
                        help="run on this host with submitit's local executor; without it, Slurm is required")
    return parser


def entry_point_command(tree: str, flags: List[str]) -> List[str]:
    if not any(flag in OUTPUT_FLAGS or flag.split("=")[0] in OUTPUT_FLAGS for flag in flags):
        raise BadInput(f"the run needs an output folder ({ENTRY_POINTS[tree].output_flag} DIR after '--'): requeued "
                       f"jobs resume from it")
    resume = [] if any(flag.split("=")[0] == "--resume" for flag in flags) else ["--resume", "auto"]
    return [*ENTRY_POINTS[tree].program, *flags, *resume]


def check_entry_point_flags(tree: str, flags: List[str]) -> None:
    """The flags parsed and checked as the job's entry point will, from the repository as the job runs: a typo
    is one line now, not an error in the job's log after its wait in the queue."""
    try:
        with contextlib.chdir(REPO):
            if tree == "classification":
                check_arguments(*parse_arguments(flags))
            elif tree == "detection":
                check_supported(*detection_arguments(flags))
            else:
                generation_arguments(flags)
    except BadInput as error:
        raise BadInput(f"the {tree} flags after '--': {error}") from None


def make_executor(args) -> submitit.Executor:
    if not args.local and submitit.SlurmExecutor.affinity() <= 0:
        raise BadInput("Slurm is not available here (no srun on PATH): submit from a Slurm login node, or pass "
                       "--local to run the job on this host")
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster="local" if args.local else "slurm",
                                     slurm_max_num_timeout=30)
    # The job's process unpickles Trainer, which imports this repository: from any folder it was submitted from.
    setup = [f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}", f"cd {shlex.quote(REPO)}"]
    parameters = dict(nodes=args.nodes, tasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
                      cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min, name="vkd",
                      slurm_signal_delay_s=args.signal_delay_s, slurm_setup=setup, local_setup=setup)
    if args.mem_gb is not None:
        parameters["mem_gb"] = args.mem_gb
    if args.partition:
        parameters["slurm_partition"] = args.partition
    executor.update_parameters(**parameters)
    return executor


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(ours)
    command = entry_point_command(args.tree, flags)
    check_entry_point_flags(args.tree, command[len(ENTRY_POINTS[args.tree].program):])
    job = make_executor(args).submit(Trainer(command))
    print(f"submitted job {job.job_id}: logs in {job.paths.folder}", flush=True)


if __name__ == "__main__":
    main()
