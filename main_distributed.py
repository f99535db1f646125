"""VkD entry point: distil a DeiT student, train a teacher, or evaluate a checkpoint, on 1..N processes.

Launch forms (all equivalent; the local rank picks the device, the global rank 0 writes files):
    python -m torch.distributed.launch --nproc_per_node=N main_distributed.py ...   (the seed's form)
    torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] main_distributed.py ...
    srun python main_distributed.py ...            (Slurm: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)
    python main_distributed.py ...                 (one process, no process group)
Every flag of the original ``main_distributed.py`` exists under its name; defaults are the values the
original effectively trained with (SPEC.md section 2). Where the original ignored a flag, it now
takes effect, or, when it cannot, setting it is an error (see ``NOT_APPLICABLE``).
"""
import argparse
import copy
import datetime
import difflib
import inspect
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, NoReturn, Optional, Set, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2

import datasets
import models
import orthogonal_maps
from engine import NonFiniteLossError, evaluate, train_one_epoch
from losses import FEATURE_LOSSES, NORMALISATIONS, VkDLoss
from samplers import DistributedEvalSampler
from utils import (CheckpointError, add_ddp_prefix, all_finite, load_student_checkpoint, safe_torch_load,
                   save_atomically)

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
REFERENCE_BATCH = 512  # lr = --lr x global batch / 512 (DeiT's linear scaling rule)
LATEST, BEST, TEACHER_FILE, LOG = "latest.pth.tar", "best.pth.tar", "teacher.pth", "log.txt"
SCHEDULES = ("cosine", "tanh", "step", "poly", "constant")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
DEFAULT_MASTER_PORT = "29500"
MAX_SUGGESTIONS = 5  # close matches listed for an unknown teacher name
ORIGINAL_WORKERS = 12
# models.create_student owns the choice of implementation; the flag only exposes it.
DEFAULT_PROJECTOR_IMPL = inspect.signature(models.create_student).parameters["projector_impl"].default


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, before any long work."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def stop(message: str) -> NoReturn:
    """A run that cannot go on (non-finite loss, a dead rank): one line on stderr and exit code 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# ============================================================================ command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("VkD training and evaluation", add_help=True)
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of defaults (keys are flag names, '-' or '_'); the command line overrides it")
    parser.add_argument("--batch-size", default=512, type=int, help="per-process batch size (default: 512)")
    parser.add_argument("--epochs", default=300, type=int, help="(default: 300)")
    parser.add_argument("--bce-loss", action="store_true", help="binary cross-entropy on binarised targets (DeiT III)")
    parser.add_argument("--unscale-lr", action="store_true",
                        help="use --lr as given; by default lr = --lr x batch x processes / 512 (the original "
                             "computed that but always trained at --lr)")
    parser.add_argument("--eval-student", action="store_true", help="evaluate --student-ckpt and exit")
    parser.add_argument("--student-ckpt", default=None, type=str,
                        help="student checkpoint (released layout or ours) to evaluate with --eval-student, or to "
                             "start training from (weights only)")
    parser.add_argument("--train-teacher", action="store_true",
                        help="train the timm model --teacher on the data with plain CE (+ mixup) and save "
                             "output_dir/teacher.pth, the file --teacher-path reads")
    parser.add_argument("--teacher-pretrained", action="store_true",
                        help="with --train-teacher: start from timm's pretrained weights (downloads)")

    # Model
    parser.add_argument("--student-model", default="deit_ti_distilled", type=str, metavar="MODEL",
                        help=f"student: {', '.join(models.STUDENT_MODELS)} (default: deit_ti_distilled)")
    parser.add_argument("--input-size", default=224, type=int, help="image size (default: 224)")
    parser.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    parser.add_argument("--drop-path", type=float, default=0.0, metavar="PCT",
                        help="drop path rate (default: 0, what the original trained with)")
    parser.add_argument("--student-ema", action="store_true", default=False, help="keep an EMA of the student")
    parser.add_argument("--no-student-ema", action="store_false", dest="student_ema")
    parser.add_argument("--student-ema-decay", type=float, default=0.996,
                        help="EMA momentum at the first iteration, rising linearly to 1.0 at the last (default: 0.996)")
    parser.add_argument("--student-ema-force-cpu", action="store_true", default=False,
                        help="keep the EMA on the CPU")
    parser.add_argument("--projector", default="orthogonal", choices=models.PROJECTORS,
                        help="student -> teacher feature map: VkD's orthogonal one, or a plain linear layer (ablation)")
    parser.add_argument("--orthogonal-map", default=None, choices=orthogonal_maps.ORTHOGONAL_MAPS,
                        help="orthogonal map (default: torch's choice, householder for non-square)")
    parser.add_argument("--projector-impl", default=DEFAULT_PROJECTOR_IMPL, choices=orthogonal_maps.IMPLEMENTATIONS,
                        help=f"implementation of the orthogonal projector (default: {DEFAULT_PROJECTOR_IMPL})")
    parser.add_argument("--projector-weight-decay", action="store_true", default=True,
                        help="weight decay on the projector's parametrization, as the original (default). With the "
                             "Householder map it zeroes the projector after the first AdamW step (README)")
    parser.add_argument("--no-projector-weight-decay", action="store_false", dest="projector_weight_decay",
                        help="exclude the projector from weight decay: it then stays an isometry")

    # Optimizer
    parser.add_argument("--opt", default="adamw", choices=("adamw", "sgd"), help="(default: adamw)")
    parser.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON", help="AdamW epsilon (default: 1e-8)")
    parser.add_argument("--opt-betas", default=None, type=float, nargs=2, metavar="BETA",
                        help="AdamW betas (default: 0.9 0.999)")
    parser.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: off)")
    parser.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="(default: 0.05; none on 1-D params)")

    # Loss weights
    parser.add_argument("--alpha", type=float, default=1.0, help="feature (VkD) distillation weight (default: 1)")
    parser.add_argument("--gamma", type=float, default=1.0, help="logit (KL) distillation weight (default: 1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="KL temperature (default: 1)")
    parser.add_argument("--normalisation", default="layernorm", choices=tuple(NORMALISATIONS),
                        help="teacher feature normalisation (default: layernorm)")
    parser.add_argument("--feature-loss", default="smooth_l1", choices=tuple(FEATURE_LOSSES),
                        help="feature distance (default: smooth_l1)")

    # Learning rate schedule (per iteration)
    parser.add_argument("--sched", default="cosine", choices=SCHEDULES, help="(default: cosine)")
    parser.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="(default: 5e-4)")
    parser.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct",
                        help="lr noise on/off points as fractions of the schedule")
    parser.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT", help="lr noise limit (default: 0.67)")
    parser.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV", help="lr noise std (default: 1)")
    parser.add_argument("--warmup-lr", type=float, default=5e-6, metavar="LR", help="(default: 5e-6)")
    parser.add_argument("--min-lr", type=float, default=5e-6, metavar="LR", help="(default: 5e-6)")
    parser.add_argument("--decay-epochs", type=float, default=30, metavar="N", help="step schedule interval (default: 30)")
    parser.add_argument("--warmup-epochs", type=int, default=0, metavar="N", help="(default: 0)")
    parser.add_argument("--cooldown-epochs", type=int, default=0, metavar="N",
                        help="epochs at --min-lr added after the schedule (default: 0)")
    parser.add_argument("--patience-epochs", type=int, default=10, metavar="N",
                        help="plateau schedule only, which a per-iteration schedule cannot be: setting it is an error")
    parser.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE",
                        help="step decay factor, or the power of the poly schedule (default: 0.1)")

    # Augmentation
    parser.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT", help="(default: 0.3)")
    parser.add_argument("--aa", type=str, default=None, metavar="NAME",
                        help="RandAugment: the original parsed it but never applied it; setting it is an error")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    parser.add_argument("--train-interpolation", type=str, default="bicubic", choices=("bicubic",),
                        help="crop interpolation (the pipeline is bicubic)")
    parser.add_argument("--repeated-aug", action="store_true", help="repeated augmentation across ranks")
    parser.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    parser.set_defaults(repeated_aug=False)
    parser.add_argument("--train-mode", action="store_true", help="model in train mode while training (default)")
    parser.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    parser.set_defaults(train_mode=True)
    parser.add_argument("--src", action="store_true", help="simple random crop instead of RandomResizedCrop")
    parser.add_argument("--disable-gray-solar-and-blur", action="store_true",
                        help="train without the random grayscale/solarize/blur choice (three-augment)")
    parser.add_argument("--crop-scale-min", type=float, default=0.08, help="RandomResizedCrop min scale (default: 0.08)")
    parser.add_argument("--reprob", type=float, default=0.0, metavar="PCT",
                        help="random erasing: the original never applied it; setting it is an error")
    parser.add_argument("--remode", type=str, default="pixel", help="random erasing (see --reprob)")
    parser.add_argument("--recount", type=int, default=1, help="random erasing (see --reprob)")
    parser.add_argument("--resplit", action="store_true", default=False, help="random erasing (see --reprob)")
    parser.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, on if > 0 (default: 0.8)")
    parser.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, on if > 0 (default: 1.0)")
    parser.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    parser.add_argument("--mixup-prob", type=float, default=1.0, help="(default: 1.0)")
    parser.add_argument("--mixup-switch-prob", type=float, default=0.5, help="(default: 0.5)")
    parser.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"))

    # Distillation
    parser.add_argument("--teacher", default="regnety_160", type=str, metavar="MODEL",
                        help="timm teacher (default: regnety_160); evaluation never builds it")
    parser.add_argument("--teacher-path", type=str, default=None,
                        help="local teacher weights (strict); without it timm's pretrained weights are downloaded")
    parser.add_argument("--teacher-channels-last", action="store_true",
                        help="run the frozen teacher's convolutions channels-last (default; faster, same function)")
    parser.add_argument("--no-teacher-channels-last", action="store_false", dest="teacher_channels_last")
    parser.set_defaults(teacher_channels_last=True)

    # Data and run
    parser.add_argument("--data-path", default=None, type=str, help="dataset folder")
    parser.add_argument("--data-set", default="IMNET", choices=datasets.DATA_SETS)
    parser.add_argument("--subset", default="FULL", choices=("FULL",) + tuple(datasets.SUBSET_FRACTIONS),
                        help="class-balanced, seeded training subset (default: FULL)")
    parser.add_argument("--strict-data", action="store_true", help="an unreadable image is an error, not skipped")
    parser.add_argument("--output_dir", default="", help="where to save; empty for no saving")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", default=0, type=int, help="each process uses seed + rank (default: 0)")
    parser.add_argument("--resume", default="", help="checkpoint to resume, or 'auto' for output_dir/latest.pth.tar")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (a resume overrides it)")
    parser.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint and exit")
    parser.add_argument("--eval-crop-ratio", default=datasets.EVAL_CROP_RATIO, type=float,
                        help=f"eval resize = input / ratio, then a centre crop (default: {datasets.EVAL_CROP_RATIO})")
    parser.add_argument("--dist-eval", action="store_true", help="each rank evaluates its own shard (default)")
    parser.add_argument("--no-dist-eval", action="store_false", dest="dist_eval",
                        help="every rank evaluates the whole validation set")
    parser.set_defaults(dist_eval=True)
    parser.add_argument("--num_workers", default=min(ORIGINAL_WORKERS, len(os.sched_getaffinity(0))), type=int,
                        help=f"loader processes per rank (default: {ORIGINAL_WORKERS}, the original's, or the "
                             f"number of usable CPUs if fewer)")
    parser.add_argument("--pin-mem", action="store_true", help="pin loader memory (default)")
    parser.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--amp", default=None, choices=tuple(AMP_DTYPES),
                        help="mixed precision (default: fp16 with a grad scaler on cuda, none on cpu)")
    parser.add_argument("--skip-nonfinite", default=0, type=int, metavar="N",
                        help="skip up to N steps with a non-finite loss before stopping (default: 0)")
    parser.add_argument("--print-freq", default=10, type=int, help="iterations between progress lines (default: 10)")
    parser.add_argument("--checkpoint-freq", default=20, type=int, help="keep ep{N}.pth.tar every N epochs (default: 20)")

    # Distributed (set by the launchers)
    parser.add_argument("--local-rank", "--local_rank", default=0, type=int, dest="local_rank",
                        help="local rank (torch.distributed.launch passes it; LOCAL_RANK wins when set)")
    parser.add_argument("--world_size", default=None, type=int,
                        help="expected number of processes; an error if the launcher started another number")
    parser.add_argument("--dist_url", default="env://", help="process group init method")
    parser.add_argument("--dist-timeout", default=30.0, type=float, metavar="MINUTES",
                        help="a collective that waits this long (a dead rank) stops the run (default: 30)")
    return parser


def _flags(*names: str) -> Set[str]:
    return set(names)


EVAL_FLAGS = _flags("config", "batch_size", "eval_student", "student_ckpt", "student_model", "input_size", "teacher",
                    "train_teacher", "data_path", "data_set", "strict_data", "output_dir", "device", "seed",
                    "resume", "eval", "eval_crop_ratio", "dist_eval", "num_workers", "pin_mem", "amp", "print_freq",
                    "local_rank", "world_size", "dist_url", "dist_timeout")
DISTILLATION_FLAGS = _flags("alpha", "gamma", "temperature", "normalisation", "feature_loss", "projector",
                            "orthogonal_map", "projector_impl", "projector_weight_decay", "teacher_path",
                            "teacher_channels_last")
FEATURE_FLAGS = _flags("normalisation", "feature_loss", "projector", "orthogonal_map", "projector_impl",
                       "projector_weight_decay")


def _mixup_on(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# (applies when, flags that then have no effect, why). Only flags given on the command line are checked:
# a config file is a recipe and lists everything.
NOT_APPLICABLE = (
    (lambda a: a.train_teacher, DISTILLATION_FLAGS, "--train-teacher trains with plain cross-entropy"),
    (lambda a: a.train_teacher, _flags("student_model", "student_ckpt"), "--train-teacher trains the --teacher model"),
    (lambda a: not a.train_teacher and a.alpha == 0, FEATURE_FLAGS, "--alpha 0 turns feature distillation off"),
    (lambda a: not a.train_teacher and a.gamma == 0, _flags("temperature"), "--gamma 0 turns logit distillation off"),
    (lambda a: not a.train_teacher, _flags("teacher_pretrained"),
     "it applies to --train-teacher; a distillation teacher comes from --teacher-path or timm"),
    (lambda a: a.opt != "adamw", _flags("opt_eps", "opt_betas"), "they apply to --opt adamw"),
    (lambda a: a.opt != "sgd", _flags("momentum"), "it applies to --opt sgd"),
    (lambda a: a.sched != "step", _flags("decay_epochs"), "it applies to --sched step"),
    (lambda a: a.sched not in ("step", "poly"), _flags("decay_rate"), "it applies to --sched step or poly"),
    (lambda a: a.lr_noise is None, _flags("lr_noise_pct", "lr_noise_std"), "they apply with --lr-noise"),
    (lambda a: a.warmup_epochs == 0, _flags("warmup_lr"), "it applies with --warmup-epochs > 0"),
    (lambda a: True, _flags("patience_epochs"), "a plateau schedule cannot be stepped per iteration"),
    (lambda a: True, _flags("aa", "reprob", "remode", "recount", "resplit"),
     "RandAugment and random erasing are not in the pipeline (the original never applied them)"),
    (lambda a: not a.student_ema, _flags("student_ema_decay", "student_ema_force_cpu"), "they apply with --student-ema"),
    (lambda a: not _mixup_on(a), _flags("mixup_prob", "mixup_switch_prob", "mixup_mode", "cutmix_minmax"),
     "mixup and cutmix are off"),
)


def _explicit_destinations(parser: argparse.ArgumentParser, argv) -> Set[str]:
    """Destinations given on the command line (not defaults): parse again with a marker as every default."""
    not_given = object()  # not a string, so argparse never type-converts it
    shadow = build_parser()
    shadow.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), not_given))
    return {dest for dest, value in vars(shadow.parse_args(argv)).items() if value is not not_given}


def _typed(action: argparse.Action, value):
    # YAML reads "5e-4" as a string (its floats need a dot); convert strings as the command line would.
    if action.type is None:
        return value
    if isinstance(value, list):
        return [action.type(item) if isinstance(item, str) else item for item in value]
    return action.type(value) if isinstance(value, str) else value


def _config_defaults(parser: argparse.ArgumentParser, path: str, chain: Tuple[str, ...] = ()) -> Dict[str, object]:
    if os.path.abspath(path) in chain:
        fail(f"config {path}: 'base' refers back to itself through {' -> '.join(chain)}")
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        fail(f"could not read config {path}: {str(error).splitlines()[0]}")
    if not isinstance(config, dict):
        fail(f"config {path} must be a mapping of flag names to values")
    # 'base: FILE.yaml' (relative to this file) supplies defaults that this file overrides, so a family of
    # configs (the ablation rows) states its shared recipe once.
    base = config.pop("base", None)
    defaults = (_config_defaults(parser, os.path.join(os.path.dirname(path), base), chain + (os.path.abspath(path),))
                if base else {})
    actions = {action.dest: action for action in parser._actions}
    for key, value in config.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            fail(f"config {path}: unknown key '{key}'")
        try:
            value = _typed(actions[dest], value)
        except (TypeError, ValueError):
            fail(f"config {path}: {key}: {value!r} is not a valid value")
        if actions[dest].choices is not None and value not in actions[dest].choices:
            fail(f"config {path}: {key} must be one of {', '.join(map(str, actions[dest].choices))}, got {value!r}")
        defaults[dest] = value
    return defaults


def parse_arguments(argv):
    """The resolved arguments and the set of destinations given on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**_config_defaults(parser, args.config))
        args = parser.parse_args(argv)
    if args.student_ckpt == "none":  # the original's default value
        args.student_ckpt = None
    return args, _explicit_destinations(parser, argv)


