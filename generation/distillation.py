"""VkD's distillation term for GAN discriminators (paper section on data-limited image generation).

The discriminator's KD-head features of the images it judges (real and fake, after DiffAugment) go
through one orthogonal projector shared by real and fake, and are matched with smooth-L1 (the core's feature
term, ``vkd.losses.feature_distillation_loss``) to a frozen teacher's features of the same images, normalised
batch-wise (whitening by default):

    L_VkD = weight * ( rho(P s_real, N(t_real)) + rho(P s_fake, N(t_fake)) )

Like the classification criterion (``losses.VkDLoss``), it owns the frozen teacher and the normalisation
(``vkd.norms``); the projector lives on the discriminator (``D.projector``). The term is added to D's loss in the D steps, where
KD-DLGAN computes its own distillation terms.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn

from generation.teachers import FrozenImageNetwork
from vkd.losses import feature_distillation_loss

PAIRINGS = ("separate", "joint")


class GanVkDLoss(nn.Module):
    """Parameters:
        teacher: frozen network; ``teacher(images)[0]`` are the features distilled.
        normalisation: callable applied to a [B, D] batch of teacher features.
        weight: lambda.
        pairing: ``separate`` normalises the real and the fake teacher features on their own (two
            batch statistics); ``joint`` normalises the concatenated batch once.
    """

    def __init__(self, teacher: FrozenImageNetwork, normalisation: Callable, weight: float = 1.0,
                 pairing: str = "separate"):
        super().__init__()
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing '{pairing}'; choose from {', '.join(PAIRINGS)}")
        self.teacher, self.normalisation, self.weight, self.pairing = teacher, normalisation, weight, pairing

    def targets(self, images: torch.Tensor, num_fake: int):
        """Normalised teacher features of the fake rows [:num_fake] and the real rows [num_fake:]."""
        with torch.no_grad():
            features = self.teacher(images)[0].float()
        if self.pairing == "joint":
            normalised = self.normalisation(features)
            return normalised[:num_fake], normalised[num_fake:]
        return self.normalisation(features[:num_fake]), self.normalisation(features[num_fake:])

    def forward(self, images: torch.Tensor, projected_student: torch.Tensor, num_fake: int) -> Dict[str, torch.Tensor]:
        """``images``: the augmented D input (fake rows first); ``projected_student``: P applied to D's features."""
        fake_target, real_target = self.targets(images, num_fake)
        # The targets are normalised already, over the batch the pairing chooses.
        fake_term = feature_distillation_loss(projected_student[:num_fake], fake_target, normalisation="none")
        real_term = feature_distillation_loss(projected_student[num_fake:], real_target, normalisation="none")
        return {"vkd_fake": fake_term.detach(), "vkd_real": real_term.detach(),
                "vkd": self.weight * (fake_term + real_term)}
