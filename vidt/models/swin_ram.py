"""Swin Transformer with ViDT's Reconfigured Attention Module (RAM), as in NAVER's ViDT.

[PATCH] tokens use ordinary (shifted) window attention; 100 [DET] tokens ride along through every
block with the same weights: [DET x DET] global attention in every stage and, in the cross stages
(default: the last), [DET x PATCH] cross-attention over all patch tokens with a masked sine
embedding. The module names and shapes follow the original so released checkpoints load strictly.
"""
import math
import os
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from vidt.util.checkpoint import load_checkpoint
from vidt.util.nested_tensor import resize_mask
from vkd.errors import CheckpointError

WINDOW_SIZE = 7
MASKED_LOGIT = -100.0  # Swin's additive value for forbidden attention pairs

SWIN_VARIANTS = {
    "swin_nano": dict(embed_dim=48, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.0,
                      imagenet_file="swin_nano_patch4_window7_224.pth"),
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2,
                      imagenet_file="swin_tiny_patch4_window7_224.pth"),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3,
                       imagenet_file="swin_small_patch4_window7_224.pth"),
    "swin_base_win7_22k": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                               drop_path_rate=0.3, imagenet_file="swin_base_patch4_window7_224_22k.pth"),
}
IMAGENET_DIR = os.path.join("ckpts", "backbones")


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B,H,W,C] (H, W multiples of window) -> [B*nW, window*window, C]."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """[B*nW, window*window, C] -> [B,H,W,C]."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shifted_window_mask(Hp: int, Wp: int, window: int, shift: int, device) -> torch.Tensor:
    """Swin's additive mask [nW, w*w, w*w] that keeps rolled-in regions from attending to each other."""
    region = torch.zeros((1, Hp, Wp, 1), device=device)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in slices:
        for cols in slices:
            region[:, rows, cols, :] = label
            label += 1
    region_windows = window_partition(region, window).squeeze(-1)
    differs = region_windows[:, None, :] != region_windows[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, MASKED_LOGIT)


