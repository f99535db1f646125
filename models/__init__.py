"""Students and teachers. ``import models`` registers this repository's DeiT students with timm (they live in the
installed package, ``vkd.models``).

A student is any timm architecture (``resnet18``, ``regnetx_002``, ``vit_tiny_patch16_224`` ...) or one of the
conv-stem DeiT students of the VkD recipe (``STUDENT_MODELS``); a teacher is any timm model.
"""
from typing import Optional

import timm
import torch.nn as nn

from vkd.errors import BadInput
from vkd.losses import feature_width
from vkd.models import EVAL_HEADS, STUDENT_MODELS, DistilledVisionTransformer
from vkd.projector import OrthogonalProjector
from vkd.teachers import unknown_model_line

PROJECTORS = ("orthogonal", "linear")
DEFAULT_PROJECTOR_IMPL = "fast"  # orthogonal_maps.FastOrthogonal: same function as torch's, much faster
DISTILLED_STUDENTS = tuple(name for name in STUDENT_MODELS if name.endswith("_distilled"))


class StudentError(BadInput):
    """A student that cannot be built as asked: an unknown name, options its architecture does not take."""


def is_student_name(name: str) -> bool:
    """An architecture name (no pretrained tag: a student is trained here, never downloaded)."""
    return "." not in name and timm.is_model(name)


def has_distillation_head(student: nn.Module) -> bool:
    """Whether the student has a second (distillation) head, as DeiT's distilled students do."""
    return isinstance(student, DistilledVisionTransformer)


def _create_timm_student(name: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    """A timm architecture from scratch; ``img_size`` goes to the architectures that take it (ViTs)."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise StudentError(f"student '{name}' does not take these options: {error}") from None
    try:  # a convolutional network: any input size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise StudentError(f"student '{name}' does not take these options: {error}") from None


def create_student(name: str, num_classes: int = 1000, img_size: int = 224, teacher_dim: Optional[int] = None,
                   projector: str = "orthogonal", orthogonal_map: Optional[str] = None,
                   projector_impl: str = DEFAULT_PROJECTOR_IMPL, eval_head: str = "mean", **kwargs) -> nn.Module:
    """Build a student, the one place a student is made from its name; with ``teacher_dim`` it carries
    ``student.projector`` (its feature width -> teacher_dim). Anything that cannot be built as asked is a
    ``StudentError`` (one line, exit code 2).

    ``projector='orthogonal'`` is VkD's; ``'linear'`` is the unconstrained one (an ablation, FitNets). ``eval_head``
    (EVAL_HEADS): what a distilled student's eval mode returns. ``kwargs``: timm's options (drop_rate ...).
    """
    if not is_student_name(name):
        raise StudentError(unknown_model_line("student", name))
    if eval_head not in EVAL_HEADS:
        raise StudentError(f"unknown eval head '{eval_head}'; choose from {', '.join(EVAL_HEADS)}")
    if img_size < 1:
        raise StudentError(f"the input size must be positive, got {img_size}")
    try:
        student = _create_named_student(name, num_classes, img_size, eval_head, **kwargs)
    except StudentError:
        raise
    except ValueError as error:  # an input size the DeiT stem cannot take, ...
        raise StudentError(str(error)) from None
    if teacher_dim is not None:
        student.projector = build_projector(projector, feature_width(student), teacher_dim, orthogonal_map,
                                            projector_impl)
    return student


def _create_named_student(name: str, num_classes: int, img_size: int, eval_head: str, **kwargs) -> nn.Module:
    if name in DISTILLED_STUDENTS:
        return timm.create_model(name, num_classes=num_classes, img_size=img_size, eval_head=eval_head, **kwargs)
    if eval_head != "mean":
        raise StudentError(f"--eval-head {eval_head} needs a student with a distillation head "
                           f"({', '.join(DISTILLED_STUDENTS)}), got '{name}'")
    if name in STUDENT_MODELS:
        return timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    return _create_timm_student(name, num_classes, img_size, **kwargs)


def build_projector(kind: str, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None,
                    impl: str = DEFAULT_PROJECTOR_IMPL) -> nn.Module:
    if kind == "orthogonal":
        return OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl=impl)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    raise ValueError(f"unknown projector '{kind}'; choose from {', '.join(PROJECTORS)}")

