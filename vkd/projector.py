"""The VkD projector: a bias-free linear map with orthonormal columns (it cannot absorb knowledge).

Paper: Miles, Elezi, Deng, "VkD: Improving Knowledge Distillation using Orthogonal Projections", CVPR 2024.
"""
from typing import Optional

import torch
import torch.nn as nn

from vkd import orthogonal_maps

__all__ = ["OrthogonalProjector", "OrthogonalLinear"]


class OrthogonalProjector(nn.Linear):
    """Bias-free linear map ``in_dim -> out_dim`` whose weight W [out_dim, in_dim] is orthogonal: orthonormal
    columns (WᵀW = I, an isometry) when the student is no wider than the teacher (``out_dim >= in_dim``, VkD's
    case), orthonormal rows (WWᵀ = I, a projection onto a teacher-sized subspace) when it is wider. Either way
    the map cannot absorb knowledge: it neither stretches nor mixes beyond a rotation.

    The state dict is the original's (``parametrizations.weight.original`` [out, in] and the buffer
    ``parametrizations.weight.0.base`` [n, n], n = max(out, in)); W is computed from them as
    ``torch.nn.utils.parametrizations.orthogonal`` computes it, with dynamic trivialization
    (W = base @ Q(original), transposed for a wide weight). ``orthogonal_map`` defaults to torch's choice for
    the shape (Householder when non-square, matrix_exp when square); ``impl='torch'`` uses torch's own
    parametrization.
    """

    def __init__(self, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None, impl: str = "fast"):
        super().__init__(in_dim, out_dim, bias=False)
        orthogonal_maps.register_orthogonal(self, orthogonal_map=orthogonal_map, impl=impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Never forms W for a batch smaller than the width (see orthogonal_maps.orthogonal_linear).
        return orthogonal_maps.orthogonal_linear(self, x)


class OrthogonalLinear(nn.Module):
    """Detection projector (the original ViDT distillation code): orthogonal map, then a per-channel scale and bias."""

    def __init__(self, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None, impl: str = "fast"):
        super().__init__()
        self.projector = OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl=impl)
        self.weight = nn.Parameter(torch.ones(out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x) * self.weight + self.bias
