"""The command line of ``main_distributed.py``: the run's own flags here, composed with the groups each module
adds for what it reads (``datasets``, ``models.build``, ``optim``, ``distillers``), ``--config`` YAML files with
``base`` inheritance, and the checks that refuse contradictory or ineffective flags.

Defaults are the values the original effectively trained with, except where the original has a bug
(docs/differences.md). A flag the original ignored either takes effect here or, when it cannot, setting it is an
error (each module's ``NO_EFFECT``).
"""
import argparse
from typing import Dict, Set

import timm
import torch

import datasets
import distillers
import models
import optim
from models import build
from vkd.config import (
    REFUSED,
    NoEffect,
    OneLineErrorParser,
    always,
    config_origins,
    flag_name,
    parse_with_config,
    refuse_flags_without_effect,
)
from vkd.errors import BadInput
from vkd.teachers import unknown_model_line

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
INFINITY = float("inf")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What the run does (train, evaluate), where it writes, how it computes, and the launchers' flags."""
    run = parser.add_argument_group("run")
    run.add_argument("--config", default=None, metavar="FILE.yaml",
                     help="YAML file of defaults (keys are flag names, '-' or '_'); the command line overrides it")
    run.add_argument("--output_dir", "--output-dir", default="", help="where to save; empty for no saving")
    run.add_argument("--resume", default="", help="checkpoint to resume, or 'auto' for output_dir/latest.pth.tar")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output_dir that holds one: the old run is moved aside to "
                          "OUTPUT_DIR.previous-<time>, never deleted")
    run.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (a resume overrides it)")
    run.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint and exit")
    run.add_argument("--eval-student", action="store_true", help="evaluate --student-ckpt and exit")
    run.add_argument("--student-ckpt", default=None, type=str,
                     help="student checkpoint (released layout or ours) to evaluate with --eval-student, or to "
                          "start training from (weights only)")
    run.add_argument("--eval-freq", default=1, type=int, metavar="N",
                     help="evaluate after every N-th epoch and after the last (default: 1)")
    run.add_argument("--dist-eval", action="store_true", help="each rank evaluates its own shard (default)")
    run.add_argument("--no-dist-eval", action="store_false", dest="dist_eval",
                     help="every rank evaluates the whole validation set")
    run.set_defaults(dist_eval=True)
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--amp", default=None, choices=tuple(AMP_DTYPES),
                     help="mixed precision (default: fp16 with a grad scaler on cuda, none on cpu)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic algorithms only (torch.use_deterministic_algorithms): the same command "
                          "on the same machine gives the same numbers")
    run.add_argument("--threads", default=None, type=int, metavar="N",
                     help="CPU threads of each process (default: torch's choice); fix it for repeatable runs")
    run.add_argument("--skip-nonfinite", default=0, type=int, metavar="N",
                     help="skip up to N steps with a non-finite loss before stopping (default: 0)")
    run.add_argument("--print-freq", default=10, type=int, help="iterations between progress lines (default: 10)")
    run.add_argument("--checkpoint-freq", default=20, type=int, help="keep ep{N}.pth.tar every N epochs (default: 20)")
    launch = parser.add_argument_group("distributed (set by the launchers)")
    launch.add_argument("--local-rank", "--local_rank", default=0, type=int, dest="local_rank",
                        help="local rank (torch.distributed.launch passes it; LOCAL_RANK wins when set)")
    launch.add_argument("--world_size", default=None, type=int,
                        help="expected number of processes; an error if the launcher started another number")
    launch.add_argument("--dist_url", default="env://", help="process group init method")
    launch.add_argument("--dist-timeout", default=30.0, type=float, metavar="MINUTES",
                        help="a collective that waits this long (a dead rank) stops the run (default: 30)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser("VkD training and evaluation", add_help=True)
    add_run_arguments(parser)
    for module in (datasets, build, optim, distillers):
        module.add_arguments(parser)
    return parser


# dest: (low, high, low included, high included); values outside are one error line, not a traceback later.
RUN_VALUE_RANGES = {"dist_timeout": (0.0, INFINITY, False, False)}
AT_LEAST_ONE = ("batch_size", "epochs", "print_freq", "checkpoint_freq", "eval_freq", "threads")
EVAL_FLAGS = {"config", "batch_size", "eval_student", "student_ckpt", "student_model", "input_size", "teacher",
              "train_teacher", "data_path", "data_set", "download", "strict_data", "output_dir", "device", "seed",
              "resume", "eval", "eval_crop_ratio", "eval_head", "dist_eval", "num_workers", "pin_mem", "amp",
              "print_freq", "deterministic", "threads", "local_rank", "world_size", "dist_url", "dist_timeout"}


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
    _check_values(args, config_origins(args.config, explicit))
    _check_run(args)
    _check_models(args)
    _check_flags_take_effect(args, explicit)


def _check_values(args, origins: Dict[str, str]) -> None:
    """Values out of their range, named by their flag or by the config file and key that set them."""
    for dest in AT_LEAST_ONE:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise BadInput(f"{flag_name(dest, origins)} must be at least 1, got {value}")
    ranges = {**RUN_VALUE_RANGES, **datasets.VALUE_RANGES, **build.VALUE_RANGES, **optim.VALUE_RANGES,
              **{flag.dest: flag.range for flag in distillers.all_flags() if flag.range}}
    for dest, (low, high, closed_low, closed_high) in ranges.items():
        value = getattr(args, dest)
        if value is not None and not ((low <= value if closed_low else low < value)
                                      and (value <= high if closed_high else value < high)):
            interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
            raise BadInput(f"{flag_name(dest, origins)} must be in {interval}, got {value:g}")
    if min(args.skip_nonfinite, args.start_epoch, args.seed) < 0:
        raise BadInput("--skip-nonfinite, --start_epoch and --seed must be >= 0")


def _check_run(args) -> None:
    if args.eval_student and not args.student_ckpt:
        raise BadInput("--eval-student needs --student-ckpt PATH")
    if args.eval_student and (args.eval or args.train_teacher):
        raise BadInput("--eval-student evaluates a student checkpoint; it cannot be combined with --eval or "
                       "--train-teacher")
    if args.eval and not args.resume:
        raise BadInput("--eval evaluates the run's checkpoint: pass --resume PATH or --resume auto with --output_dir")
    if args.overwrite and (args.resume or not args.output_dir or args.eval or args.eval_student):
        raise BadInput("--overwrite starts a new training run in --output_dir, moving the old one aside: it needs "
                       "--output_dir and cannot be combined with --resume, --eval or --eval-student")
    if args.resume == "auto" and not args.output_dir:
        raise BadInput("--resume auto looks for output_dir/latest.pth.tar: pass --output_dir")
    if args.bce_loss and datasets.mixup_active(args) and args.smoothing > 0:
        raise BadInput("--bce-loss binarises targets, and label smoothing under mixup would make every target 1: "
                       "pass --smoothing 0 (as DeiT III)")


def _check_models(args) -> None:
    method = distillers.distiller_class(args.distiller)
    distilling = not args.train_teacher and method.needs_teacher(args)
    if not args.train_mode and not args.train_teacher and (method.projector(args)
                                                           or method.trains_distillation_head(args)):
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


def _rules_without_effect(args) -> list:
    """``vkd.config.NoEffect`` rules: evaluation's, another method's flags, the modules' (``NO_EFFECT`` of datasets,
    models.build and optim), and the chosen method's own (distillers' inert flags)."""
    rules = [NoEffect(lambda a: a.eval_student or a.eval, lambda: set(vars(args)) - EVAL_FLAGS, "",
                      "{flag} has no effect when evaluating (--eval-student / --eval)")]
    if not args.train_teacher:
        for dest in sorted({flag.dest for flag in distillers.all_flags()}):
            owners = distillers.owners_of(dest)
            if args.distiller not in owners:
                rules.append(NoEffect(always, {dest}, f"is a flag of --distiller {' / '.join(owners)}; --distiller "
                                                      f"{args.distiller} does not read it", REFUSED))
    rules += [*datasets.NO_EFFECT, *build.NO_EFFECT, *optim.NO_EFFECT]
    if not args.train_teacher:
        method = distillers.distiller_class(args.distiller)
        rules += [NoEffect(always, set(flags), reason) for flags, reason in method.inert_flags(args)]
        if not method.needs_teacher(args):
            rules.append(NoEffect(always, build.TEACHER_RUN_FLAGS, f"--distiller {args.distiller} runs no teacher here"))
    return rules


def _check_flags_take_effect(args, explicit: Set[str]) -> None:
    """Every flag given (and every key the --config file sets itself) must take effect (``_rules_without_effect``)."""
    # A training recipe's keys are checked like its flags; evaluating with a recipe file is fine.
    from_file = () if args.eval_student or args.eval else getattr(explicit, "from_file", ())
    refuse_flags_without_effect(args, set(explicit) | set(from_file), _rules_without_effect(args),
                                config_origins(args.config, explicit))
