"""Teacher feature normalisations: LayerNorm (classification), batch standardisation (detection), and
whitening, by ZCA or by htdt's Cholesky factor (generation). Each maps a [B, D] batch to [B, D]."""
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from vkd.precision import full_fp32

__all__ = ["layernorm", "batch_standardise", "whiten", "whiten_cholesky", "NORMALISATIONS", "WHITENINGS",
           "get_normalisation", "build_normalisation"]

WHITEN_EPS = 1e-5
WHITENINGS = ("cholesky", "zca")


def layernorm(x: torch.Tensor) -> torch.Tensor:
    """Standardise each row across its features (LayerNorm without affine, eps 1e-5): classification."""
    return F.layer_norm(x, (x.shape[-1],))


def batch_standardise(x: torch.Tensor) -> torch.Tensor:
    """Standardise each feature across the rows of a 2-D batch (unbiased std, no epsilon): detection."""
    return (x - x.mean(0)) / x.std(0)


def whiten(x: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """ZCA-whiten a 2-D batch: centred rows times C^-1/2 of the (biased) feature covariance C + eps*I.

    ``eps`` keeps C invertible when the batch has fewer rows than features (the usual case for
    3024-d teacher features), so rank-deficient directions are scaled by 1/sqrt(eps) at most. It computes
    in fp32 under AMP too: whitening amplifies rounding by up to 1/sqrt(eps), and fp16 or bf16 products
    gave relative errors of 0.2 to 1.8.
    """
    with full_fp32(x.device.type):
        centred = x.float() - x.float().mean(0)
        cov = centred.T @ centred / x.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov + eps * torch.eye(cov.shape[0], device=x.device))
        inv_sqrt = eigvecs @ torch.diag(eigvals.clamp_min(eps).rsqrt()) @ eigvecs.T
        return (centred @ inv_sqrt).to(x.dtype)


def whiten_cholesky(x: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """Whiten a 2-D batch as htdt's ``Whitening1d`` (Ermolov et al. 2021): (x - mean) L^-T, where
    L L^T = (1 - eps) C + eps I and C is the unbiased feature covariance.

    Same whitened covariance as ``whiten`` up to a rotation. ``eps`` > 0 is what makes the Cholesky
    factor exist when the batch has fewer rows than features; the factorisation runs in float64
    because C then has eigenvalues down to 0 and float32 loses positive definiteness.
    """
    centred = (x - x.mean(0)).double()
    cov = centred.T @ centred / (x.shape[0] - 1)
    shrunk = (1 - eps) * cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=x.device)
    lower = torch.linalg.cholesky(shrunk)
    # Row-vector batch: solve L W^T = centred^T, i.e. W = centred L^-T.
    whitened = torch.linalg.solve_triangular(lower, centred.T, upper=False).T
    return whitened.to(x.dtype)


NORMALISATIONS = {
    "layernorm": layernorm,
    "batchstd": batch_standardise,
    "whiten": whiten,
    "none": lambda x: x,
}


def get_normalisation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation '{name}'; choose from {sorted(NORMALISATIONS)}")
    return NORMALISATIONS[name]


def build_normalisation(name: str, whitening: str = "zca", eps: float = WHITEN_EPS) -> Callable:
    """``get_normalisation(name)``, where ``whiten`` uses ``whitening`` (ZCA or htdt's Cholesky) with ``eps``."""
    if name != "whiten":
        return get_normalisation(name)
    if whitening not in WHITENINGS:
        raise ValueError(f"unknown whitening '{whitening}'; choose from {', '.join(WHITENINGS)}")
    if eps <= 0:
        raise ValueError(f"whitening needs eps > 0 (a batch can be narrower than the features), got {eps}")
    return functools.partial(whiten_cholesky if whitening == "cholesky" else whiten, eps=eps)
