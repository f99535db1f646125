"""The student as the training loop calls it: one forward that gives a distiller what it reads
(``distillers.StudentOutputs``), for any timm student and for the DeiT distilled students alike."""
import torch
import torch.nn as nn

from distillers.base import StudentOutputs
from models import has_distillation_head


def student_outputs(student: nn.Module, images: torch.Tensor, with_features: bool) -> StudentOutputs:
    """``student``'s logits, its distillation head's logits (its only head's when it has one) and, with
    ``with_features``, ``student.projector`` applied to the feature its classifier reads."""
    if has_distillation_head(student):
        # Train mode: (cls, dist[, projected mean patch token]); eval mode (--no-train-mode): one logits tensor.
        outputs = student(images, with_projection=with_features)
        if isinstance(outputs, torch.Tensor):
            return StudentOutputs(outputs, outputs)
        return StudentOutputs(outputs[0], outputs[1], outputs[2] if with_features else None)
    if not with_features:
        logits = student(images)
        return StudentOutputs(logits, logits)
    feature_map = student.forward_features(images)
    logits = student.forward_head(feature_map)
    features = student.forward_head(feature_map, pre_logits=True)
    return StudentOutputs(logits, logits, student.projector(features))


class TrainingView(nn.Module):
    """The module DDP wraps for training: ``forward(images)`` is ``student_outputs``, so the projector and both
    heads run inside DDP's forward. Holds no weights of its own (checkpoints save ``student``)."""

    def __init__(self, student: nn.Module, with_features: bool):
        super().__init__()
        self.student, self.with_features = student, with_features

    def forward(self, images: torch.Tensor) -> StudentOutputs:
        return student_outputs(self.student, images, self.with_features)
