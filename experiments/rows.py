"""Experiments made of rows, one config file each over a shared ``base``, trained for several seeds with
identical budgets: the digits ablation and the Fashion-MNIST comparison."""
import glob
import os
import re
from typing import List, Optional, Sequence

import torch

import models
from config import parse_arguments
from distillers import distiller_class
from experiments.runner import Job, epoch_log
from experiments.stats import mean_and_std
from models.loading import load_student_checkpoint
from vkd.config import config_settings
from vkd.losses import feature_width
from vkd.teachers import create_teacher


def _row_number(path: str) -> int:
    return int(re.match(r"row(\d+)", os.path.basename(path)).group(1))


def row_configs(folder: str) -> List[dict]:
    """Each row's name, file, title (its first comment line) and settings (its file over ``base``) in ``folder``,
    in the order of their numbers (row2 before row10)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "row*.yaml")), key=_row_number):
        with open(path) as handle:
            title = handle.readline().lstrip("# ").rstrip("\n")
        rows.append({"name": os.path.basename(path)[:-len(".yaml")], "path": path, "title": title,
                     "settings": config_settings(path)})
    return rows


def row_job(row: dict, seed: int, out: str, threads: Optional[int] = None, resumable: bool = False) -> Job:
    return Job(f"{row['name']}/seed{seed}", os.path.join(out, row["name"], f"seed{seed}"), config=row["path"],
               overrides=["--seed", str(seed)], threads=threads, resumable=resumable)


def finished_runs(row: dict, seeds: Sequence[int], out: str) -> List[dict]:
    """The runs of ``row`` that finished, one per seed: final top-1, wall seconds, command, output folder."""
    runs = []
    for seed in seeds:
        job = row_job(row, seed, out)
        if job.finished():
            record = job.done_record()
            runs.append({"seed": seed, "acc1": epoch_log(job.output_dir)[-1]["val_acc1"], "seconds": record["seconds"],
                         "command": record["command"], "output_dir": job.output_dir})
    return runs


def summarise(row: dict, runs: List[dict], **measures) -> dict:
    """A row's top-1 over its finished runs (std needs two), their timings and commands, and ``measures``."""
    accuracies = [run["acc1"] for run in runs]
    mean, std = mean_and_std(accuracies)
    return {"row": row["name"], "title": row["title"], "config": row["path"], "settings": row["settings"],
            "acc1_mean": mean, "acc1_std": std, "seeds": [run["seed"] for run in runs], "acc1_per_seed": accuracies,
            "seconds_per_run": [run["seconds"] for run in runs], "seconds": sum(run["seconds"] for run in runs),
            "commands": [run["command"] for run in runs], **measures}


def row_arguments(row: dict):
    """The row's resolved arguments, as the entry point parses its config."""
    return parse_arguments(["--config", row["path"]])[0]


@torch.no_grad()
def trained_student(row: dict, output_dir: str, num_classes: int) -> torch.nn.Module:
    """The student a row's run trained (its last checkpoint), with its projector if it has one, in eval mode."""
    args = row_arguments(row)
    projector = None if args.train_teacher else distiller_class(args.distiller).projector(args)
    teacher_dim = None
    if projector:
        teacher_dim = feature_width(create_teacher(args.teacher, num_classes=num_classes,
                                                          teacher_path=args.teacher_path))
    student = models.create_student(args.student_model, num_classes=num_classes, img_size=args.input_size,
                                    teacher_dim=teacher_dim, projector=projector or "orthogonal",
                                    eval_head=args.eval_head)
    load_student_checkpoint(student, os.path.join(output_dir, "latest.pth.tar"))
    return student.eval()
