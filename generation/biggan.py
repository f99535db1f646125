"""Class-conditional BigGAN for 32x32 images (Brock et al. 2019), as configured for CIFAR by
BigGAN-PyTorch and KD-DLGAN.

Generator: z (dim_z) -> linear -> 4x4x(4 ch) -> three up-sampling residual blocks (4 -> 8 -> 16 -> 32)
with class-conditional batch norm (gain 1 + embed(y), bias embed(y), one embedding pair per norm;
no shared embedding, no hierarchical z) -> BN, ReLU, 3x3 conv to RGB, tanh.
Discriminator: four residual blocks of 4 ch channels (average-pool down-sampling in the first two),
ReLU, global *sum* pool to h; adversarial output = linear(h) + <embed(y), h> (projection
discriminator). The KD head of KD-DLGAN (two spectral-normalised linear layers, no nonlinearity
between) maps h to the features that are distilled.
Spectral norm on every convolution and linear layer of both networks; N(0, 0.02) initialisation.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

SN_EPS = 1e-6
INIT_STD = 0.02
BN_EPS = 1e-5
BOTTOM_WIDTH = 4
IMAGE_SIZE = 32
BLOCK_WIDTH = 4  # every block has 4 x ch channels at 32x32 (BigGAN's arch[32])
KD_HIDDEN = 1024  # KD-DLGAN's KD head: h -> 1024 -> feature width


def sn_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2), eps=SN_EPS)


def sn_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Linear(in_features, out_features, bias=bias), eps=SN_EPS)


def init_weights(module: nn.Module) -> None:
    """BigGAN's 'N02' initialisation: N(0, 0.02) for every conv, linear and embedding weight."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.Embedding)):
            weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
            nn.init.normal_(weight, 0.0, INIT_STD)


class ConditionalBatchNorm(nn.Module):
    """Batch norm without affine parameters, then a per-class gain (1 + embedding) and bias (embedding)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False, eps=BN_EPS)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(y)[:, :, None, None]
        return self.norm(x) * gain + self.bias(y)[:, :, None, None]


class GeneratorBlock(nn.Module):
    """CBN, ReLU, nearest x2, conv3x3, CBN, ReLU, conv3x3; shortcut: nearest x2, conv1x1."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int):
        super().__init__()
        self.bn1 = ConditionalBatchNorm(in_channels, num_classes)
        self.conv1 = sn_conv(in_channels, out_channels, 3)
        self.bn2 = ConditionalBatchNorm(out_channels, num_classes)
        self.conv2 = sn_conv(out_channels, out_channels, 3)
        self.shortcut = sn_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    def __init__(self, ch: int = 64, dim_z: int = 128, num_classes: int = 10):
        super().__init__()
        self.ch, self.dim_z, self.num_classes = ch, dim_z, num_classes
        width = BLOCK_WIDTH * ch
        self.linear = sn_linear(dim_z, width * BOTTOM_WIDTH ** 2)
        self.blocks = nn.ModuleList(GeneratorBlock(width, width, num_classes) for _ in range(3))
        self.output_bn = nn.BatchNorm2d(width, eps=BN_EPS)
        self.output_conv = sn_conv(width, 3, 3)
        init_weights(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(z.shape[0], -1, BOTTOM_WIDTH, BOTTOM_WIDTH)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.output_conv(F.relu(self.output_bn(h))))


class DiscriminatorBlock(nn.Module):
    """[ReLU], conv3x3, ReLU, conv3x3, [avg-pool 2]; shortcut conv1x1 when the shape changes.

    The first block takes the image and has no leading ReLU; its shortcut pools before the 1x1 conv,
    the others after it (BigGAN's ``preactivation`` rule).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, preactivation: bool):
        super().__init__()
        self.conv1 = sn_conv(in_channels, out_channels, 3)
        self.conv2 = sn_conv(out_channels, out_channels, 3)
        self.downsample, self.preactivation = downsample, preactivation
        self.shortcut = sn_conv(in_channels, out_channels, 1) if (in_channels != out_channels or downsample) else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        if self.shortcut is None:
            return h + x
        shortcut = self._pool(self.shortcut(x)) if self.preactivation else self.shortcut(self._pool(x))
        return h + shortcut


class Discriminator(nn.Module):
    """Projection discriminator; ``forward`` returns (adversarial logits [B], KD features [B, kd_dim] or None).

    ``kd_dim`` > 0 adds KD-DLGAN's KD head; ``projector`` (set by the VkD set-up) is VkD's orthogonal map
    from the KD features to the teacher's width. It lives here so the checkpoint and the optimizer that
    owns it see it like any other weight.
    """

    def __init__(self, ch: int = 64, num_classes: int = 10, kd_dim: int = 0):
        super().__init__()
        width = BLOCK_WIDTH * ch
        self.width = width
        self.blocks = nn.ModuleList([
            DiscriminatorBlock(3, width, downsample=True, preactivation=False),
            DiscriminatorBlock(width, width, downsample=True, preactivation=True),
            DiscriminatorBlock(width, width, downsample=False, preactivation=True),
            DiscriminatorBlock(width, width, downsample=False, preactivation=True),
        ])
        self.linear = sn_linear(width, 1)
        self.embed = spectral_norm(nn.Embedding(num_classes, width), eps=SN_EPS)
        self.kd_head = nn.Sequential(sn_linear(width, KD_HIDDEN), sn_linear(KD_HIDDEN, kd_dim)) if kd_dim > 0 else None
        self.projector: Optional[nn.Module] = None
        init_weights(self)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return F.relu(h).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = self.pooled(x)
        logits = self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
        return logits, (self.kd_head(h) if self.kd_head is not None else None)
