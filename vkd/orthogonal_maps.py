"""Orthogonal parametrizations of a linear layer's weight (the VkD projector).

``register_orthogonal`` attaches the parametrization in the layout of
``torch.nn.utils.parametrizations.orthogonal`` (``parametrizations.weight.original`` and the
trivialization buffer ``parametrizations.weight.0.base``), so released checkpoints load strictly
whichever implementation is chosen:

- ``impl="torch"``: torch's own parametrization, exactly as the original code builds it.
- ``impl="fast"``: :class:`FastOrthogonal`, the same function of ``original`` and ``base`` (same
  values, same gradients) computed with blocked matrix products. torch's Householder map
  differentiates through a sequential product of reflectors, which took 15.6 s of an 18.5 s
  training step on a loaded 2-core CPU; the compact WY form below is a few matmuls.

Maps (``orthogonal_map``), all with dynamic trivialization W = base @ Q(original):

- ``householder`` (torch's default for non-square weights, the released projectors): Q is the first
  k columns of H_1 ... H_k, H_i = I - tau_i v_i v_i^T, v_i = e_i + tril(X, -1)[:, i], times the
  column signs ``int(diag X)``. (quirk of torch, kept) ``int`` truncates towards zero, so a diagonal
  entry in (-1, 1) zeroes its column: weight decay on ``original`` moves -1 to -0.99997 after one
  AdamW step (lr 5e-4, wd 0.05), which makes W = 0.
- ``matrix_exp`` (torch's default for square weights): Q = expm(A)[:, :k], A = Y - Y^T with
  Y = [tril(X), 0] the n x n embedding of X.
- ``cayley``: Q = ((I - A/2)^-1 (I + A/2))[:, :k] with the same A.
- ``qr`` (fast only, for research): Q = the Q factor of X = QR with diag(R) >= 0. A new module
  stores ``original = +I`` (not -I) so that it starts at W = base[:, :k] like the others.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

from vkd.precision import full_fp32

IMPLEMENTATIONS = ("fast", "torch")
ORTHOGONAL_MAPS = ("householder", "matrix_exp", "cayley", "qr")


def register_orthogonal(module: nn.Module, orthogonal_map: Optional[str] = None, impl: str = "fast") -> nn.Module:
    """Make ``module.weight`` orthogonal with dynamic trivialization (W = base @ Q(original)).

    ``orthogonal_map=None`` picks torch's default: matrix_exp for square weights, householder otherwise.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown projector implementation '{impl}'; choose from {IMPLEMENTATIONS}")
    if orthogonal_map is not None and orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError(f"unknown orthogonal map '{orthogonal_map}'; choose from {ORTHOGONAL_MAPS}")
    if impl == "torch":
        if orthogonal_map == "qr":
            raise ValueError("orthogonal_map='qr' is only implemented by impl='fast'")
        return parametrizations.orthogonal(module, orthogonal_map=orthogonal_map, use_trivialization=True)
    weight = module.weight
    if orthogonal_map is None:
        orthogonal_map = "matrix_exp" if weight.shape[-2] == weight.shape[-1] else "householder"
    # Registered as torch registers its own (unsafe=True: no check forward): right_inverse runs once
    # and draws the same random numbers, so a seeded fast module gets the same `base` as torch's.
    parametrize.register_parametrization(module, "weight", FastOrthogonal(weight, orthogonal_map), unsafe=True)
    return module