def check_arguments(args, explicit: Set[str]) -> None:
    """Contradictory or impossible flags: fail before any work."""
    for name, value in (("batch-size", args.batch_size), ("epochs", args.epochs), ("print-freq", args.print_freq),
                        ("checkpoint-freq", args.checkpoint_freq)):
        if value < 1:
            fail(f"--{name} must be at least 1, got {value}")
    if min(args.skip_nonfinite, args.start_epoch, args.seed) < 0:
        fail("--skip-nonfinite, --start_epoch and --seed must be >= 0")
    if args.dist_timeout <= 0:
        fail(f"--dist-timeout must be positive, got {args.dist_timeout}")
    if args.eval_student and not args.student_ckpt:
        fail("--eval-student needs --student-ckpt PATH")
    if args.eval_student and (args.eval or args.train_teacher):
        fail("--eval-student evaluates a student checkpoint; it cannot be combined with --eval or --train-teacher")
    if args.eval and not args.resume:
        fail("--eval evaluates the run's checkpoint: pass --resume PATH or --resume auto with --output_dir")
    if args.resume == "auto" and not args.output_dir:
        fail("--resume auto looks for output_dir/latest.pth.tar: pass --output_dir")
    if not 0 < args.eval_crop_ratio <= 1:
        fail(f"--eval-crop-ratio must be in (0, 1], got {args.eval_crop_ratio}")
    if args.bce_loss and _mixup_on(args) and args.smoothing > 0:
        fail("--bce-loss binarises targets, and label smoothing under mixup would make every target 1: "
             "pass --smoothing 0 (as DeiT III)")
    distilling = not args.train_teacher and (args.alpha > 0 or args.gamma > 0)
    if not args.train_mode and distilling:
        fail("--no-train-mode runs the student in eval mode, which returns only averaged logits: "
             "it needs --alpha 0 --gamma 0")
    if not args.train_teacher and args.student_model not in models.STUDENT_MODELS:
        fail(f"unknown student model '{args.student_model}'; valid: {', '.join(models.STUDENT_MODELS)}")
    if (args.train_teacher or (distilling and not args.eval)) and args.teacher not in timm.list_models():
        # timm has over a thousand names: list the closest ones rather than all of them.
        closest = difflib.get_close_matches(args.teacher, timm.list_models(), n=MAX_SUGGESTIONS)
        suggestion = f"closest: {', '.join(closest)}" if closest else "e.g. regnety_160, resnet18"
        fail(f"unknown teacher model '{args.teacher}'; any name in timm.list_models() works ({suggestion})")
    evaluating = args.eval_student or args.eval
    for dest in sorted(explicit):
        if evaluating and dest not in EVAL_FLAGS:
            fail(f"--{dest.replace('_', '-')} has no effect when evaluating (--eval-student / --eval)")
        for applies, flags, reason in NOT_APPLICABLE:
            if dest in flags and applies(args):
                fail(f"--{dest.replace('_', '-')} has no effect here: {reason}")


