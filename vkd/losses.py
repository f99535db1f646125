"""VkD's two distillation terms: the feature term (projected student vs normalised teacher) and the
logit term (KL on temperature-softened logits), and the (pooled features, logits) of a timm model."""
from typing import Callable, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vkd.norms import get_normalisation

__all__ = ["FEATURE_LOSSES", "get_feature_loss", "feature_distillation_loss", "logit_distillation_loss",
           "features_and_logits", "feature_width"]

FEATURE_LOSSES = {
    "smooth_l1": F.smooth_l1_loss,
    "mse": F.mse_loss,
}


def get_feature_loss(name: str):
    if name not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss '{name}'; choose from {sorted(FEATURE_LOSSES)}")
    return FEATURE_LOSSES[name]


def feature_distillation_loss(projected_student: torch.Tensor, teacher: torch.Tensor,
                              normalisation: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "layernorm",
                              loss: str = "smooth_l1", normalise_student: bool = False) -> torch.Tensor:
    """VkD's feature term, for the three trees: distance between the projected student and the normalised
    (detached) teacher, in fp32.

    ``normalisation``: a name of ``vkd.norms.NORMALISATIONS``, or the function itself (``build_normalisation``'s
    whitening with its own eps). ``normalise_student``: the student is normalised the same way (detection
    standardises both sides, as the original).
    """
    distance = get_feature_loss(loss)
    normalise = normalisation if callable(normalisation) else get_normalisation(normalisation)
    target = normalise(teacher.detach().float())
    student = projected_student.float()
    return distance(normalise(student) if normalise_student else student, target)


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, batch mean, times T^2 (Hinton et al.)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature ** 2


def features_and_logits(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled features [B, D], logits [B, classes]) of a timm model in one forward: the features are what
    its classifier reads (for RegNetY-160 the spatial mean, for a ViT the class token)."""
    features = model.forward_features(images)
    pooled = model.forward_head(features, pre_logits=True)
    return pooled, model.forward_head(features)



def feature_width(model: nn.Module) -> int:
    """The width of ``features_and_logits``'s features: timm's ``head_hidden_size`` where the head widens the
    pooled features before the classifier (MobileNetV3: 576 -> 1024), else ``num_features``."""
    return getattr(model, "head_hidden_size", None) or model.num_features
