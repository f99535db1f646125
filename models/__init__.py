"""Students and teachers. ``import models`` registers the DeiT students with timm."""
from typing import Optional

import timm
import torch
import torch.nn as nn

from losses import OrthogonalProjector
from models.deit import STUDENT_MODELS, DistilledVisionTransformer

PROJECTORS = ("orthogonal", "linear")
DEFAULT_PROJECTOR_IMPL = "fast"  # orthogonal_maps.FastOrthogonal: same function as torch's, much faster


def create_student(name: str, num_classes: int = 1000, img_size: int = 224, teacher_dim: Optional[int] = None,
                   projector: str = "orthogonal", orthogonal_map: Optional[str] = None,
                   projector_impl: str = DEFAULT_PROJECTOR_IMPL, **kwargs) -> nn.Module:
    """Build a student; with ``teacher_dim`` it carries ``student.projector`` (embed_dim -> teacher_dim).

    ``projector='orthogonal'`` is VkD's; ``'linear'`` is the unconstrained ablation.
    """
    if name not in STUDENT_MODELS:
        raise ValueError(f"unknown student model '{name}'; choose from {', '.join(STUDENT_MODELS)}")
    student = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    if teacher_dim is not None:
        if not isinstance(student, DistilledVisionTransformer):
            raise ValueError(f"feature distillation needs a distilled student (…_distilled), got '{name}'")
        student.projector = build_projector(projector, student.embed_dim, teacher_dim, orthogonal_map, projector_impl)
    return student


def build_projector(kind: str, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None,
                    impl: str = DEFAULT_PROJECTOR_IMPL) -> nn.Module:
    if kind == "orthogonal":
        return OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl=impl)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    raise ValueError(f"unknown projector '{kind}'; choose from {', '.join(PROJECTORS)}")


def create_teacher(name: str, num_classes: int = 1000, teacher_path: Optional[str] = None,
                   channels_last: bool = False, **kwargs) -> nn.Module:
    """A timm teacher: weights from ``teacher_path`` (strict), else timm's pretrained weights (network).

    Returned frozen and in eval mode. ``channels_last`` stores its convolution weights channels-last:
    the same function, and convolutions then run in that (faster) layout; only the last bits of the
    outputs can differ.
    """
    from utils import load_state_dict_file, strict_load  # utils imports models lazily too
    if name not in timm.list_models():
        raise ValueError(f"unknown teacher model '{name}'; any timm model name works (e.g. regnety_160, resnet18)")
    if teacher_path is None:
        try:
            teacher = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as error:  # no network, no hub cache, gated repo ...
            raise SystemExit(f"error: could not download pretrained weights for teacher '{name}' "
                             f"({type(error).__name__}); pass --teacher-path FILE with local weights") from None
    else:
        teacher = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        strict_load(teacher, load_state_dict_file(teacher_path, preferred_keys=("model", "state_dict")), teacher_path)
    teacher.eval()
    teacher.requires_grad_(False)
    if channels_last:
        # Weights alone suffice: a convolution returns the memory format of its weight.
        teacher.to(memory_format=torch.channels_last)
    return teacher