# ============================================================================ processes and devices

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def _first_slurm_host() -> str:
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, KeyError, subprocess.CalledProcessError):
        fail("Slurm run without MASTER_ADDR, and its first node could not be found with scontrol: set MASTER_ADDR")
    return hosts[0]


def _launcher_ranks(args):
    """(rank, world size, local rank) from torchrun / torch.distributed.launch, Slurm, or a plain run."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", args.local_rank))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, args.local_rank


def _select_device(requested: Optional[str], local_rank: int) -> torch.device:
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA device is visible")
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if device.index >= torch.cuda.device_count():
        fail(f"local rank {local_rank} needs cuda:{device.index} but only {torch.cuda.device_count()} GPU(s) are visible")
    torch.cuda.set_device(device)
    return device


def init_runtime(args, explicit: Set[str]) -> Runtime:
    rank, world_size, local_rank = _launcher_ranks(args)
    if "world_size" in explicit and args.world_size != world_size:
        fail(f"--world_size {args.world_size} but the launcher started {world_size} process(es)")
    device = _select_device(args.device, local_rank)
    if args.amp is None:
        args.amp = "fp16" if device.type == "cuda" else "none"
    if device.type != "cuda":
        args.pin_mem = False  # pinning only helps host-to-GPU copies (and warns without a GPU)
    if args.amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on the CPU")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=args.dist_url,
                                world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(minutes=args.dist_timeout))
    return Runtime(rank, world_size, local_rank, device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and mixup randomness of an epoch depend on (seed, rank, epoch) alone, so a resumed
    # run draws the same random numbers as an uninterrupted one.
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ============================================================================ building blocks

def data_args(args):
    """The data fields datasets.py reads, from the command line (FULL subset = None)."""
    fields = vars(datasets.default_data_args())
    resolved = {name: getattr(args, name) for name in fields}
    resolved["subset"] = None if args.subset == "FULL" else args.subset
    return argparse.Namespace(**resolved)


def build_val_loader(args, dataset_val, runtime: Runtime, sharded: bool):
    """The val loader of datasets.build_loaders (1.5 x batch, unpadded shard per rank when ``sharded``),
    for runs that have no training set (evaluation) or evaluate the whole set on every rank."""
    sampler = (DistributedEvalSampler(dataset_val, num_replicas=runtime.world_size, rank=runtime.rank) if sharded
               else torch.utils.data.SequentialSampler(dataset_val))
    return torch.utils.data.DataLoader(dataset_val, sampler=sampler, batch_size=int(1.5 * args.batch_size),
                                       num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=False,
                                       collate_fn=datasets.collate_skipping_unreadable)


def _model_or_fail(build):
    try:
        return build()
    except ValueError as error:
        fail(str(error))


def build_student(args, nb_classes: int, teacher_dim: Optional[int] = None) -> nn.Module:
    return _model_or_fail(lambda: models.create_student(
        args.student_model, num_classes=nb_classes, img_size=args.input_size, teacher_dim=teacher_dim,
        projector=args.projector, orthogonal_map=args.orthogonal_map, projector_impl=args.projector_impl,
        drop_rate=args.drop, drop_path_rate=args.drop_path))


def build_teacher_to_train(args, nb_classes: int) -> nn.Module:
    kwargs = dict(num_classes=nb_classes, drop_rate=args.drop)
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    try:
        return timm.create_model(args.teacher, pretrained=args.teacher_pretrained, **kwargs)
    except TypeError as error:
        fail(f"teacher '{args.teacher}' does not take these options: {error}")
    except Exception as error:  # pretrained download without network, gated hub repository ...
        if not args.teacher_pretrained:
            raise
        fail(f"could not download pretrained weights for '{args.teacher}' ({type(error).__name__}); "
             f"drop --teacher-pretrained to train from scratch")


def build_base_criterion(args, mixup_on: bool) -> nn.Module:
    if args.bce_loss:
        return nn.BCEWithLogitsLoss()
    if mixup_on:
        return SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def parameter_groups(model: nn.Module, weight_decay: float, decay_projector: bool = True):
    """No weight decay on 1-D parameters, biases and the model's ``no_weight_decay()`` names (the original's
    rule), nor on ``projector.*`` unless ``decay_projector``.

    Why the projector option: torch's Householder map takes each column's sign from int() of the
    diagonal of ``original``, which receives no gradient; decay moves it off -1 and int() turns it
    to 0, so the original recipe trains with a zero projector after its first step (README).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt_projector = not decay_projector and name.startswith("projector.")
        if parameter.ndim <= 1 or name.endswith(".bias") or name in skip or exempt_projector:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(args, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, args.weight_decay, args.projector_weight_decay)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, eps=args.opt_eps, betas=tuple(args.opt_betas or (0.9, 0.999)))


