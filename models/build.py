"""Models and criterion from parsed command-line arguments (DETR's ``build``), and the flags that choose them."""
import argparse
from typing import Callable, Optional

import timm
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import distillers
import models
from distillers import Distiller, NoDistillation, distiller_class
from distillers.teacher_cache import TeacherCache
from vkd.data.mixup import mixup_active
from vkd.errors import BadInput
from vkd.losses import feature_width
from vkd.teachers import create_teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The student, its EMA, the teacher (distilled from, or trained) and the task loss."""
    student = parser.add_argument_group("student")
    student.add_argument("--student-model", default="deit_ti_distilled", type=str, metavar="MODEL",
                         help=f"student: any timm architecture (resnet18, regnetx_002, ...) or one of this repository's "
                              f"conv-stem DeiT students ({', '.join(models.STUDENT_MODELS)}); default: "
                              f"deit_ti_distilled")
    student.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    student.add_argument("--drop-path", type=float, default=0.0, metavar="PCT",
                         help="drop path rate (default: 0, what the original trained with)")
    student.add_argument("--student-ema", action="store_true", default=False, help="keep an EMA of the student")
    student.add_argument("--no-student-ema", action="store_false", dest="student_ema")
    student.add_argument("--student-ema-decay", type=float, default=0.996,
                         help="EMA momentum at the first iteration, rising linearly to 1.0 at the last (default: 0.996)")
    student.add_argument("--student-ema-force-cpu", action="store_true", default=False, help="keep the EMA on the CPU")
    student.add_argument("--eval-head", default="mean", choices=models.EVAL_HEADS,
                         help="a distilled student's evaluation logits: the mean of the cls and dist heads (DeiT's), "
                              "or the cls head alone, for students trained without logit distillation, whose dist "
                              "head never learns (default: mean)")
    student.add_argument("--bce-loss", action="store_true", help="binary cross-entropy on binarised targets (DeiT III)")
    student.add_argument("--train-mode", action="store_true", help="model in train mode while training (default)")
    student.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    student.set_defaults(train_mode=True)
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--teacher", default="regnety_160", type=str, metavar="MODEL",
                         help="timm teacher, optionally with a pretrained tag (default: regnety_160, whose pretrained "
                              "weights are DeiT's regnety_160.deit_in1k); evaluation never builds it")
    teacher.add_argument("--teacher-path", type=str, default=None,
                         help="local teacher weights (strict); without it timm's pretrained weights are downloaded")
    teacher.add_argument("--teacher-channels-last", action="store_true",
                         help="run the frozen teacher's convolutions channels-last (default; faster, same function)")
    teacher.add_argument("--no-teacher-channels-last", action="store_false", dest="teacher_channels_last")
    teacher.set_defaults(teacher_channels_last=True)
    teacher.add_argument("--teacher-cache", default=None, metavar="DIR",
                         help="keep the teacher's outputs of each input batch in DIR and read them back when the same "
                              "teacher sees the same batch again: the rows of an ablation (same seed and data) run "
                              "it once; processes and runs may share DIR (default: off)")
    teacher.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                         help="torch.compile the frozen teacher's forward (timm's --torchcompile) with BACKEND "
                              "(default: inductor); the first batch compiles, and its time is printed (default: off)")
    teacher.add_argument("--train-teacher", action="store_true",
                         help="train the timm model --teacher on the data with plain CE (+ mixup) and save "
                              "output_dir/teacher.pth, the file --teacher-path reads")
    teacher.add_argument("--teacher-pretrained", action="store_true",
                         help="with --train-teacher: start from timm's pretrained weights (downloads)")


VALUE_RANGES = {"drop": (0.0, 1.0, True, False), "drop_path": (0.0, 1.0, True, False),
                "student_ema_decay": (0.0, 1.0, True, True)}
TEACHER_RUN_FLAGS = {"teacher_cache", "compile"}


def distillation_flags() -> set:
    """What --train-teacher ignores: the method, its teacher's settings and every method's flags."""
    return {"distiller", "teacher_path", "teacher_channels_last", *TEACHER_RUN_FLAGS,
            *(flag.dest for flag in distillers.all_flags())}


# (applies when, flags that then have no effect, why); ``flags`` may be a function (a registered method counts).
NO_EFFECT = (
    (lambda a: a.train_teacher, distillation_flags, "--train-teacher trains with plain cross-entropy"),
    (lambda a: a.train_teacher, {"student_model", "student_ckpt", "eval_head"},
     "--train-teacher trains the --teacher model"),
    (lambda a: not a.train_teacher, {"teacher_pretrained"},
     "it applies to --train-teacher; a distillation teacher comes from --teacher-path or timm"),
    (lambda a: not a.student_ema, {"student_ema_decay", "student_ema_force_cpu"}, "they apply with --student-ema"),
)


def _model_or_bad_input(build_model: Callable[[], nn.Module]) -> nn.Module:
    try:
        return build_model()
    except BadInput:
        raise
    except ValueError as error:  # an architecture that cannot be built as asked
        raise BadInput(str(error)) from None


def build_student(args, num_classes: int, teacher_dim: Optional[int] = None, projector: str = "orthogonal",
                  eval_head: Optional[str] = None) -> nn.Module:
    """The student of ``args`` (``eval_head``: another evaluation head than ``--eval-head``)."""
    return models.create_student(
        args.student_model, num_classes=num_classes, img_size=args.input_size, teacher_dim=teacher_dim,
        projector=projector, orthogonal_map=args.orthogonal_map, projector_impl=args.projector_impl,
        eval_head=eval_head or args.eval_head, drop_rate=args.drop, **_drop_path(args))


def _drop_path(args) -> dict:
    # The DeiT students always take it (0 by default, as the original); not every timm architecture does.
    return {"drop_path_rate": args.drop_path} if args.drop_path or args.student_model in models.STUDENT_MODELS else {}


def build_teacher_to_train(args, num_classes: int) -> nn.Module:
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop)
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    try:
        return timm.create_model(args.teacher, pretrained=args.teacher_pretrained, **kwargs)
    except TypeError as error:
        raise BadInput(f"teacher '{args.teacher}' does not take these options: {error}") from None
    except Exception as error:  # pretrained download without network, gated hub repository ...
        if not args.teacher_pretrained:
            raise
        raise BadInput(f"could not download pretrained weights for '{args.teacher}' ({type(error).__name__}); "
                       f"drop --teacher-pretrained to train from scratch") from None


def build_teacher(args, num_classes: int, method, log: Callable[[str], None] = print) -> nn.Module:
    """The frozen distillation teacher; its logits must cover the data set's classes when ``method`` reads them."""
    teacher = _model_or_bad_input(lambda: create_teacher(args.teacher, teacher_path=args.teacher_path,
                                                                channels_last=args.teacher_channels_last))
    checksum = f" (sha256 {teacher.weights['sha256']})" if "sha256" in teacher.weights else ""
    log(f"Teacher {args.teacher}: weights {teacher.weights['source']}{checksum}")
    if method.needs_teacher_logits(args) and teacher.num_classes != num_classes:
        raise BadInput(f"teacher has {teacher.num_classes} classes, data set has {num_classes}: train one with --train-teacher "
                       f"--teacher {args.teacher} --output_dir DIR and pass --teacher-path DIR/teacher.pth "
                       f"(or distil features only: --gamma 0 with --distiller vkd, or --distiller fitnet)")
    return teacher


