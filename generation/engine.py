"""One BigGAN training iteration (BigGAN-PyTorch / KD-DLGAN ``train_fns``): ``num_d_steps`` discriminator
steps, then one generator step, then the generator's EMA.

- Toggle-grads: the generator is frozen during D steps and the discriminator during the G step; the
  projector is toggled with whichever network's optimizer owns it (with G, as the authors'
  ``G.projector``, the D-step term never reaches it and it keeps its initialisation).
- Each D step takes one real batch and a fresh fake batch drawn without gradient; DiffAugment is
  applied to the concatenated [fake, real] batch in the D steps and to the fake batch in the G step.
- Hinge loss; LeCam (Tseng et al., CVPR 2021) and the VkD term are added to the D loss.
- Several processes: gradients are averaged with one all_reduce before each optimizer step. DDP's
  reducer cannot be used, as toggle-grads changes which parameters need gradients between steps.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from generation.diffaug import diff_augment
from vkd.distributed import is_distributed, mean_over_ranks
from vkd.ema import ModelEMA


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


class LeCam:
    """LeCam regulariser: EMAs of the mean D outputs anchor the other side's predictions.

    reg = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(z)))^2). As in LeCam's code, the EMAs
    start at ``init`` and follow the current value exactly (decay 0) before ``start``, and the penalty
    applies only after ``start`` iterations.
    """

    def __init__(self, weight: float, decay: float = 0.9, start: int = 1000, init: float = 1000.0):
        self.weight, self.decay, self.start = weight, decay, start
        self.ema_real, self.ema_fake = init, init

    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor, iteration: int) -> None:
        decay = self.decay if iteration >= self.start else 0.0
        self.ema_real = decay * self.ema_real + (1 - decay) * float(real_logits.detach().mean())
        self.ema_fake = decay * self.ema_fake + (1 - decay) * float(fake_logits.detach().mean())

    def penalty(self, real_logits: torch.Tensor, fake_logits: torch.Tensor, iteration: int) -> torch.Tensor:
        if iteration <= self.start:
            return real_logits.new_zeros(())
        regulariser = (F.relu(real_logits - self.ema_fake).pow(2).mean()
                       + F.relu(self.ema_real - fake_logits).pow(2).mean())
        return self.weight * regulariser

    def state_dict(self) -> Dict[str, float]:
        return {"ema_real": self.ema_real, "ema_fake": self.ema_fake}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.ema_real, self.ema_fake = float(state["ema_real"]), float(state["ema_fake"])


def set_requires_grad(parameters: List[nn.Parameter], flag: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(flag)


def average_gradients(parameters: List[nn.Parameter]) -> None:
    """One all-reduce of all the gradients, flattened (one per parameter would pay each collective's latency
    hundreds of times a step)."""
    if not is_distributed():
        return
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    flat = mean_over_ranks(torch.cat([grad.reshape(-1) for grad in grads]))
    for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(averaged.view_as(grad))


@dataclass
class GanStep:
    """The networks, optimizers and loss options of one training iteration.

    ``g_parameters`` / ``d_parameters``: what each optimizer steps (and toggle-grads switches); the
    projector is in one of them, or in neither when it is frozen.
    """
    generator: nn.Module
    discriminator: nn.Module
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    g_parameters: List[nn.Parameter]
    d_parameters: List[nn.Parameter]
    ema: ModelEMA
    batch_size: int
    num_d_steps: int
    policy: Tuple[str, ...]
    vkd: Optional[nn.Module] = None
    lecam: Optional[LeCam] = None
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def _latent(self) -> Tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(self.batch_size, self.generator.dim_z, device=self.device)
        y = torch.randint(0, self.generator.num_classes, (self.batch_size,), device=self.device)
        return z, y

    def discriminator_step(self, real: torch.Tensor, real_labels: torch.Tensor, iteration: int) -> Dict[str, float]:
        self.d_optimizer.zero_grad(set_to_none=True)
        z, fake_labels = self._latent()
        with torch.no_grad():
            fake = self.generator(z, fake_labels)
        images = diff_augment(torch.cat([fake, real]), self.policy)
        logits, kd_features = self.discriminator(images, torch.cat([fake_labels, real_labels]))
        fake_logits, real_logits = logits[:len(fake)], logits[len(fake):]
        terms = {"d_adv": hinge_discriminator_loss(real_logits, fake_logits)}
        if self.lecam is not None:
            self.lecam.update(real_logits, fake_logits, iteration)
            terms["lecam"] = self.lecam.penalty(real_logits, fake_logits, iteration)
        if self.vkd is not None:
            terms.update(self.vkd(images, self.discriminator.projector(kd_features), len(fake)))
        loss = terms["d_adv"] + terms.get("lecam", 0.0) + terms.get("vkd", 0.0)  # vkd_real/_fake: unweighted, logged
        loss.backward()
        average_gradients(self.d_parameters)
        self.d_optimizer.step()
        terms["d_real"], terms["d_fake"] = real_logits.detach().mean(), fake_logits.detach().mean()
        return {name: float(value.detach()) for name, value in terms.items()}

    def generator_step(self) -> Dict[str, float]:
        self.g_optimizer.zero_grad(set_to_none=True)
        z, labels = self._latent()
        logits, _ = self.discriminator(diff_augment(self.generator(z, labels), self.policy), labels)
        loss = hinge_generator_loss(logits)
        loss.backward()
        average_gradients(self.g_parameters)
        self.g_optimizer.step()
        return {"g_adv": float(loss.detach())}

    def iteration(self, real_batches: Iterator, iteration: int) -> Dict[str, float]:
        """One training iteration; returns its loss terms (D terms averaged over the D steps)."""
        self.generator.train()
        self.discriminator.train()
        set_requires_grad(self.g_parameters, False)
        set_requires_grad(self.d_parameters, True)
        d_terms: Dict[str, float] = {}
        for _ in range(self.num_d_steps):
            real, labels = next(real_batches)
            for name, value in self.discriminator_step(real.to(self.device), labels.to(self.device), iteration).items():
                d_terms[name] = d_terms.get(name, 0.0) + value / self.num_d_steps
        set_requires_grad(self.d_parameters, False)
        set_requires_grad(self.g_parameters, True)
        g_terms = self.generator_step()
        self.ema.update(iteration)
        return {**d_terms, **g_terms}
