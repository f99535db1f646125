"""Run folders and training state: what a checkpoint holds, resuming, and the per-epoch log.

Checkpoints keep the original's layout (``student`` with DDP's ``module.`` prefix, ``optimizer``,
``lr_scheduler``, ``epoch``, ...) and are written atomically; a resume continues at the next epoch.
"""
import argparse
import datetime
import glob
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from optim import StudentEMA
from utils import (
    CheckpointError,
    add_ddp_prefix,
    all_finite,
    fail,
    git_state,
    load_student_checkpoint,
    safe_torch_load,
    save_atomically,
    write_json,
)

LATEST, BEST, TEACHER_FILE, LOG = "latest.pth.tar", "best.pth.tar", "teacher.pth", "log.txt"
ARGS_FILE, TENSORBOARD = "args.json", "tensorboard"
# What a training run leaves in its folder; any of them means the folder holds a run.
RUN_FILES = (LATEST, BEST, LOG, ARGS_FILE, TEACHER_FILE, TENSORBOARD, "ep*.pth.tar")


def _run_files_in(output_dir: str, run_files: Sequence[str]):
    return sorted({os.path.basename(found) for pattern in run_files
                   for found in glob.glob(os.path.join(glob.escape(output_dir), pattern))})


def prepare_output_dir(output_dir: str, continuing: bool, overwrite: bool, is_main: bool,
                       run_files: Sequence[str] = RUN_FILES) -> Optional[str]:
    """Make sure a new run cannot destroy an old one in ``output_dir``.

    A folder that holds a run (any of ``run_files``, glob patterns) is refused unless the run is being continued (``--resume``) or
    ``overwrite`` is set, which moves the old folder aside (on the main process) and returns its new
    path. Every process makes the same read-only decision, so all of them stop together.
    """
    if not output_dir:
        return None
    existing = _run_files_in(output_dir, run_files) if os.path.isdir(output_dir) else []
    if not existing or continuing:
        return None
    if not overwrite:
        fail(f"--output_dir {output_dir} already holds a run ({', '.join(existing[:4])}): continue it with "
             f"--resume auto, choose another --output_dir, or pass --overwrite to move the old run aside")
    if not is_main:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = f"{os.path.normpath(output_dir)}.previous-{stamp}"
    os.replace(output_dir, aside)
    return aside


def record_invocation(args, argv: Sequence[str], world_size: int, start_epoch: int = 0, **first_record) -> None:
    """``args.json``: the resolved arguments, code version and ``first_record`` (e.g. the effective lr, the
    teacher's weights) of the run's first invocation, and one entry per invocation (a resume appends;
    nothing is replaced)."""
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, ARGS_FILE)
    invocation = dict(command=list(argv), **git_state(), processes=world_size, start_epoch=start_epoch,
                      started=datetime.datetime.now().isoformat(timespec="seconds"))
    content = None
    if os.path.isfile(path):
        try:
            with open(path) as handle:
                content = json.load(handle)
        except (OSError, ValueError):
            os.replace(path, f"{path}.unreadable")  # kept for a person to read, never silently dropped
    if not isinstance(content, dict):
        content = dict(args=vars(args), **git_state(), command=list(argv), processes=world_size, **first_record,
                       invocations=[])
    content.setdefault("invocations", []).append(invocation)
    temporary = f"{path}.tmp"
    write_json(temporary, content)
    os.replace(temporary, path)


def _logged_counter(line: str, key: str) -> Optional[int]:
    """The epoch (or other ``key``) of a log.txt line; None for a last line torn by a kill mid-write."""
    if not line.endswith("\n"):
        return None
    try:
        return json.loads(line)[key]
    except ValueError:
        return None