def build_base_criterion(args) -> nn.Module:
    """The task loss on the student's (cls) head: BCE (DeiT III), soft-target CE under mixup (smoothing is in the
    targets), or label smoothing."""
    if args.bce_loss:
        return nn.BCEWithLogitsLoss()
    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def check_student_fits(method, student: nn.Module, args) -> None:
    if method.needs_distillation_head and not models.has_distillation_head(student):
        with_head = ", ".join(name for name in models.STUDENT_MODELS if name.endswith("_distilled"))
        raise BadInput(f"--distiller {method.name} trains a distillation head, which '{args.student_model}' lacks: "
                       f"choose a student with one ({with_head})")


def build(args, num_classes: int, amp: str = "none", log: Callable[[str], None] = print):
    """(model, criterion, postprocessors) for training: a student with its distiller (the criterion, which owns
    the frozen teacher), or, with ``--train-teacher``, the teacher with the task loss alone. Classification
    needs no postprocessors (None). ``amp``: the mixed precision the run computes in (the teacher cache's key)."""
    base_criterion = build_base_criterion(args)
    if args.train_teacher:
        return build_teacher_to_train(args, num_classes), NoDistillation(args, None, base_criterion), None
    method = distiller_class(args.distiller)
    teacher = build_teacher(args, num_classes, method, log) if method.needs_teacher(args) else None
    projector = method.projector(args)
    student = build_student(args, num_classes, teacher_dim=feature_width(teacher) if projector else None,
                            projector=projector or "orthogonal")
    check_student_fits(method, student, args)
    if projector == "orthogonal" and method.decays_projector(args) and args.weight_decay > 0:
        log("note: as in the original, the projector gets weight decay; with the Householder map this "
            "zeroes it after the first step. --no-projector-weight-decay keeps it an isometry (docs/differences.md)")
    cache = None
    if teacher is not None and args.teacher_cache:
        cache = TeacherCache(args.teacher_cache, teacher, identity=dict(
            architecture=args.teacher, input_size=args.input_size, channels_last=args.teacher_channels_last,
            amp=amp, compile=args.compile))
    criterion: Distiller = method(args, teacher, base_criterion, teacher_cache=cache, compile_backend=args.compile,
                                  log=log)
    return student, criterion, None

