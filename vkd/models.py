"""DeiT students of the VkD classification recipe (co-advise's convolutional stem, as the original), registered
with timm on ``import vkd.models`` (``import vkd`` does not load this module).

The distilled variants replace the 16x16 patch embedding with co-advise's convolutional stem and use the mean
of the stem tokens as the distillation token (it is not a parameter). ``timm.create_model("deit_ti_distilled",
num_classes=..., img_size=...)`` builds one; timm's own ``deit_*_patch16_224`` names are left untouched. They are
built by timm's ``build_model_with_cfg``, so a folder written by ``timm.models.save_for_hf`` (``export.py
--format timm``) loads back with ``timm.create_model("local-dir:DIR", pretrained=True)`` after this import.
"""
from functools import partial
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

STEM_STRIDE = 16
# What a distilled student's eval mode returns: the mean of both heads' logits (DeiT's), or the cls head's.
EVAL_HEADS = ("mean", "cls")
DEIT_SIZES = {  # name -> (embed_dim, num_heads); all depth 12, mlp ratio 4
    "ti": (192, 3),
    "s": (384, 6),
    "b": (768, 12),
}


def _square_size(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(height, width) from an int or a pair (timm passes a folder's input size as a pair)."""
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


class ConvStem(nn.Module):
    """Three 3x3-ish convs (total stride 2) then an 8x8 stride-8 projection: stride 16 overall."""

    def __init__(self, embed_dim: int, width: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
        )
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=8, stride=8)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class DistilledVisionTransformer(VisionTransformer):
    """ViT with a conv stem, a learned cls token and a dist token equal to the mean stem token.

    Tokens are [cls, dist, patches] plus a learned position embedding. ``forward_features``
    returns ``(cls, dist, patch_tokens)`` after the final norm; train mode returns
    ``(cls_logits, dist_logits)`` (and the projected pooled patch feature when asked), eval mode
    the mean of the two heads' logits, or the cls head's alone with ``eval_head="cls"`` (for a student
    trained without logit distillation, whose dist head never learns).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, eval_head: str = "mean", **kwargs):
        height, width = _square_size(img_size)
        if height % STEM_STRIDE or width % STEM_STRIDE:
            raise ValueError(f"img_size must be a multiple of {STEM_STRIDE}, got {img_size}")
        if eval_head not in EVAL_HEADS:
            raise ValueError(f"unknown eval head '{eval_head}'; choose from {', '.join(EVAL_HEADS)}")
        super().__init__(img_size=(height, width), patch_size=STEM_STRIDE, class_token=True, **kwargs)
        del self.patch_embed
        self.img_size = height if height == width else (height, width)
        self.num_patches = (height // STEM_STRIDE) * (width // STEM_STRIDE)
        self.conv_embed = ConvStem(self.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 2, self.embed_dim))
        trunc_normal_(self.pos_embed, std=.02)
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes)
        trunc_normal_(self.head_dist.weight, std=.02)
        nn.init.zeros_(self.head_dist.bias)
        self.projector = None
        self.eval_head = eval_head  # one of EVAL_HEADS

    def forward_features(self, x: torch.Tensor):
        stem_tokens = self.conv_embed(x)
        if stem_tokens.shape[1] != self.num_patches:
            raise ValueError(f"input {tuple(x.shape[-2:])} gives {stem_tokens.shape[1]} tokens; "
                             f"this model was built for {self.num_patches} (img_size {self.img_size})")
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        dist_token = stem_tokens.mean(1, keepdim=True)
        tokens = torch.cat((cls_token, dist_token, stem_tokens), dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(self.pos_drop(tokens)))
        return tokens[:, 0], tokens[:, 1], tokens[:, 2:]

    def project(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """VkD's student feature: the projector applied to the mean patch token (cls/dist excluded)."""
        if self.projector is None:
            raise ValueError("this student has no projector: build it with teacher_dim=...")
        return self.projector(patch_tokens.mean(1))

    def forward(self, x: torch.Tensor, with_projection: bool = False):
        cls, dist, patch_tokens = self.forward_features(x)
        # timm's head dropout (--drop), on both heads; the original never applied it.
        cls_logits, dist_logits = self.head(self.head_drop(cls)), self.head_dist(self.head_drop(dist))
        if not self.training:
            return cls_logits if self.eval_head == "cls" else (cls_logits + dist_logits) / 2
        if with_projection:
            return cls_logits, dist_logits, self.project(patch_tokens)
        return cls_logits, dist_logits


def _cfg(first_conv: str, classifier: Union[str, Tuple[str, ...]]) -> dict:
    # No weight source: these students are trained here, and a trained one is loaded from a checkpoint or from
    # its timm folder. The preprocessing is the evaluation's at 224 px (a folder records its own).
    return dict(num_classes=1000, input_size=(3, 224, 224), fixed_input_size=True, interpolation="bicubic",
                crop_pct=DEFAULT_CROP_PCT, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv=first_conv, classifier=classifier, license="apache-2.0")


_CONV_STEM_CFG = _cfg("conv_embed.conv.0", ("head", "head_dist"))
_PATCH_CFG = _cfg("patch_embed.proj", "head")
# register_model reads this module's default_cfgs.
default_cfgs = generate_default_cfgs({
    "deit_ti_distilled": _CONV_STEM_CFG, "deit_s_distilled": _CONV_STEM_CFG, "deit_b_distilled": _CONV_STEM_CFG,
    "deit_ti": _PATCH_CFG, "deit_s": _PATCH_CFG, "deit_b": _PATCH_CFG,
})


def _deit_kwargs(size: str, **kwargs):
    embed_dim, num_heads = DEIT_SIZES[size]
    return dict(embed_dim=embed_dim, depth=12, num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def _build(model_class, variant: str, size: str, pretrained: bool, **kwargs) -> nn.Module:
    return build_model_with_cfg(model_class, variant, pretrained, **_deit_kwargs(size, **kwargs))


@register_model
def deit_ti_distilled(pretrained: bool = False, **kwargs):
    return _build(DistilledVisionTransformer, "deit_ti_distilled", "ti", pretrained, **kwargs)


@register_model
def deit_s_distilled(pretrained: bool = False, **kwargs):
    return _build(DistilledVisionTransformer, "deit_s_distilled", "s", pretrained, **kwargs)


@register_model
def deit_b_distilled(pretrained: bool = False, **kwargs):
    return _build(DistilledVisionTransformer, "deit_b_distilled", "b", pretrained, **kwargs)


@register_model
def deit_ti(pretrained: bool = False, **kwargs):
    return _build(partial(VisionTransformer, patch_size=16), "deit_ti", "ti", pretrained, **kwargs)


@register_model
def deit_s(pretrained: bool = False, **kwargs):
    return _build(partial(VisionTransformer, patch_size=16), "deit_s", "s", pretrained, **kwargs)


@register_model
def deit_b(pretrained: bool = False, **kwargs):
    return _build(partial(VisionTransformer, patch_size=16), "deit_b", "b", pretrained, **kwargs)


STUDENT_MODELS = ("deit_ti_distilled", "deit_s_distilled", "deit_b_distilled", "deit_ti", "deit_s", "deit_b")
