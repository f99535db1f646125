"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020).

Differentiable, per-sample random augmentations applied to every image the discriminator sees, real
and fake, in both the D and the G steps, so that gradients reach the generator through them.
Policies (comma-separated): ``translation`` (shift by up to 1/8 of the image, zero padding),
``cutout`` (zero a square of half the image side), ``color`` (brightness, saturation, contrast).
"""
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by integers in [-s, s] (s = round(ratio * size)) per axis; vacated pixels are 0."""
    batch, _, height, width = x.shape
    shift_y, shift_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-shift_y, shift_y + 1, (batch, 1, 1), device=x.device)
    dx = torch.randint(-shift_x, shift_x + 1, (batch, 1, 1), device=x.device)
    rows = torch.arange(height, device=x.device)[None, :, None] - dy + shift_y   # [B, H, 1] in padded coords
    cols = torch.arange(width, device=x.device)[None, None, :] - dx + shift_x    # [B, 1, W]
    padded = F.pad(x, (shift_x, shift_x, shift_y, shift_y))
    batch_index = torch.arange(batch, device=x.device)[:, None, None]
    # Advanced indexing over (batch, row, col) with the channel axis kept: [B, H, W, C] -> [B, C, H, W].
    return padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero one square of side round(ratio * size) per image, centred anywhere (clipped at the border)."""
    batch, _, height, width = x.shape
    size_y, size_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    centre_y = torch.randint(0, height + (1 - size_y % 2), (batch, 1, 1), device=x.device)
    centre_x = torch.randint(0, width + (1 - size_x % 2), (batch, 1, 1), device=x.device)
    rows = torch.arange(height, device=x.device)[None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, :]
    inside = ((rows >= centre_y - size_y // 2) & (rows < centre_y - size_y // 2 + size_y)
              & (cols >= centre_x - size_x // 2) & (cols < centre_x - size_x // 2 + size_x))
    return x * (~inside).unsqueeze(1).to(x.dtype)


POLICIES: Dict[str, Sequence[Callable[[torch.Tensor], torch.Tensor]]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}


def parse_policy(policy: str) -> Sequence[str]:
    """The policy names of ``'translation,cutout'``; '' or 'none' is no augmentation."""
    names = [name.strip() for name in policy.split(",") if name.strip() and name.strip() != "none"]
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    return names


def diff_augment(x: torch.Tensor, policy: Sequence[str]) -> torch.Tensor:
    """Apply the policies in order (DiffAugment applies color first, then translation, then cutout)."""
    for name in policy:
        for transform in POLICIES[name]:
            x = transform(x)
    return x.contiguous()
