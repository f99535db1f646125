"""Models and criterion from parsed command-line arguments (DETR's ``build``)."""
from typing import Callable, Optional

import timm
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models
from distillers.teacher_cache import TeacherCache
from losses import VkDLoss
from vkd.data.mixup import mixup_active
from vkd.errors import BadInput


def _model_or_bad_input(build_model: Callable[[], nn.Module]) -> nn.Module:
    try:
        return build_model()
    except BadInput:
        raise
    except ValueError as error:  # an architecture that cannot be built as asked
        raise BadInput(str(error)) from None


def build_student(args, nb_classes: int, teacher_dim: Optional[int] = None) -> nn.Module:
    return _model_or_bad_input(lambda: models.create_student(
        args.student_model, num_classes=nb_classes, img_size=args.input_size, teacher_dim=teacher_dim,
        projector=args.projector, orthogonal_map=args.orthogonal_map, projector_impl=args.projector_impl,
        eval_head=args.eval_head, drop_rate=args.drop, drop_path_rate=args.drop_path))


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


def build_teacher(args, nb_classes: int, log: Callable[[str], None] = print) -> nn.Module:
    """The frozen distillation teacher; its logits must cover the data set's classes when gamma > 0."""
    teacher = _model_or_bad_input(lambda: models.create_teacher(args.teacher, teacher_path=args.teacher_path,
                                                           channels_last=args.teacher_channels_last))
    checksum = f" (sha256 {teacher.weights['sha256']})" if "sha256" in teacher.weights else ""
    log(f"Teacher {args.teacher}: weights {teacher.weights['source']}{checksum}")
    if args.gamma > 0 and teacher.num_classes != nb_classes:
        raise BadInput(f"teacher has {teacher.num_classes} classes, data set has {nb_classes}: train one with --train-teacher "
                       f"--teacher {args.teacher} --output_dir DIR and pass --teacher-path DIR/teacher.pth "
                       f"(or --gamma 0 to distil features only)")
    return teacher


def build_base_criterion(args) -> nn.Module:
    """CE on the cls head: BCE (DeiT III), soft-target CE under mixup (smoothing is in the targets), or
    label smoothing."""
    if args.bce_loss:
        return nn.BCEWithLogitsLoss()
    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def build(args, nb_classes: int, log: Callable[[str], None] = print):
    """(model, criterion, postprocessors) for training: a student with its distillation criterion (which
    owns the frozen teacher), or, with ``--train-teacher``, the teacher with plain CE. Classification
    needs no postprocessors (None)."""
    base_criterion = build_base_criterion(args)
    if args.train_teacher:
        return build_teacher_to_train(args, nb_classes), VkDLoss(None, base_criterion, alpha=0.0, gamma=0.0), None
    teacher = build_teacher(args, nb_classes, log) if args.alpha > 0 or args.gamma > 0 else None
    student = build_student(args, nb_classes, teacher_dim=teacher.num_features if args.alpha > 0 else None)
    if args.alpha > 0 and args.projector_weight_decay and args.weight_decay > 0 and args.projector == "orthogonal":
        log("note: as in the original, the projector gets weight decay; with the Householder map this "
            "zeroes it after the first step. --no-projector-weight-decay keeps it an isometry (README)")
    cache = None
    if teacher is not None and args.teacher_cache:
        cache = TeacherCache(args.teacher_cache, teacher, identity=dict(
            architecture=args.teacher, input_size=args.input_size, channels_last=args.teacher_channels_last,
            amp=args.amp, compile=args.compile))
    criterion = VkDLoss(teacher, base_criterion, alpha=args.alpha, gamma=args.gamma, temperature=args.temperature,
                        normalisation=args.normalisation, feature_loss=args.feature_loss, teacher_cache=cache,
                        compile_backend=args.compile, log=log)
    return student, criterion, None
