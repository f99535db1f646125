"""Models and criterion from parsed command-line arguments (DETR's ``build``)."""
from typing import Callable, Optional

import timm
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models
from distillers import Distiller, NoDistillation, distiller_class
from distillers.teacher_cache import TeacherCache
from vkd.data.mixup import mixup_active
from vkd.errors import BadInput
from vkd.losses import feature_width
from vkd.teachers import create_teacher


def _model_or_bad_input(build_model: Callable[[], nn.Module]) -> nn.Module:
    try:
        return build_model()
    except BadInput:
        raise
    except ValueError as error:  # an architecture that cannot be built as asked
        raise BadInput(str(error)) from None


def build_student(args, nb_classes: int, teacher_dim: Optional[int] = None, projector: str = "orthogonal") -> nn.Module:
    return _model_or_bad_input(lambda: models.create_student(
        args.student_model, num_classes=nb_classes, img_size=args.input_size, teacher_dim=teacher_dim,
        projector=projector, orthogonal_map=args.orthogonal_map, projector_impl=args.projector_impl,
        eval_head=args.eval_head, drop_rate=args.drop, **_drop_path(args)))


def _drop_path(args) -> dict:
    # The DeiT students always take it (0 by default, as the original); not every timm architecture does.
    return {"drop_path_rate": args.drop_path} if args.drop_path or args.student_model in models.STUDENT_MODELS else {}


def build_teacher_to_train(args, nb_classes: int) -> nn.Module:
    kwargs = dict(num_classes=nb_classes, drop_rate=args.drop)
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


def build_teacher(args, nb_classes: int, method, log: Callable[[str], None] = print) -> nn.Module:
    """The frozen distillation teacher; its logits must cover the data set's classes when ``method`` reads them."""
    teacher = _model_or_bad_input(lambda: create_teacher(args.teacher, teacher_path=args.teacher_path,
                                                                channels_last=args.teacher_channels_last))
    checksum = f" (sha256 {teacher.weights['sha256']})" if "sha256" in teacher.weights else ""
    log(f"Teacher {args.teacher}: weights {teacher.weights['source']}{checksum}")
    if method.needs_teacher_logits(args) and teacher.num_classes != nb_classes:
        raise BadInput(f"teacher has {teacher.num_classes} classes, data set has {nb_classes}: train one with --train-teacher "
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


def build(args, nb_classes: int, log: Callable[[str], None] = print):
    """(model, criterion, postprocessors) for training: a student with its distiller (the criterion, which owns
    the frozen teacher), or, with ``--train-teacher``, the teacher with the task loss alone. Classification
    needs no postprocessors (None)."""
    base_criterion = build_base_criterion(args)
    if args.train_teacher:
        return build_teacher_to_train(args, nb_classes), NoDistillation(args, None, base_criterion), None
    method = distiller_class(args.distiller)
    teacher = build_teacher(args, nb_classes, method, log) if method.needs_teacher(args) else None
    projector = method.projector(args)
    student = build_student(args, nb_classes, teacher_dim=feature_width(teacher) if projector else None,
                            projector=projector or "orthogonal")
    check_student_fits(method, student, args)
    if projector == "orthogonal" and method.decays_projector(args) and args.weight_decay > 0:
        log("note: as in the original, the projector gets weight decay; with the Householder map this "
            "zeroes it after the first step. --no-projector-weight-decay keeps it an isometry (docs/differences.md)")
    cache = None
    if teacher is not None and args.teacher_cache:
        cache = TeacherCache(args.teacher_cache, teacher, identity=dict(
            architecture=args.teacher, input_size=args.input_size, channels_last=args.teacher_channels_last,
            amp=args.amp, compile=args.compile))
    criterion: Distiller = method(args, teacher, base_criterion, teacher_cache=cache, compile_backend=args.compile,
                                  log=log)
    return student, criterion, None

