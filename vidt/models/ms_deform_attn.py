"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in pure PyTorch.

The original only runs a compiled CUDA kernel; this is the grid_sample formulation that the original
keeps "for debug and test", which is differentiable by autograd and runs on any device.
"""
import math
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def multi_scale_deformable_attention(value: torch.Tensor, spatial_shapes: List[Tuple[int, int]],
                                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of each level's value map, weighted and summed over levels and points.

    value [N,S,M,D] (S = sum of H_l*W_l), sampling_locations [N,Lq,M,L,P,2] as (x,y) in [0,1] of the
    level, attention_weights [N,Lq,M,L,P] -> [N,Lq,M*D]. Samples outside the map count as zero.
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1,1] with align_corners=False: pixel = x*W - 0.5
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_map = value_per_level[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return output.view(N, M * D, Lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention over L feature levels with M heads and P sampling points per head and level."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by the number of heads ({n_heads})")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Head m starts pointing along angle 2*pi*m/M, point p at (p+1) times that unit step.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        offsets = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        offsets *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: torch.Tensor, padding_mask: torch.Tensor = None) -> torch.Tensor:
        """query [N,Lq,C]; reference_points [N,Lq,L,2] (x,y) or [N,Lq,L,4] (cx,cy,w,h), normalised;
        memory [N,S,C]; spatial_shapes [L,2] as (H,W); padding_mask [N,S] (True = padding)."""
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(memory)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, memory.shape[1], M, -1)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            size_xy = spatial_shapes.flip(-1).to(offsets.dtype)  # (W, H) per level
            locations = reference_points[:, :, None, :, None, :] + offsets / size_xy[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            centres, sizes = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centres + offsets / P * sizes * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        shapes = [tuple(s) for s in spatial_shapes.tolist()]
        return self.output_proj(multi_scale_deformable_attention(value, shapes, locations, weights))