def masked_sine_embedding(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine embedding over the un-padded area of a [B,H,W] mask -> [B,H,W,dim] (y half, then x)."""
    not_mask = (~mask).float()
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * (2 * math.pi)
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * (2 * math.pi)
    num_feats = dim // 2
    pair_index = torch.div(torch.arange(num_feats, device=mask.device), 2, rounding_mode="floor")
    dim_t = temperature ** (2 * pair_index / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RAMAttention(nn.Module):
    """One qkv/proj pair shared by [PATCH x PATCH] window attention and the [DET] attentions."""

    def __init__(self, dim: int, num_heads: int, window: int = WINDOW_SIZE):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _heads(self, tokens: torch.Tensor):
        """[B,N,C] -> scaled q, k, v, each [B,heads,N,C/heads]."""
        B, N, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q * self.scale, k, v

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)

    def _relative_position_bias(self) -> torch.Tensor:
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, det: torch.Tensor, shift_mask: Optional[torch.Tensor],
                cross_patch: Optional[torch.Tensor] = None, cross_bias: Optional[torch.Tensor] = None):
        """windows [B*nW, w*w, C]; det [B,N,C]; shift_mask [nW, w*w, w*w] or None;
        cross_patch [B,H*W,C] and cross_bias [B,H*W] (additive padding mask) in a cross stage."""
        q, k, v = self._heads(windows)
        logits = q @ k.transpose(-2, -1) + self._relative_position_bias()
        if shift_mask is not None:
            num_windows = shift_mask.shape[0]
            logits = logits.view(-1, num_windows, *logits.shape[1:]) + shift_mask[None, :, None]
            logits = logits.flatten(0, 1)
        patch_out = self._merge_heads(logits.softmax(-1) @ v)

        q_det, k_det, v_det = self._heads(det)
        if cross_patch is not None:
            # [DET x PATCH]: det queries see every (un-windowed) patch key, padding pushed to -100.
            # The patch queries of this projection are unused, as in the original.
            _, k_patch, v_patch = self._heads(cross_patch)
            k_det = torch.cat([k_patch, k_det], dim=2)
            v_det = torch.cat([v_patch, v_det], dim=2)
        det_logits = q_det @ k_det.transpose(-2, -1)
        if cross_bias is not None:
            det_bias = torch.cat([cross_bias, cross_bias.new_zeros(det.shape[:2])], dim=1)
            det_logits = det_logits + det_bias[:, None, None, :]
        det_out = self._merge_heads(det_logits.softmax(-1) @ v_det)
        return self.proj(patch_out), self.proj(det_out)


class RAMBlock(nn.Module):
    """A Swin block whose input is [patch tokens (H*W), det tokens (N)]."""

    def __init__(self, dim: int, num_heads: int, shifted: bool, drop_path: float, det_pos_dim: int):
        super().__init__()
        self.shift = WINDOW_SIZE // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RAMAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.det_pos_linear = nn.Linear(det_pos_dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int, det_pos_embed: torch.Tensor, shift_mask: torch.Tensor,
                cross_pos: Optional[torch.Tensor] = None, cross_bias: Optional[torch.Tensor] = None):
        B, _, C = x.shape
        shortcut = x
        x = self.norm1(x)
        patch, det = x[:, :H * W], x[:, H * W:]
        cross_patch = None if cross_pos is None else patch + cross_pos.flatten(1, 2)
        det = det + self.det_pos_linear(det_pos_embed)

        pad_b, pad_r = (-H) % WINDOW_SIZE, (-W) % WINDOW_SIZE
        patch = F.pad(patch.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
        if self.shift:
            patch = torch.roll(patch, shifts=(-self.shift, -self.shift), dims=(1, 2))
        patch_out, det_out = self.attn(window_partition(patch, WINDOW_SIZE), det,
                                       shift_mask if self.shift else None, cross_patch, cross_bias)
        patch = window_reverse(patch_out, WINDOW_SIZE, H + pad_b, W + pad_r)
        if self.shift:
            patch = torch.roll(patch, shifts=(self.shift, self.shift), dims=(1, 2))
        patch = patch[:, :H, :W].reshape(B, H * W, C)

        x = shortcut + self.drop_path(torch.cat([patch, det_out], dim=1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 patch merging; det tokens are tiled 4x along channels and share the norm and reduction."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)
        # Unused by the forward pass; kept because released checkpoints contain them.
        self.expansion = nn.Linear(dim, out_dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int):
        B, _, C = x.shape
        patch, det = x[:, :H * W].view(B, H, W, C), x[:, H * W:]
        patch = F.pad(patch, (0, 0, 0, W % 2, 0, H % 2))
        patch = torch.cat([patch[:, 0::2, 0::2], patch[:, 1::2, 0::2], patch[:, 0::2, 1::2], patch[:, 1::2, 1::2]], -1)
        x = torch.cat([patch.flatten(1, 2), det.repeat(1, 1, 4)], dim=1)
        return self.reduction(self.norm(x)), (H + 1) // 2, (W + 1) // 2


class RAMStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, drop_paths: Sequence[float],
                 det_pos_dim: int, cross: bool):
        super().__init__()
        self.cross = cross
        self.blocks = nn.ModuleList([RAMBlock(dim, num_heads, shifted=i % 2 == 1, drop_path=drop_paths[i],
                                              det_pos_dim=det_pos_dim) for i in range(depth)])
        self.downsample = PatchMerging(dim, out_dim)

    def forward(self, x: torch.Tensor, H: int, W: int, det_pos_embed: torch.Tensor, mask: torch.Tensor):
        """Returns the block output (before merging) and the merged tokens with their resolution."""
        Hp, Wp = H + (-H) % WINDOW_SIZE, W + (-W) % WINDOW_SIZE
        shift_mask = shifted_window_mask(Hp, Wp, WINDOW_SIZE, WINDOW_SIZE // 2, x.device).to(x.dtype)
        cross_pos = cross_bias = None
        if self.cross:
            if mask.shape[-2:] != (H, W):
                mask = resize_mask(mask, (H, W))
            cross_pos = masked_sine_embedding(mask, x.shape[-1]).to(x.dtype)
            cross_bias = mask.flatten(1).to(x.dtype) * MASKED_LOGIT
        for block in self.blocks:
            x = block(x, H, W, det_pos_embed, shift_mask, cross_pos, cross_bias)
        merged, H_out, W_out = self.downsample(x, H, W)
        return x, merged, H_out, W_out


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor):
        H, W = images.shape[-2:]
        images = F.pad(images, (0, (-W) % self.patch_size, 0, (-H) % self.patch_size))
        x = self.proj(images)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SwinRAM(nn.Module):
    """Swin body of ViDT. forward(images, mask) -> (4 feature maps, det_tgt [B,8E,N], det_pos [1,pos_dim,N]).

    Parameters:
        embed_dim, depths, num_heads, drop_path_rate: the Swin variant (SWIN_VARIANTS).
        det_token_num: number of [DET] tokens. pos_dim: width of the [DET] positional embedding and
        of the last merge (the neck's d_model). cross_indices: stages with [DET x PATCH] attention.
    """

    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], drop_path_rate: float,
                 det_token_num: int = 100, pos_dim: int = 256, cross_indices: Sequence[int] = (3,)):
        super().__init__()
        num_stages = len(depths)
        if not cross_indices or any(not 0 <= i < num_stages for i in cross_indices):
            raise ValueError(f"--cross_indices must name stages in 0..{num_stages - 1}, got {list(cross_indices)}")
        self.det_token = nn.Parameter(torch.zeros(1, det_token_num, embed_dim))
        self.det_pos_embed = nn.Parameter(torch.zeros(1, det_token_num, pos_dim))
        trunc_normal_(self.det_token, std=0.02)
        trunc_normal_(self.det_pos_embed, std=0.02)
        self.patch_embed = PatchEmbed(embed_dim)

        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = []
        for i in range(num_stages):
            out_dim = dims[i + 1] if i + 1 < num_stages else pos_dim
            stage_drop = drop_paths[sum(depths[:i]):sum(depths[:i + 1])]
            stages.append(RAMStage(dims[i], out_dim, depths[i], num_heads[i], stage_drop, pos_dim, i in cross_indices))
        self.layers = nn.ModuleList(stages)
        # Unused output norms of the Swin-detection code; kept because released checkpoints contain them.
        self.norm1 = nn.LayerNorm(dims[1])
        self.norm2 = nn.LayerNorm(dims[2])
        self.norm3 = nn.LayerNorm(dims[3])
        self.num_channels = dims[1:] + [pos_dim]
        self.det_tgt_channels = dims[-1]
        self.mask_divisor = 2 ** (num_stages - len(cross_indices))

    def no_weight_decay(self):
        return {"det_pos_embed", "det_token"}

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        x, H, W = self.patch_embed(images)
        B = x.shape[0]
        det = self.det_token.expand(B, -1, -1)
        img_h, img_w = images.shape[-2:]
        if min(img_h, img_w) < 4 * 2 ** (len(self.layers) - 1):
            raise ValueError(f"image batch {img_h}x{img_w} is too small: each side needs at least "
                             f"{4 * 2 ** (len(self.layers) - 1)} px for the stride-32 [DET x PATCH] mask")
        stage_mask = resize_mask(mask, ((img_h // 4) // self.mask_divisor, (img_w // 4) // self.mask_divisor))

        features: List[torch.Tensor] = []
        for index, stage in enumerate(self.layers):
            x_out, merged, H_next, W_next = stage(torch.cat([x, det], dim=1), H, W, self.det_pos_embed, stage_mask)
            if index > 0:
                features.append(x_out[:, :H * W].transpose(1, 2).reshape(B, -1, H, W))
            det_tgt = x_out[:, H * W:].transpose(1, 2)
            x, det = merged[:, :H_next * W_next], merged[:, H_next * W_next:]
            H, W = H_next, W_next
        features.append(x.transpose(1, 2).reshape(B, -1, H, W))
        return features, det_tgt, self.det_pos_embed.transpose(1, 2)


def build_swin_ram(name: str, pre_trained: str, det_token_num: int, pos_dim: int,
                   cross_indices: Sequence[int]) -> SwinRAM:
    """pre_trained: 'imagenet' (file under ckpts/backbones/), 'none', or a checkpoint path."""
    if name not in SWIN_VARIANTS:
        raise ValueError(f"backbone '{name}' is not supported here; choose from {sorted(SWIN_VARIANTS)}")
    variant = dict(SWIN_VARIANTS[name])
    imagenet_file = variant.pop("imagenet_file")
    model = SwinRAM(**variant, det_token_num=det_token_num, pos_dim=pos_dim, cross_indices=cross_indices)
    if pre_trained.lower() == "none":
        return model
    path = os.path.join(IMAGENET_DIR, imagenet_file) if pre_trained.lower() == "imagenet" else pre_trained
    load_imagenet_weights(model, path)
    return model


def load_imagenet_weights(model: SwinRAM, path: str) -> None:
    """Non-strict load of an ImageNet Swin checkpoint; ViDT-only parts stay random."""
    if not os.path.isfile(path):
        raise CheckpointError(f"ImageNet Swin weights not found at {path} (no download is attempted); "
                              f"place the file there, pass its path to --pre_trained, or use --pre_trained none")
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("model", checkpoint)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    result = model.load_state_dict(fitting, strict=False)
    print(f"| loaded {len(fitting)} ImageNet tensors from {path}; {len(result.missing_keys)} stay randomly initialised")
