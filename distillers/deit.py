"""DeiT's distillation through the distillation token (Touvron et al., ICML 2021), as its ``losses.py``
defines it: (1 - α) x the task loss on the cls head + α x the distillation loss on the dist head.

- hard: cross-entropy against the teacher's top class (DeiT⚗, the paper's Table 1 baseline);
- soft: KL(softmax(teacher / τ) || softmax(student / τ)) summed, times τ², divided by the number of logits
  (batch x classes: DeiT's normalisation, not the batch mean of ``kd``).
"""
from typing import Dict

import torch
import torch.nn.functional as F

from distillers.base import Distiller, Flag, StudentOutputs

DISTILLATION_ALPHA = Flag("--distillation-alpha", default=0.5, range=(0.0, 1.0, True, True),
                          help="DeiT's weight of the distillation loss; the task loss gets 1 - alpha (default: 0.5)")
DISTILLATION_TAU = Flag("--distillation-tau", default=1.0, range=(0.0, float("inf"), False, False),
                        help="DeiT's soft-distillation temperature (default: 1.0)")


class DeiTHard(Distiller):
    name = "deit-hard"
    summary = "(1 - α) x CE(cls head, labels) + α x CE(dist head, teacher's argmax)"
    source = "DeiT, Touvron et al., ICML 2021 (hard-label distillation, DeiT⚗)"
    loss_terms = ("ce", "deit")
    flags = (DISTILLATION_ALPHA,)
    needs_distillation_head = True

    def __init__(self, args, teacher, base_criterion, **kwargs):
        super().__init__(args, teacher, base_criterion, **kwargs)
        self.alpha = args.distillation_alpha

    @classmethod
    def trains_distillation_head(cls, args) -> bool:
        return True

    def distillation_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))

    def terms(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        _, teacher_logits = self.teacher_outputs(samples)
        return {"ce": (1 - self.alpha) * self.base_criterion(outputs.logits, targets),
                "deit": self.alpha * self.distillation_loss(outputs.dist_logits, teacher_logits)}


class DeiTSoft(DeiTHard):
    name = "deit-soft"
    summary = "(1 - α) x CE(cls head, labels) + α x τ² x KL(teacher / τ || dist head / τ), summed / (batch x classes)"
    source = "DeiT, Touvron et al., ICML 2021 (soft distillation)"
    flags = (DISTILLATION_ALPHA, DISTILLATION_TAU)

    def __init__(self, args, teacher, base_criterion, **kwargs):
        super().__init__(args, teacher, base_criterion, **kwargs)
        self.tau = args.distillation_tau

    def distillation_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        tau = self.tau
        divergence = F.kl_div(F.log_softmax(dist_logits.float() / tau, dim=1),
                              F.log_softmax(teacher_logits.float() / tau, dim=1), reduction="sum", log_target=True)
        return divergence * tau * tau / dist_logits.numel()
