"""One exponential moving average of a model's weights, for the classification student (momentum rising to
1.0 over the run, as the original) and the GAN generator (BigGAN's: a plain copy before a start iteration)."""
import copy
from typing import Callable, Optional

import torch
import torch.nn as nn


class ModelEMA:
    """``average <- decay * average + (1 - decay) * current`` after each step, ``decay = decay_at(step)``.

    ``average_model``, if given, is the module that holds the average (it starts as a copy of ``model``);
    otherwise a frozen deep copy on ``device`` is made. Buffers are copied (BN statistics, the projector's
    base) unless ``average_buffers``, which averages floating buffers too (BigGAN averages the whole state).
    """

    def __init__(self, model: nn.Module, decay_at: Callable[[int], float], device: Optional[torch.device] = None,
                 average_buffers: bool = False, average_model: Optional[nn.Module] = None):
        if average_model is None:
            average_model = copy.deepcopy(model).to(device).eval()
        else:
            average_model.load_state_dict(model.state_dict())
        self.model = average_model.requires_grad_(False)
        self.source, self.decay_at, self.average_buffers = model, decay_at, average_buffers

    @torch.no_grad()
    def update(self, step: int, model: Optional[nn.Module] = None) -> None:
        """Average in ``model`` (default: the model given at construction; a DDP wrapper is looked through)."""
        weight = 1.0 - self.decay_at(step)
        source = self.source if model is None else model
        source = getattr(source, "module", source)
        for average, current in zip(self.model.parameters(), source.parameters()):
            average.lerp_(current.detach().to(average.device), weight)
        for average, current in zip(self.model.buffers(), source.buffers()):
            if self.average_buffers and average.is_floating_point():
                average.lerp_(current.to(average.device), weight)
            else:
                average.copy_(current)


def linear_momentum(start: float, total_steps: int) -> Callable[[int], float]:
    """The student's decay: ``start`` at the first step, rising linearly to 1.0 at the last (0.996 -> 1.0)."""
    return lambda step: start + (1.0 - start) * step / total_steps


def after_start(decay: float, start: int) -> Callable[[int], float]:
    """BigGAN's decay for G: 0 (a plain copy) before iteration ``start``, then ``decay``."""
    return lambda step: decay if step >= start else 0.0