def build_lr_scheduler(args, optimizer, steps_per_epoch: int):
    """timm's scheduler stepped per iteration; returns it and the total epoch count (with cooldown)."""
    return create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)


class StudentEMA:
    """Exponential moving average of the weights, momentum rising linearly from ``start_momentum`` at
    the first iteration to 1.0 at the last (the original: 0.996 -> 1.0). Buffers (BN statistics,
    the projector's base) are copied, not averaged."""

    def __init__(self, model: nn.Module, start_momentum: float, total_steps: int, device: torch.device):
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.start_momentum, self.total_steps = start_momentum, total_steps

    def momentum(self, step: int) -> float:
        return self.start_momentum + (1.0 - self.start_momentum) * step / self.total_steps

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        momentum = self.momentum(step)
        source = getattr(model, "module", model)
        for average, current in zip(self.model.parameters(), source.parameters()):
            average.mul_(momentum).add_(current.detach().to(average.device), alpha=1.0 - momentum)
        for average, current in zip(self.model.buffers(), source.buffers()):
            average.copy_(current)


# ============================================================================ checkpoints

def _logged_epoch(line: str, key: str = "epoch") -> Optional[int]:
    """The epoch (or ``key``) of a log.txt line; None for a last line torn by a kill in the middle of its write."""
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
        epoch = _logged_epoch(line, key)
        if epoch is not None and epoch < start_epoch:
            kept.append(line)
    if len(kept) < len(lines):
        temporary = f"{path}.tmp"
        with open(temporary, "w") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)


