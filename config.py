"""The command line: flags (every flag of the original ``main_distributed.py`` under its name), ``--config``
YAML files with ``base`` inheritance, and the checks that refuse contradictory or ineffective flags.

Defaults are the values the original effectively trained with, except where the original has a bug
(README, "Differences from the original code"). A flag the original ignored either takes effect here or,
when it cannot, setting it is an error (see ``NOT_APPLICABLE``).
"""
import argparse
import os
from typing import Set

import timm
import torch

import datasets
import distillers
import models
from vkd.config import OneLineErrorParser, parse_with_config
from vkd.errors import BadInput
from vkd.teachers import unknown_model_line

SCHEDULES = ("cosine", "tanh", "step", "poly", "constant")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
INFINITY = float("inf")
ORIGINAL_WORKERS = 12
# Flags the original parsed but never applied (a plateau schedule, RandAugment, random erasing): they parse, so
# the original's commands run, are hidden from --help, and setting one is an error (NOT_APPLICABLE).
COMPATIBILITY_ONLY = argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("VkD training and evaluation", add_help=True)
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
                        help=f"student: any timm architecture (resnet18, regnetx_002, ...) or one of this repository's "
                             f"conv-stem DeiT students ({', '.join(models.STUDENT_MODELS)}); default: deit_ti_distilled")
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

    # Optimizer
    parser.add_argument("--opt", default="adamw", choices=("adamw", "sgd"), help="(default: adamw)")
    parser.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON", help="AdamW epsilon (default: 1e-8)")
    parser.add_argument("--opt-betas", default=None, type=float, nargs=2, metavar="BETA",
                        help="AdamW betas (default: 0.9 0.999)")
    parser.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: off)")
    parser.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="(default: 0.05; none on 1-D params)")

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
                        help=COMPATIBILITY_ONLY)
    parser.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE",
                        help="step decay factor, or the power of the poly schedule (default: 0.1)")

    # Augmentation
    parser.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT", help="(default: 0.3)")
    parser.add_argument("--aa", type=str, default=None, metavar="NAME",
                        help=COMPATIBILITY_ONLY)
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
                        help=COMPATIBILITY_ONLY)
    parser.add_argument("--remode", type=str, default="pixel", help=COMPATIBILITY_ONLY)
    parser.add_argument("--recount", type=int, default=1, help=COMPATIBILITY_ONLY)
    parser.add_argument("--resplit", action="store_true", default=False, help=COMPATIBILITY_ONLY)
    parser.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, on if > 0 (default: 0.8)")
    parser.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, on if > 0 (default: 1.0)")
    parser.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    parser.add_argument("--mixup-prob", type=float, default=1.0, help="(default: 1.0)")
    parser.add_argument("--mixup-switch-prob", type=float, default=0.5, help="(default: 0.5)")
    parser.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"))

    # Distillation
    parser.add_argument("--teacher", default="regnety_160", type=str, metavar="MODEL",
                        help="timm teacher, optionally with a pretrained tag (default: regnety_160, whose pretrained "
                             "weights are DeiT's regnety_160.deit_in1k); evaluation never builds it")
    parser.add_argument("--teacher-path", type=str, default=None,
                        help="local teacher weights (strict); without it timm's pretrained weights are downloaded")
    parser.add_argument("--teacher-channels-last", action="store_true",
                        help="run the frozen teacher's convolutions channels-last (default; faster, same function)")
    parser.add_argument("--no-teacher-channels-last", action="store_false", dest="teacher_channels_last")
    parser.set_defaults(teacher_channels_last=True)
    parser.add_argument("--teacher-cache", default=None, metavar="DIR",
                        help="keep the teacher's outputs of each input batch in DIR and read them back when the same "
                             "teacher sees the same batch again: the rows of an ablation (same seed and data) run "
                             "it once; processes and runs may share DIR (default: off)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the frozen teacher's forward (timm's --torchcompile) with BACKEND "
                             "(default: inductor); the first batch compiles, and its time is printed (default: off)")

    # Data and run
    parser.add_argument("--data-path", default=None, type=str, help="dataset folder")
    parser.add_argument("--data-set", default="IMNET", choices=datasets.DATA_SETS)
    parser.add_argument("--download", action="store_true",
                        help="CIFAR: torchvision downloads it into --data-path when it is not there")
    parser.add_argument("--subset", default="FULL", choices=("FULL",) + tuple(datasets.SUBSET_FRACTIONS),
                        help="class-balanced, seeded training subset (default: FULL)")
    parser.add_argument("--strict-data", action="store_true", help="an unreadable image is an error, not skipped")
    parser.add_argument("--output_dir", default="", help="where to save; empty for no saving")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", default=0, type=int, help="each process uses seed + rank (default: 0)")
    parser.add_argument("--resume", default="", help="checkpoint to resume, or 'auto' for output_dir/latest.pth.tar")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output_dir that holds one: the old run is moved aside to "
                             "OUTPUT_DIR.previous-<time>, never deleted")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (a resume overrides it)")
    parser.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint and exit")
    parser.add_argument("--eval-freq", default=1, type=int, metavar="N",
                        help="evaluate after every N-th epoch and after the last (default: 1)")
    parser.add_argument("--eval-head", default="mean", choices=models.EVAL_HEADS,
                        help="a distilled student's evaluation logits: the mean of the cls and dist heads (DeiT's), "
                             "or the cls head alone, for students trained with --gamma 0, whose dist head never "
                             "learns (default: mean)")
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
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms only (torch.use_deterministic_algorithms): the same command "
                             "on the same machine gives the same numbers")
    parser.add_argument("--threads", default=None, type=int, metavar="N",
                        help="CPU threads of each process (default: torch's choice); fix it for repeatable runs")
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

    distillers.add_arguments(parser)
    return parser