def orthogonal_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a Linear made orthogonal by :func:`register_orthogonal` (what
    ``losses.OrthogonalProjector.forward`` calls; a plain Linear's own forward forms W, same values).

    With the fast parametrization and fewer rows than min(out, in), y = x W^T is computed as
    (x Q^T) base^T, which costs rows * n^2 instead of the n^2 * k of forming W = base @ Q.
    """
    if parametrize.is_parametrized(module, "weight"):
        parametrization = module.parametrizations.weight
        if len(parametrization) == 1 and isinstance(parametrization[0], FastOrthogonal):
            y = parametrization[0].linear(parametrization.original, x)
            return y if module.bias is None else y + module.bias
    return F.linear(x, module.weight, module.bias)


class FastOrthogonal(nn.Module):
    """torch's ``_Orthogonal`` (with trivialization) computed with blocked matrix products.

    ``forward(original)`` returns the full weight W, for anyone who reads ``module.weight``;
    :meth:`linear` applies W to a batch without forming it. ``right_inverse`` initialises
    ``base`` and ``original`` as torch does (see :meth:`right_inverse`).

    Parameters:
        weight: the weight being parametrized (its shape is recorded).
        orthogonal_map: one of ``ORTHOGONAL_MAPS``.
    """

    base: torch.Tensor

    def __init__(self, weight: torch.Tensor, orthogonal_map: str):
        super().__init__()
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"unknown orthogonal map '{orthogonal_map}'; choose from {ORTHOGONAL_MAPS}")
        if weight.is_complex():
            raise ValueError("the fast orthogonal parametrization supports real weights only")
        self.shape = weight.shape
        self.orthogonal_map = orthogonal_map
        self.register_buffer("base", None)

    def extra_repr(self) -> str:
        return f"orthogonal_map={self.orthogonal_map}"

    def q(self, original: torch.Tensor) -> torch.Tensor:
        """Q(original) [n, k] (n >= k) before the base is applied."""
        # The map runs in the parameter's precision whatever the autocast state, as torch's does
        # (householder_product is not autocast), and without TF32 if a user enabled it: its matmuls and solve
        # would lose orthogonality in fp16/bf16/TF32. Applying base (a matmul) follows autocast, as in torch.
        with full_fp32(original.device.type):
            return MAPS[self.orthogonal_map](_tall(original))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        weight = self.base @ self.q(original)
        return weight.mT if _is_wide(original) else weight

    def linear(self, original: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x W^T, forming W only when that is cheaper than applying base to the batch."""
        rows = x.numel() // x.shape[-1]
        if rows >= min(original.shape[-2:]):
            return F.linear(x, self(original))
        q = self.q(original)
        if _is_wide(original):  # W = (base Q)^T, so x W^T = (x base) Q
            return F.linear(F.linear(x, self.base.mT), q.mT)
        return F.linear(F.linear(x, q), self.base)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Store an orthogonal ``base`` whose first k columns span ``weight``; return the ``original``
        that maps to Q = I[:, :k], so that W = weight when ``weight`` is orthogonal.

        As torch: a square weight is kept if orthogonal, else orthogonalised by QR; a rectangular
        one is completed with Gaussian columns and orthogonalised by QR (same random draws).
        """
        if weight.shape != self.shape:
            raise ValueError(f"expected a weight of shape {tuple(self.shape)}, got {tuple(weight.shape)}")
        tall = _tall(weight)
        n, k = tall.shape[-2:]
        if n == k:
            self.base = tall.clone() if _is_orthogonal(tall) else _orthonormalise(tall)
        else:
            completion = torch.randn(*tall.shape[:-2], n, n - k, dtype=tall.dtype, device=tall.device)
            self.base = _orthonormalise(torch.cat([tall, completion], dim=-1))
        # Householder, matrix_exp and cayley map -I to I[:, :k] (householder via the -1 signs on the
        # diagonal, the other two because A = 0); qr maps +I to it.
        identity_like = torch.zeros_like(weight)
        identity_like.diagonal(dim1=-2, dim2=-1).fill_(1.0 if self.orthogonal_map == "qr" else -1.0)
        return identity_like


# ---------------------------------------------------------------------------------------------
# The maps: tall X [..., n, k] (n >= k) -> Q [..., n, k] with orthonormal columns
# ---------------------------------------------------------------------------------------------

def householder(x: torch.Tensor) -> torch.Tensor:
    """torch's Householder map in compact WY form: H_1 ... H_k = I - V T V^T.

    With tau_i = 2 / ||v_i||^2 (torch's formula), T^-1 = striu(V^T V) + diag(1 / tau) (Joffrain,
    Low, Quintana-Orti, van de Geijn, Van Zee, "Accumulating Householder transformations,
    revisited", TOMS 2006), so the product costs two n x k x k matmuls and one k x k triangular
    solve, and autograd differentiates through those instead of k sequential reflections.
    """
    n, k = x.shape[-2:]
    reflectors = x.tril(-1)
    tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
    eye = torch.eye(n, k, dtype=x.dtype, device=x.device)
    v = reflectors + eye  # v_i has the implicit unit entry at i
    t_inv = (v.mT @ v).triu(1) + torch.diag_embed(1.0 / tau)
    # Only the first k columns of I - V T V^T are needed: I[:, :k] - V (T V[:k]^T).
    t_v_top = torch.linalg.solve_triangular(t_inv, v[..., :k, :].mT, upper=True)
    q = eye - v @ t_v_top
    # (quirk of torch, kept) the column signs are the diagonal truncated to int, not its sign.
    return q * x.diagonal(dim1=-2, dim2=-1).int().to(q.dtype).unsqueeze(-2)


def matrix_exp(x: torch.Tensor) -> torch.Tensor:
    """expm(A)[:, :k]. For a rectangular X, A = B C^T has rank <= 2k, and
    expm(B C^T) = I + B phi(C^T B) C^T with phi(M) = sum_j M^j / (j+1)!, read off the top-right block
    of expm([[M, I], [0, 0]]): a 4k x 4k exponential instead of torch's n x n one."""
    n, k = x.shape[-2:]
    if n == k:
        return torch.matrix_exp(_skew(x))
    b, c = _skew_factors(x)
    m = c.mT @ b
    eye = torch.eye(2 * k, dtype=x.dtype, device=x.device).expand_as(m)
    augmented = torch.cat([torch.cat([m, eye], dim=-1), m.new_zeros(*m.shape[:-2], 2 * k, 4 * k)], dim=-2)
    phi = torch.matrix_exp(augmented)[..., :2 * k, 2 * k:]
    return torch.eye(n, k, dtype=x.dtype, device=x.device) + b @ (phi @ c[..., :k, :].mT)


def cayley(x: torch.Tensor) -> torch.Tensor:
    """((I - A/2)^-1 (I + A/2))[:, :k]. For a rectangular X, A = B C^T and by Woodbury
    (I - A/2)^-1 (I + A/2) = 2 (I - A/2)^-1 - I = I + B (I - C^T B / 2)^-1 C^T: a 2k x 2k solve."""
    n, k = x.shape[-2:]
    if n == k:
        a = _skew(x)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        return torch.linalg.solve(eye - a / 2, eye + a / 2)
    b, c = _skew_factors(x)
    m = c.mT @ b
    small = torch.eye(2 * k, dtype=x.dtype, device=x.device) - m / 2
    return torch.eye(n, k, dtype=x.dtype, device=x.device) + b @ torch.linalg.solve(small, c[..., :k, :].mT)


def qr(x: torch.Tensor) -> torch.Tensor:
    """Q of X = QR with the signs fixed so that diag(R) >= 0 (makes the map smooth and unique)."""
    q, r = torch.linalg.qr(x)
    signs = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2)


MAPS = {"householder": householder, "matrix_exp": matrix_exp, "cayley": cayley, "qr": qr}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _is_wide(weight: torch.Tensor) -> bool:
    return weight.shape[-2] < weight.shape[-1]


def _tall(weight: torch.Tensor) -> torch.Tensor:
    """torch works on the tall orientation and transposes back (out < in gives orthonormal rows)."""
    return weight.mT if _is_wide(weight) else weight


def _skew(x: torch.Tensor) -> torch.Tensor:
    lower = x.tril()
    return lower - lower.mT


def _skew_factors(x: torch.Tensor):
    """B, C [n, 2k] with B C^T = Y - Y^T, Y = [tril(X), 0] (torch's n x n embedding of X):
    Y = L E^T with L = tril(X), E = I[:, :k], so Y - Y^T = [L, -E] [E, L]^T."""
    n, k = x.shape[-2:]
    lower = x.tril()
    eye = torch.eye(n, k, dtype=x.dtype, device=x.device).expand_as(lower)
    return torch.cat([lower, -eye], dim=-1), torch.cat([eye, lower], dim=-1)


def _is_orthogonal(q: torch.Tensor) -> bool:
    """torch's test when it decides whether a square initial weight needs orthogonalising."""
    n, k = q.shape[-2:]
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    return torch.allclose(q.mT @ q, eye, atol=10.0 * n * torch.finfo(q.dtype).eps)


def _orthonormalise(m: torch.Tensor) -> torch.Tensor:
    """Q of M = QR with diag(R) >= 0, computed as torch's initialisation computes it (LAPACK geqrf)."""
    factors, tau = torch.geqrf(m)
    q = torch.linalg.householder_product(factors, tau)
    return q * factors.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)
