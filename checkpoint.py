"""Classification's training state: what a checkpoint holds, how it is saved each epoch, and how a resume
restores it. (Run folders, args.json and resume resolution are shared: ``vkd.runs``.)

Checkpoints keep the original's layout (``student`` with DDP's ``module.`` prefix, ``optimizer``,
``lr_scheduler``, ``epoch``, ...) and are written atomically; a resume continues at the next epoch.
"""
import argparse
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

import distillers
from models.loading import load_student_checkpoint
from vkd.checkpoints import add_ddp_prefix, safe_torch_load
from vkd.ema import ModelEMA
from vkd.errors import CheckpointError
from vkd.progress import append_json_line
from vkd.runs import LOG, refuse_a_different_run
from vkd.saver import CheckpointSaver, estimated_checkpoint_bytes

LATEST, BEST, TEACHER_FILE = "latest.pth.tar", "best.pth.tar", "teacher.pth"
# What defines the optimisation a checkpoint belongs to: a resume that changed one of these would print one
# run and train another, so it is refused (``--epochs`` alone is honoured: ``TrainingState.restore``). The distillers'
# own flags are added at the time of the check (``run_defining_flags``): a method registered later counts too.
CORE_RUN_DEFINING_FLAGS = (
    "--batch-size", "--lr", "--min-lr", "--warmup-lr", "--warmup-epochs", "--cooldown-epochs", "--weight-decay",
    "--sched", "--opt", "--opt-eps", "--opt-betas", "--momentum", "--decay-epochs", "--decay-rate", "--lr-noise",
    "--lr-noise-pct", "--lr-noise-std", "--unscale-lr", "--clip-grad", "--smoothing", "--mixup", "--cutmix", "--seed",
    "--student-model", "--teacher", "--train-teacher", "--input-size", "--data-set", "--subset", "--eval-head",
)


def run_defining_flags():
    return CORE_RUN_DEFINING_FLAGS + tuple(distillers.run_defining_flags())


def checkpoint_saver(args, is_main: bool = True) -> CheckpointSaver:
    """Classification's files (``vkd.saver``): latest.pth.tar, best.pth.tar, and ep{N}.pth.tar every
    --checkpoint-freq epochs."""
    return CheckpointSaver(args.output_dir, LATEST, BEST, kept="ep{done}.pth.tar", keep_every=(args.checkpoint_freq,),
                           is_main=is_main)


@dataclass
class TrainingState:
    """The resumable state of a training run: everything a checkpoint holds and a resume restores."""
    args: argparse.Namespace
    world_size: int
    model: nn.Module  # not DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_scheduler: object
    ema: Optional[ModelEMA]
    start_epoch: int = 0
    best_acc1: float = 0.0
    nonfinite_skipped: int = 0
    class_names: Optional[List[str]] = None  # the training set's, in label order: predict.py prints them
    resumed_mid_epoch: Optional[list] = None  # each rank's ``partial`` of a preempted epoch (engine)
    epochs_changed: Optional[dict] = None  # {"from", "to"} when a resume moved the end of the run

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
        run redoes this epoch and rewrites the files above (``trim_log`` drops the stale log line). Weights that
        became non-finite are not saved, and the epoch leaves no log line.
        """
        log = os.path.join(self.args.output_dir, LOG)
        checkpoint_saver(self.args).save(self.checkpoint(epoch, loss), epoch + 1, [self.model.state_dict()], improved,
                                         before=lambda: append_json_line(log, log_record))

    def checkpoint_bytes(self) -> int:
        """What one checkpoint will hold, before the optimizer has any state: the weights, AdamW's two moments
        (SGD's one momentum buffer) per weight, and the EMA."""
        ema = [self.ema.model.state_dict()] if self.ema is not None else []
        return estimated_checkpoint_bytes(self.optimizer, self.model.state_dict(), *ema)

    def _refuse_a_different_run(self, checkpoint: dict, path: str) -> None:
        saved = checkpoint.get("args") or {}  # released files carry no arguments: nothing to compare
        if not saved:
            return
        refuse_a_different_run(self.args, saved, run_defining_flags(), checkpoint.get("world_size"), self.world_size,
                               path, f"to train its weights with other settings, start a new run: --student-ckpt "
                                     f"{path} --output_dir NEW")
        if "epochs" in saved and saved["epochs"] != self.args.epochs:
            self.epochs_changed = {"from": saved["epochs"], "to": self.args.epochs}

    def save_preempted(self, epoch: int, partials: list, is_main: bool = True) -> None:
        """latest.pth.tar in the middle of ``epoch``: the state after its last finished step, with every rank's
        running sums and random generators (``partials``), so that --resume auto continues at that step. Every
        process calls it and waits until the main process has written the file."""
        content = self.checkpoint(epoch - 1, float("nan"))
        content["mid_epoch"] = {"epoch": epoch, "ranks": partials}
        checkpoint_saver(self.args, is_main).save_preempted(content, [self.model.state_dict()], f"epoch {epoch}")

    def restore(self, path: str) -> None:
        """Weights, EMA, optimizer, scaler, schedule and counters; training continues at the next epoch. The file
        is read once, and a resume of another run is refused before anything is loaded."""
        checkpoint = safe_torch_load(path)
        self._refuse_a_different_run(checkpoint, path)
        load_student_checkpoint(self.model, path, checkpoint)
        try:
            if checkpoint.get("optimizer"):
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(checkpoint["scaler"])
            # The schedule is not restored: timm's per-iteration schedule is a function of the step alone,
            # rebuilt from the flags (the same ones, or a new --epochs, whose curve then applies from this step).
            if self.ema is not None and checkpoint.get("student_ema"):
                self.ema.model.load_state_dict(checkpoint["student_ema"])
            elif self.ema is not None:
                self.ema.model.load_state_dict(self.model.state_dict())
        except (ValueError, RuntimeError, KeyError) as error:
            raise CheckpointError(f"{path} does not fit this run: {str(error).splitlines()[0]}") from None
        if "epoch" in checkpoint:
            self.start_epoch = int(checkpoint["epoch"]) + 1
        if checkpoint.get("mid_epoch"):
            self.start_epoch = int(checkpoint["mid_epoch"]["epoch"])
            self.resumed_mid_epoch = checkpoint["mid_epoch"]["ranks"]
        self.best_acc1 = float(checkpoint.get("best_acc1", 0.0))
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))