# dest: (low, high, low included, high included); values outside are one error line, not a traceback later.
VALUE_RANGES = {
    "lr": (0.0, INFINITY, False, False), "min_lr": (0.0, INFINITY, True, False),
    "warmup_lr": (0.0, INFINITY, True, False), "weight_decay": (0.0, INFINITY, True, False),
    "smoothing": (0.0, 1.0, True, False),
    "drop": (0.0, 1.0, True, False), "drop_path": (0.0, 1.0, True, False),
    "mixup": (0.0, INFINITY, True, False), "cutmix": (0.0, INFINITY, True, False),
    "mixup_prob": (0.0, 1.0, True, True), "mixup_switch_prob": (0.0, 1.0, True, True),
    "color_jitter": (0.0, INFINITY, True, False), "crop_scale_min": (0.0, 1.0, False, True),
    "eval_crop_ratio": (0.0, 1.0, False, True), "clip_grad": (0.0, INFINITY, False, False),
    "momentum": (0.0, 1.0, True, False), "opt_eps": (0.0, INFINITY, False, False),
    "student_ema_decay": (0.0, 1.0, True, True), "dist_timeout": (0.0, INFINITY, False, False),
    "decay_epochs": (0.0, INFINITY, False, False), "decay_rate": (0.0, INFINITY, False, False),
}


def _flags(*names: str) -> Set[str]:
    return set(names)


EVAL_FLAGS = _flags("config", "batch_size", "eval_student", "student_ckpt", "student_model", "input_size", "teacher",
                    "train_teacher", "data_path", "data_set", "download", "strict_data", "output_dir", "device", "seed",
                    "resume", "eval", "eval_crop_ratio", "eval_head", "dist_eval", "num_workers", "pin_mem", "amp", "print_freq",
                    "deterministic", "threads",
                    "local_rank", "world_size", "dist_url", "dist_timeout")
TEACHER_RUN_FLAGS = _flags("teacher_cache", "compile")


def distillation_flags() -> Set[str]:
    """What --train-teacher ignores: the method, its teacher's settings and every method's flags."""
    return _flags("distiller", "teacher_path", "teacher_channels_last", *TEACHER_RUN_FLAGS,
                  *(flag.dest for flag in distillers.all_flags()))


# (applies when, flags that then have no effect, why). Checked for the flags given on the command line and the
# keys the --config file sets itself; keys it takes from its base (a family's shared recipe) are not checked.
NOT_APPLICABLE = (
    (lambda a: a.train_teacher, distillation_flags, "--train-teacher trains with plain cross-entropy"),
    (lambda a: a.train_teacher, _flags("student_model", "student_ckpt", "eval_head"),
     "--train-teacher trains the --teacher model"),
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
    (lambda a: a.input_size <= datasets.SMALL_INPUT_SIZE, _flags("eval_crop_ratio"),
     "inputs of 32 px or less are evaluated without resize or centre crop, as in the original"),
    (lambda a: a.data_set != "CIFAR", _flags("download"),
     "it applies to --data-set CIFAR; the other data sets are read from local files"),
    (lambda a: not datasets.mixup_active(a), _flags("mixup_prob", "mixup_switch_prob", "mixup_mode", "cutmix_minmax"),
     "mixup and cutmix are off"),
)


class Chosen(frozenset):
    """The destinations given on the command line; ``from_file``: those the ``--config`` file sets itself."""

    def __new__(cls, command_line, from_file=()):
        chosen = super().__new__(cls, command_line)
        chosen.from_file = frozenset(from_file) - chosen
        return chosen


def parse_arguments(argv):
    """The resolved arguments and the destinations set on purpose: on the command line, or by the
    ``--config`` file (whose keys are checked like the flags they name)."""
    args, explicit, from_file = parse_with_config(build_parser(), argv)
    if args.student_ckpt == "none":  # the original's default value
        args.student_ckpt = None
    return args, Chosen(explicit, from_file)