def resolve_resume(args) -> Optional[str]:
    if args.resume != "auto":
        return args.resume or None
    latest = os.path.join(args.output_dir, LATEST)
    return latest if os.path.isfile(latest) else None


@dataclass
class Trainer:
    """Everything a checkpoint holds and a resume restores."""
    args: argparse.Namespace
    runtime: Runtime
    model: nn.Module  # not DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_scheduler: object
    ema: Optional[StudentEMA]
    start_epoch: int = 0
    best_acc1: float = 0.0
    nonfinite_skipped: int = 0

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
            "best_acc1": self.best_acc1,
            "nonfinite_skipped": self.nonfinite_skipped,
            "args": dict(vars(self.args)),
            "loss": loss,
            "batch_size": self.args.batch_size,
            "world_size": self.runtime.world_size,
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
            stop(f"the weights became non-finite during epoch {epoch}; {LATEST} was left as it was")
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


# ============================================================================ runs

def warn_unreadable(runtime: Runtime, count: int, what: str) -> None:
    if count and runtime.is_main:
        print(f"warning: {count} unreadable {what} were skipped (--strict-data makes them an error)",
              file=sys.stderr, flush=True)


def write_json(path: str, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.write("\n")


def run_evaluation(args, runtime: Runtime, checkpoint_path: str, subject: str) -> None:
    """Evaluate a checkpoint (released layout or ours) on the validation set; no teacher is built."""
    dataset_val, nb_classes = datasets.build_dataset(False, data_args(args))
    if args.train_teacher:
        model = build_teacher_to_train(args, nb_classes)
    else:
        model = build_student(args, nb_classes)
    load_student_checkpoint(model, checkpoint_path)
    model.to(runtime.device)
    loader = build_val_loader(args, dataset_val, runtime, sharded=args.dist_eval)
    results = evaluate(model, loader, runtime.device, AMP_DTYPES[args.amp], args.print_freq, runtime.is_main,
                       sharded=args.dist_eval)
    warn_unreadable(runtime, results["unreadable_images"], "validation images")
    runtime.log(f"Accuracy of {subject} on the {results['images']} test images: {results['acc1']:.1f}%")
    if args.output_dir and runtime.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "eval_results.json"),
                   dict(results, checkpoint=os.path.abspath(checkpoint_path), model=model.__class__.__name__,
                        args=vars(args), processes=runtime.world_size, git_commit=git_commit()))


