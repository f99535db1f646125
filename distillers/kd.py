"""Hinton et al.'s knowledge distillation: cross-entropy plus the KL divergence between temperature-softened
teacher and student logits (times T²), on the student's distillation head where it has one."""
from typing import Dict

import torch

from distillers.base import Distiller, StudentOutputs
from distillers.vkd import GAMMA, TEMPERATURE
from vkd.losses import logit_distillation_loss


class KD(Distiller):
    name = "kd"
    summary = "CE + gamma x T² x KL(softmax(teacher / T) || softmax(student / T)); no feature term"
    source = "Hinton, Vinyals, Dean, Distilling the Knowledge in a Neural Network, 2015"
    loss_terms = ("ce", "kd")
    flags = (GAMMA, TEMPERATURE)

    def __init__(self, args, teacher, base_criterion, **kwargs):
        super().__init__(args, teacher, base_criterion, **kwargs)
        self.gamma, self.temperature = args.gamma, args.temperature

    @classmethod
    def trains_distillation_head(cls, args) -> bool:
        return True

    def terms(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        _, teacher_logits = self.teacher_outputs(samples)
        return {"ce": self.base_criterion(outputs.logits, targets),
                "kd": self.gamma * logit_distillation_loss(outputs.dist_logits, teacher_logits, self.temperature)}
