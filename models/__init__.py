"""Students and teachers. ``import models`` registers this repository's DeiT students with timm (they live in the
installed package, ``vkd.models``).

A student is any timm architecture (``resnet18``, ``regnetx_002``, ``vit_tiny_patch16_224`` ...) or one of the
conv-stem DeiT students of the VkD recipe (``STUDENT_MODELS``); a teacher is any timm model.
"""
import difflib
import os
from typing import Optional

import timm
import torch
import torch.nn as nn

from vkd.checkpoints import file_sha256, load_state_dict_file, strict_load
from vkd.downloads import hub_offline_unless_reachable
from vkd.errors import BadInput
from vkd.losses import feature_width
from vkd.models import EVAL_HEADS, STUDENT_MODELS, DistilledVisionTransformer
from vkd.projector import OrthogonalProjector

PROJECTORS = ("orthogonal", "linear")
DEFAULT_PROJECTOR_IMPL = "fast"  # orthogonal_maps.FastOrthogonal: same function as torch's, much faster
MAX_SUGGESTIONS = 5  # close matches listed for an unknown model name
DISTILLED_STUDENTS = tuple(name for name in STUDENT_MODELS if name.endswith("_distilled"))


class StudentError(BadInput):
    """A student that cannot be built as asked: an unknown name, options its architecture does not take."""


def unknown_model_line(role: str, name: str) -> str:
    """One line for an architecture timm does not know, with the closest names it does."""
    closest = difflib.get_close_matches(name, timm.list_models(), n=MAX_SUGGESTIONS)
    suggestion = f"closest: {', '.join(closest)}" if closest else "e.g. regnety_160, resnet18"
    return f"unknown {role} model '{name}'; any name in timm.list_models() works ({suggestion})"


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
    """Build a student; with ``teacher_dim`` it carries ``student.projector`` (its feature width -> teacher_dim).

    ``projector='orthogonal'`` is VkD's; ``'linear'`` is the unconstrained one (an ablation, FitNets). ``eval_head``
    (EVAL_HEADS): what a distilled student's eval mode returns. ``kwargs``: timm's options (drop_rate ...).
    """
    if not is_student_name(name):
        raise StudentError(unknown_model_line("student", name))
    if eval_head not in EVAL_HEADS:
        raise StudentError(f"unknown eval head '{eval_head}'; choose from {', '.join(EVAL_HEADS)}")
    if name in DISTILLED_STUDENTS:
        student = timm.create_model(name, num_classes=num_classes, img_size=img_size, eval_head=eval_head, **kwargs)
    elif eval_head != "mean":
        raise StudentError(f"--eval-head {eval_head} needs a student with a distillation head "
                           f"({', '.join(DISTILLED_STUDENTS)}), got '{name}'")
    elif name in STUDENT_MODELS:
        student = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    else:
        student = _create_timm_student(name, num_classes, img_size, **kwargs)
    if teacher_dim is not None:
        student.projector = build_projector(projector, feature_width(student), teacher_dim, orthogonal_map,
                                            projector_impl)
    return student


def build_projector(kind: str, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None,
                    impl: str = DEFAULT_PROJECTOR_IMPL) -> nn.Module:
    if kind == "orthogonal":
        return OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl=impl)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    raise ValueError(f"unknown projector '{kind}'; choose from {', '.join(PROJECTORS)}")


class TeacherError(BadInput):
    """A teacher that cannot be built as asked: weights out of reach, or a classifier that does not fit."""


# timm resolves a bare architecture name to its default pretrained tag. For regnety_160 (timm 1.0) that is
# regnety_160.sw_in12k_ft_in1k, not the weights DeiT distilled from and VkD used.
DEFAULT_PRETRAINED_TAGS = {"regnety_160": "regnety_160.deit_in1k"}


def pretrained_name(name: str) -> str:
    """``name`` with the pretrained tag timm will download (``arch.tag``)."""
    return name if "." in name else DEFAULT_PRETRAINED_TAGS.get(name, name)


def _download_pretrained(name: str, **kwargs) -> nn.Module:
    tagged = pretrained_name(name)
    # Offline when the hub cannot be reached: cached weights are still used, and nothing waits on the network.
    with hub_offline_unless_reachable() as offline:
        try:
            return timm.create_model(tagged, pretrained=True, **kwargs)
        except Exception as error:  # no network and no cache, gated repository, unknown tag ...
            reason = ("the model hub cannot be reached and the weights are not cached" if offline
                      else type(error).__name__)
            raise TeacherError(f"could not download pretrained weights '{tagged}' ({reason}); pass --teacher-path "
                               f"FILE with local weights") from None


def classifier_weight_key(model: nn.Module) -> Optional[str]:
    """The state-dict key of ``model``'s classifier weight (``head.weight``, ``fc.weight``, ...), found through
    timm's ``get_classifier``; None for a model without one."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for module_name, module in model.named_modules():
        if module is classifier and isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{module_name}.weight"
    return None


def create_teacher(name: str, num_classes: Optional[int] = None, teacher_path: Optional[str] = None,
                   channels_last: bool = False, **kwargs) -> nn.Module:
    """A frozen timm teacher in eval mode, with ``teacher.weights`` saying where its weights came from.

    Weights from ``teacher_path`` (strict), else timm's pretrained weights (``pretrained_name``: DeiT's
    RegNetY-160 for ``regnety_160``). ``num_classes=None`` keeps the classifier of the weights (the
    file's or the pretrained one); a number builds that classifier, and a file with another class count
    is then a ``TeacherError``. ``channels_last`` stores the convolution weights channels-last: the same
    function, and convolutions then run in that (faster) layout; only the last bits of outputs differ.
    """
    if name.split(".")[0] not in timm.list_models():
        raise TeacherError(unknown_model_line("teacher", name))
    if teacher_path is None:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        teacher = _download_pretrained(name, **extra, **kwargs)
        teacher.weights = {"source": f"timm:{pretrained_name(name)}"}
    else:
        state_dict = load_state_dict_file(teacher_path, preferred_keys=("model", "state_dict"))
        # Built once with the class count asked for (a large teacher takes seconds to build); without one, again
        # with the file's if the default differs.
        extra = {} if num_classes is None else {"num_classes": num_classes}
        teacher = timm.create_model(name, pretrained=False, **extra, **kwargs)
        head_key = classifier_weight_key(teacher)
        file_classes = int(state_dict[head_key].shape[0]) if head_key in state_dict else None
        if num_classes is not None and file_classes is not None and file_classes != num_classes:
            raise TeacherError(f"teacher file {teacher_path} has {file_classes} classes, {num_classes} expected")
        if num_classes is None and file_classes is not None and file_classes != teacher.num_classes:
            teacher = timm.create_model(name, pretrained=False, num_classes=file_classes, **kwargs)
        strict_load(teacher, state_dict, teacher_path)
        teacher.weights = {"source": os.path.abspath(teacher_path), "sha256": file_sha256(teacher_path)}
    teacher.eval()
    teacher.requires_grad_(False)
    if channels_last:
        # Weights alone suffice: a convolution returns the memory format of its weight.
        teacher.to(memory_format=torch.channels_last)
    return teacher