def build_training_model(args, runtime: Runtime, nb_classes: int):
    """(model, criterion): a student with its distillation criterion, or a teacher with plain CE."""
    mixup_on = _mixup_on(args)
    base_criterion = build_base_criterion(args, mixup_on)
    if args.train_teacher:
        return build_teacher_to_train(args, nb_classes), VkDLoss(None, base_criterion, alpha=0.0, gamma=0.0)
    teacher = None
    if args.alpha > 0 or args.gamma > 0:
        runtime.log(f"Creating teacher: {args.teacher}")
        teacher = models.create_teacher(args.teacher, num_classes=nb_classes, teacher_path=args.teacher_path,
                                        channels_last=args.teacher_channels_last)
    student = build_student(args, nb_classes, teacher_dim=teacher.num_features if args.alpha > 0 else None)
    if args.alpha > 0 and args.projector_weight_decay and args.weight_decay > 0 and args.projector == "orthogonal":
        runtime.log("note: as in the original, the projector gets weight decay; with the Householder map this "
                    "zeroes it after the first step. --no-projector-weight-decay keeps it an isometry (README)")
    criterion = VkDLoss(teacher, base_criterion, alpha=args.alpha, gamma=args.gamma, temperature=args.temperature,
                        normalisation=args.normalisation, feature_loss=args.feature_loss)
    return student, criterion