def trim_log(path: str, start_epoch: int, key: str = "epoch") -> None:
    """Keeps only the log.txt lines of epochs before ``start_epoch``, where training (re)starts.

    A run killed after writing an epoch's line but before its latest.pth.tar redoes that epoch,
    whose line must then appear once; a run that starts over replaces the log of the one before.
    """
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept = []
    for line in lines:
        epoch = _logged_counter(line, key)
        if epoch is not None and epoch < start_epoch:
            kept.append(line)
    if len(kept) < len(lines):
        temporary = f"{path}.tmp"
        with open(temporary, "w") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)


def resolve_resume(args, latest_name: str = LATEST) -> Optional[str]:
    """``--resume``'s file: the path given, or with 'auto' the run folder's latest checkpoint if there is one."""
    if args.resume != "auto":
        return args.resume or None
    latest = os.path.join(args.output_dir, latest_name)
    return latest if os.path.isfile(latest) else None


@dataclass
class Trainer:
    """Everything a checkpoint holds and a resume restores."""
    args: argparse.Namespace
    world_size: int
    model: nn.Module  # not DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_scheduler: object
    ema: Optional[StudentEMA]
    start_epoch: int = 0
    best_acc1: float = 0.0
    nonfinite_skipped: int = 0
    class_names: Optional[List[str]] = None  # the training set's, in label order: predict.py prints them

    @property
    def model_key(self) -> str:
        # A trained teacher is stored under 'model' (what --teacher-path reads); a student under
        # 'student' with DDP's 'module.' prefix, as in the released files.
        return "model" if self.args.train_teacher else "student"

    def checkpoint(self, epoch: int, loss: float) -> dict:
        weights = self.model.state_dict()
        return {
            self.model_key: weights if self.args.train_teacher else add_ddp_prefix(weights),
            "student_ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch,
            "class_names": self.class_names,
            "best_acc1": self.best_acc1,
            "nonfinite_skipped": self.nonfinite_skipped,
            "args": dict(vars(self.args)),
            "loss": loss,
            "batch_size": self.args.batch_size,
            "world_size": self.world_size,
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def save(self, epoch: int, loss: float, improved: bool, log_record: dict) -> None:
        """The epoch's log.txt line, best.pth.tar on improvement, ep{N}.pth.tar every --checkpoint-freq,
        and latest.pth.tar every epoch.

        latest.pth.tar is written last: it is what --resume auto continues from, so a kill anywhere
        before its (atomic) rename leaves the previous epoch as the last finished one, and the resumed
        run redoes this epoch and rewrites the files above (``trim_log`` drops the stale log line).
        """
        if not all_finite(self.model.state_dict()):
            fail(f"the weights became non-finite during epoch {epoch}; {LATEST} was left as it was", exit_code=1)
        output_dir = self.args.output_dir
        with open(os.path.join(output_dir, LOG), "a") as handle:
            handle.write(json.dumps(log_record) + "\n")
        content = self.checkpoint(epoch, loss)
        if improved:
            save_atomically(content, os.path.join(output_dir, BEST))
        if (epoch + 1) % self.args.checkpoint_freq == 0:
            save_atomically(content, os.path.join(output_dir, f"ep{epoch + 1}.pth.tar"))
        save_atomically(content, os.path.join(output_dir, LATEST))

    def restore(self, path: str) -> None:
        """Weights, EMA, optimizer, scaler, schedule and counters; training continues at the next epoch."""
        load_student_checkpoint(self.model, path)
        checkpoint = safe_torch_load(path)
        try:
            if checkpoint.get("optimizer"):
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(checkpoint["scaler"])
            if checkpoint.get("lr_scheduler"):
                self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if self.ema is not None and checkpoint.get("student_ema"):
                self.ema.model.load_state_dict(checkpoint["student_ema"])
            elif self.ema is not None:
                self.ema.model.load_state_dict(self.model.state_dict())
        except (ValueError, RuntimeError, KeyError) as error:
            raise CheckpointError(f"{path} does not fit this run: {str(error).splitlines()[0]}") from None
        if "epoch" in checkpoint:
            self.start_epoch = int(checkpoint["epoch"]) + 1
        self.best_acc1 = float(checkpoint.get("best_acc1", 0.0))
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))