def check_arguments(args, explicit: Set[str]) -> None:
    """Contradictory or impossible flags: fail before any work."""
    for name, value in (("batch-size", args.batch_size), ("epochs", args.epochs), ("print-freq", args.print_freq),
                        ("checkpoint-freq", args.checkpoint_freq), ("eval-freq", args.eval_freq),
                        ("threads", args.threads or 1)):
        if value < 1:
            raise BadInput(f"--{name} must be at least 1, got {value}")
    ranges = {**VALUE_RANGES, **{flag.dest: flag.range for flag in distillers.all_flags() if flag.range}}
    for dest, (low, high, closed_low, closed_high) in ranges.items():
        value = getattr(args, dest)
        if value is not None and not ((low <= value if closed_low else low < value)
                                      and (value <= high if closed_high else value < high)):
            interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
            raise BadInput(f"--{dest.replace('_', '-')} must be in {interval}, got {value:g}")
    if min(args.skip_nonfinite, args.start_epoch, args.seed) < 0:
        raise BadInput("--skip-nonfinite, --start_epoch and --seed must be >= 0")
    if args.eval_student and not args.student_ckpt:
        raise BadInput("--eval-student needs --student-ckpt PATH")
    if args.eval_student and (args.eval or args.train_teacher):
        raise BadInput("--eval-student evaluates a student checkpoint; it cannot be combined with --eval or --train-teacher")
    if args.eval and not args.resume:
        raise BadInput("--eval evaluates the run's checkpoint: pass --resume PATH or --resume auto with --output_dir")
    if args.overwrite and (args.resume or not args.output_dir or args.eval or args.eval_student):
        raise BadInput("--overwrite starts a new training run in --output_dir, moving the old one aside: it needs --output_dir "
             "and cannot be combined with --resume, --eval or --eval-student")
    if args.resume == "auto" and not args.output_dir:
        raise BadInput("--resume auto looks for output_dir/latest.pth.tar: pass --output_dir")
    if args.bce_loss and datasets.mixup_active(args) and args.smoothing > 0:
        raise BadInput("--bce-loss binarises targets, and label smoothing under mixup would make every target 1: "
             "pass --smoothing 0 (as DeiT III)")
    method = distillers.distiller_class(args.distiller)
    distilling = not args.train_teacher and method.needs_teacher(args)
    if not args.train_mode and not args.train_teacher and (method.projector(args) or method.trains_distillation_head(args)):
        raise BadInput(f"--no-train-mode runs the student in eval mode, which gives neither a distillation head's "
                       f"logits nor features: --distiller {args.distiller} needs them here")
    if not args.train_teacher and not models.is_student_name(args.student_model):
        raise BadInput(unknown_model_line("student", args.student_model)
                       + "; or one of this repository's: " + ", ".join(models.STUDENT_MODELS))
    if (args.train_teacher or (distilling and not args.eval)) and args.teacher.split(".")[0] not in timm.list_models():
        raise BadInput(unknown_model_line("teacher", args.teacher))
    if args.compile is not None:
        import torch._dynamo  # slow to import: only when asked for
        if args.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise BadInput(f"--compile: unknown backend '{args.compile}'; "
                           f"e.g. {', '.join(torch._dynamo.list_backends())}")
    evaluating = args.eval_student or args.eval
    for dest in sorted(explicit):
        if evaluating and dest not in EVAL_FLAGS:
            raise BadInput(f"--{dest.replace('_', '-')} has no effect when evaluating (--eval-student / --eval)")
    # A training recipe's keys are checked like its flags; evaluating with a recipe file is fine.
    from_file = () if evaluating else getattr(explicit, "from_file", ())
    inert = [] if args.train_teacher else list(method.inert_flags(args))
    if not distilling and not args.train_teacher:
        inert.append((TEACHER_RUN_FLAGS, f"--distiller {args.distiller} runs no teacher here"))
    for dest in sorted(set(explicit) | set(from_file)):
        where = f"config {args.config}: {dest.replace('_', '-')}" if dest in from_file else f"--{dest.replace('_', '-')}"
        owners = distillers.owners_of(dest)
        if owners and not args.train_teacher and args.distiller not in owners:
            raise BadInput(f"{where} is a flag of --distiller {' / '.join(owners)}; --distiller {args.distiller} "
                           f"does not read it")
        for applies, flags, reason in NOT_APPLICABLE:
            if dest in (flags() if callable(flags) else flags) and applies(args):
                raise BadInput(f"{where} has no effect here: {reason}")
        for flags, reason in inert:
            if dest in flags:
                raise BadInput(f"{where} has no effect here: {reason}")