def write_run_info(args, runtime: Runtime, argv, lr: float) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "args.json"),
               dict(args=vars(args), git_commit=git_commit(), command=list(argv), processes=runtime.world_size,
                    global_batch=args.batch_size * runtime.world_size, lr_effective=lr))


def run_training(args, runtime: Runtime, argv) -> None:
    seed_everything(args.seed + runtime.rank)
    data = data_args(args)
    dataset_train, nb_classes = datasets.build_dataset(True, data)
    dataset_val, _ = datasets.build_dataset(False, data)
    train_loader, val_loader = datasets.build_loaders(data, dataset_train, dataset_val, runtime.distributed,
                                                      runtime.rank, runtime.world_size)
    if not args.dist_eval:
        val_loader = build_val_loader(args, dataset_val, runtime, sharded=False)
    steps_per_epoch = len(train_loader)
    mixup_fn = datasets.build_mixup(data, nb_classes)

    model, criterion = build_training_model(args, runtime, nb_classes)
    model.to(runtime.device)
    criterion.to(runtime.device)
    runtime.log(f"number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    trained = model
    if runtime.distributed:
        # A distilled student's dist head gets no gradient when gamma = 0.
        unused_head = not args.train_teacher and args.gamma == 0 and hasattr(model, "head_dist")
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=unused_head)

    lr = args.lr if args.unscale_lr else args.lr * args.batch_size * runtime.world_size / REFERENCE_BATCH
    optimizer = build_optimizer(args, model, lr)
    lr_scheduler, total_epochs = build_lr_scheduler(args, optimizer, steps_per_epoch)
    ema = None
    if args.student_ema:
        ema_device = torch.device("cpu") if args.student_ema_force_cpu else runtime.device
        ema = StudentEMA(model, args.student_ema_decay, steps_per_epoch * total_epochs, ema_device)
    trainer = Trainer(args, runtime, model, optimizer, torch.amp.GradScaler(runtime.device.type, enabled=args.amp == "fp16"),
                      lr_scheduler, ema, start_epoch=args.start_epoch)
    if args.student_ckpt:
        # The original's fine-tuning start: weights only. A checkpoint found by --resume overrides them.
        load_student_checkpoint(model, args.student_ckpt)
        runtime.log(f"Student initialised from {args.student_ckpt}")
    resume_path = resolve_resume(args)
    if resume_path:
        trainer.restore(resume_path)
        runtime.log(f"Resumed from {resume_path}: continuing at epoch {trainer.start_epoch}")
    elif args.resume == "auto":
        runtime.log(f"No {LATEST} in {args.output_dir}: starting from scratch")
    if trainer.start_epoch >= total_epochs:
        runtime.log(f"Nothing to train: the run has finished its {total_epochs} epochs")
        return

    tb_writer = None
    if args.output_dir and runtime.is_main:
        write_run_info(args, runtime, argv, lr)
        trim_log(os.path.join(args.output_dir, LOG), trainer.start_epoch)
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used
        tb_writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    runtime.log(f"Start training for {total_epochs} epochs ({steps_per_epoch} iterations each, lr {lr:.3g})")
    for epoch in range(trainer.start_epoch, total_epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_everything(epoch_seed(args.seed, runtime.rank, epoch))
        train_stats = train_one_epoch(
            trained, criterion, train_loader, optimizer, runtime.device, epoch, lr_scheduler=lr_scheduler,
            scaler=trainer.scaler, amp_dtype=AMP_DTYPES[args.amp], mixup_fn=mixup_fn, clip_grad=args.clip_grad,
            ema=ema, skips_allowed=args.skip_nonfinite - trainer.nonfinite_skipped, bce_targets=args.bce_loss,
            set_training_mode=args.train_mode, print_freq=args.print_freq, is_main=runtime.is_main,
            world_size=runtime.world_size, tb_writer=tb_writer)
        trainer.nonfinite_skipped += train_stats["nonfinite_skipped"]
        warn_unreadable(runtime, train_stats["unreadable_images"], f"training images in epoch {epoch}")
        val_stats = evaluate(model, val_loader, runtime.device, AMP_DTYPES[args.amp], args.print_freq,
                             runtime.is_main, sharded=args.dist_eval)
        warn_unreadable(runtime, val_stats["unreadable_images"], "validation images")
        runtime.log(f"Accuracy of the network on the {val_stats['images']} test images: {val_stats['acc1']:.1f}%")
        improved = val_stats["acc1"] > trainer.best_acc1
        trainer.best_acc1 = max(trainer.best_acc1, val_stats["acc1"])
        runtime.log(f"Max accuracy: {trainer.best_acc1:.2f}%")
        if args.output_dir and runtime.is_main:
            record = dict(epoch=epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                          **{f"val_{k}": v for k, v in val_stats.items()}, best_acc1=trainer.best_acc1)
            trainer.save(epoch, train_stats["loss"], improved, record)
            for name in ("acc1", "acc5", "loss"):
                tb_writer.add_scalar(f"val/{name}", val_stats[name], epoch)
            tb_writer.flush()

    if ema is not None:
        ema.model.to(runtime.device)
        ema_stats = evaluate(ema.model, val_loader, runtime.device, AMP_DTYPES[args.amp], args.print_freq,
                             runtime.is_main, sharded=args.dist_eval)
        runtime.log(f"Accuracy of the [ema] network on the {ema_stats['images']} test images: {ema_stats['acc1']:.1f}%")
        if args.output_dir and runtime.is_main:
            write_json(os.path.join(args.output_dir, "eval_ema.json"), ema_stats)
    if args.train_teacher and args.output_dir and runtime.is_main:
        teacher_path = os.path.join(args.output_dir, TEACHER_FILE)
        save_atomically({"model": model.state_dict()}, teacher_path)
        runtime.log(f"Teacher saved to {teacher_path}: distil with --teacher {args.teacher} --teacher-path {teacher_path}")
    if tb_writer is not None:
        tb_writer.close()


# Gloo and NCCL report a dead or silent peer as a plain RuntimeError from whichever collective noticed.
COMMUNICATION_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out",
                                 "Timeout", "NCCL", "gloo")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_communication_failure(error: RuntimeError) -> bool:
    return isinstance(error, dist.DistError) or any(marker in str(error) for marker in COMMUNICATION_FAILURE_MARKERS)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_arguments(argv)
    check_arguments(args, explicit)
    runtime = init_runtime(args, explicit)
    for dest in ("repeated_aug", "dist_eval"):
        if dest in explicit and not runtime.distributed:
            fail(f"--{dest.replace('_', '-')} has no effect with a single process")
    try:
        if args.eval_student:
            run_evaluation(args, runtime, args.student_ckpt, "the student network")
        elif args.eval:
            path = resolve_resume(args)
            if path is None:
                fail(f"--eval: no {LATEST} in {args.output_dir}")
            run_evaluation(args, runtime, path, "the network")
        else:
            run_training(args, runtime, argv)
    except (datasets.DatasetError, CheckpointError) as error:
        fail(str(error))
    except NonFiniteLossError as error:
        stop(f"{error}; the last checkpoint was left as it was")
    except RuntimeError as error:
        if not (runtime.distributed and _is_communication_failure(error)):
            raise
        stop(f"rank {runtime.rank}: distributed communication failed, probably because another process died or hung "
             f"(collectives give up after --dist-timeout {args.dist_timeout:g} min): {_first_line(error)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
