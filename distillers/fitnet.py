"""FitNets' hint loss on the pooled features (Romero et al., ICLR 2015; the shape of timm's
FeatureDistillationTask): cross-entropy + alpha x MSE(unconstrained bias-free linear projection of the student
feature, the raw teacher feature). The classic feature baseline that VkD's constrained projector is set against."""
from typing import Dict

import torch
import torch.nn.functional as F

from distillers.base import Distiller, StudentOutputs
from distillers.vkd import ALPHA


class FitNet(Distiller):
    name = "fitnet"
    summary = "CE + alpha x MSE(linear projection of the student feature, raw teacher feature)"
    source = "FitNets, Romero et al., ICLR 2015 (hint on the pooled features, as timm's FeatureDistillationTask)"
    loss_terms = ("ce", "fitnet")
    flags = (ALPHA,)

    def __init__(self, args, teacher, base_criterion, **kwargs):
        super().__init__(args, teacher, base_criterion, **kwargs)
        self.alpha = args.alpha

    @classmethod
    def needs_teacher_logits(cls, args) -> bool:
        return False

    @classmethod
    def projector(cls, args):
        return "linear"

    def terms(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        teacher_features, _ = self.teacher_outputs(samples)
        return {"ce": self.base_criterion(outputs.logits, targets),
                "fitnet": self.alpha * F.mse_loss(outputs.features.float(), teacher_features.float())}
