"""No distillation: the task loss alone (the undistilled baseline, and what --train-teacher trains with)."""
from typing import Dict

import torch

from distillers.base import Distiller, StudentOutputs


class NoDistillation(Distiller):
    name = "none"
    summary = "CE only: the undistilled baseline (what --train-teacher trains with too)"
    source = "—"
    loss_terms = ("ce",)

    @classmethod
    def needs_teacher(cls, args) -> bool:
        return False

    def terms(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"ce": self.base_criterion(outputs.logits, targets)}
