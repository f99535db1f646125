"""The fast orthogonal projector against torch's parametrization (values, gradients, state dicts).

torch's Householder backward costs about 0.1 s per reflector on a 2-core CPU (27 s for 192->3024),
so the default run compares full gradients with torch's on thin shapes and, at the released shapes,
compares directional derivatives with torch's function in float64. VKD_SLOW_TESTS=1 adds the full
gradient comparison with torch's backward at the released shapes (minutes).
"""
import copy
import functools
import os

import pytest
import torch
import torch.nn as nn

from vkd import orthogonal_maps
from vkd.projector import OrthogonalProjector

RELEASED_HOUSEHOLDER = [(192, 3024), (384, 3024), (768, 3024)]
SLOW = pytest.mark.skipif(not os.environ.get("VKD_SLOW_TESTS"), reason="set VKD_SLOW_TESTS=1 (minutes)")
RTOL = 1e-4
ORTH_TOL = 1e-5
# fp32 scaling-and-squaring: torch's own square matrix_exp reaches 1.0e-5 on the inputs used here.
ORTH_TOL_MATRIX_EXP = 3e-5


def orthogonality_tol(orthogonal_map: str) -> float:
    return ORTH_TOL_MATRIX_EXP if orthogonal_map == "matrix_exp" else ORTH_TOL


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


def orthogonality_err(weight: torch.Tensor) -> float:
    tall = weight if weight.shape[0] >= weight.shape[1] else weight.T
    gram = tall.T.double() @ tall.double()
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()


@functools.lru_cache(maxsize=None)
def _built_pair(in_dim, out_dim, orthogonal_map, seed):
    torch.manual_seed(seed)
    reference = OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl="torch")
    torch.manual_seed(seed)
    fast = OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl="fast")
    return reference, fast


@functools.lru_cache(maxsize=None)
def _built_fast(in_dim, out_dim, orthogonal_map):
    torch.manual_seed(0)
    return OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl="fast")


def fast_projector(in_dim, out_dim, orthogonal_map=None):
    return copy.deepcopy(_built_fast(in_dim, out_dim, orthogonal_map))


def projector_pair(in_dim, out_dim, orthogonal_map=None, seed=0):
    """torch and fast projectors built from the same seed (so with the same base and original).

    Copies of a cached pair: building a 3024-wide base (an n x n QR) takes seconds on 2 cores.
    """
    return copy.deepcopy(_built_pair(in_dim, out_dim, orthogonal_map, seed))


def trained_like_original(out_dim, in_dim, seed=1, cross_threshold=False):
    """An `original` as after some optimiser steps: small off-diagonal entries, diagonal near -1.

    With ``cross_threshold`` some diagonal entries sit where torch's int() cast gives 0, -2 or +1.
    """
    generator = torch.Generator().manual_seed(seed)
    original = 0.05 * torch.randn(out_dim, in_dim, generator=generator)
    k = min(out_dim, in_dim)
    diagonal = -1.0 - 0.5 * torch.rand(k, generator=generator)
    if cross_threshold:
        diagonal[0::4] = -0.9   # int -> 0: the column is zeroed
        diagonal[1::4] = -2.3   # int -> -2
        diagonal[2::8] = 1.4    # int -> +1
    original.diagonal().copy_(diagonal)
    return original


def set_original(projector, original):
    with torch.no_grad():
        projector.parametrizations.weight.original.copy_(original)


def pair_with_trained_original(in_dim, out_dim, cross_threshold=False):
    """A torch/fast projector pair sharing one ``trained_like_original`` matrix, and that matrix."""
    reference, fast = projector_pair(in_dim, out_dim)
    original = trained_like_original(out_dim, in_dim, cross_threshold=cross_threshold)
    set_original(reference, original)
    set_original(fast, original)
    return reference, fast, original


def original_grad(projector, x, upstream):
    projector.zero_grad()
    (projector(x) * upstream).sum().backward()
    return projector.parametrizations.weight.original.grad.clone()


def directional_derivative_torch(reference, original, upstream_weight, direction, eps=1e-5):
    """d/dt <G, W_torch(original + t D)> at t = 0, by central differences in float64.

    With G = d loss / dW this is <d loss / d original, D> for torch's function.
    """
    probe = copy.deepcopy(reference).double()
    values = []
    for sign in (1, -1):
        set_original(probe, original.double() + sign * eps * direction.double())
        values.append((probe.weight * upstream_weight.double()).sum())
    return ((values[0] - values[1]) / (2 * eps)).item()


# ---------------------------------------------------------------------------------------------
# Layout and initialisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dim,out_dim", [(192, 3024), (256, 256)])
def test_same_seed_gives_same_state_dict(in_dim, out_dim):
    reference, fast = projector_pair(in_dim, out_dim)
    expected = reference.state_dict()
    actual = fast.state_dict()
    assert list(actual) == list(expected) == ["parametrizations.weight.original", "parametrizations.weight.0.base"]
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert torch.allclose(fast.weight, reference.weight, rtol=0, atol=1e-6)
    assert orthogonality_err(fast.weight) < ORTH_TOL


def test_state_dicts_load_strictly_both_ways():
    reference, fast = projector_pair(192, 3024)
    for source, target, seed in ((reference, fast, 1), (fast, reference, 2)):
        set_original(source, trained_like_original(3024, 192, seed=seed))
        with torch.no_grad():
            target.parametrizations.weight[0].base.zero_()
        target.load_state_dict(source.state_dict(), strict=True)
        assert rel_err(target.weight, source.weight) < RTOL


# ---------------------------------------------------------------------------------------------
# Same function, same gradients (Householder)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dim,out_dim", RELEASED_HOUSEHOLDER)
@pytest.mark.parametrize("cross_threshold", [False, True])
def test_householder_matches_torch_at_released_shapes(in_dim, out_dim, cross_threshold):
    reference, fast, original = pair_with_trained_original(in_dim, out_dim, cross_threshold=cross_threshold)
    assert rel_err(fast.weight, reference.weight) < RTOL
    if not cross_threshold:
        assert orthogonality_err(fast.weight) < ORTH_TOL
    x, upstream = torch.randn(8, in_dim), torch.randn(8, out_dim)
    with torch.no_grad():
        assert rel_err(fast(x), reference(x)) < RTOL
    grad = original_grad(fast, x, upstream)
    assert torch.count_nonzero(grad.diagonal()) == 0  # torch never moves the diagonal
    direction = torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(2))
    expected = directional_derivative_torch(reference, original, upstream.T @ x, direction)
    assert abs((grad * direction).sum().item() - expected) < RTOL * abs(expected)


@pytest.mark.parametrize("in_dim,out_dim", [(16, 3024), (24, 200)])
@pytest.mark.parametrize("cross_threshold", [False, True])
def test_householder_gradient_matches_torch_backward(in_dim, out_dim, cross_threshold):
    reference, fast, _ = pair_with_trained_original(in_dim, out_dim, cross_threshold=cross_threshold)
    x, upstream = torch.randn(8, in_dim), torch.randn(8, out_dim)
    assert rel_err(original_grad(fast, x, upstream), original_grad(reference, x, upstream)) < RTOL


@SLOW
@pytest.mark.parametrize("in_dim,out_dim", RELEASED_HOUSEHOLDER)
def test_householder_gradient_matches_torch_backward_released(in_dim, out_dim):
    reference, fast, _ = pair_with_trained_original(in_dim, out_dim, cross_threshold=True)
    x, upstream = torch.randn(8, in_dim), torch.randn(8, out_dim)
    assert rel_err(original_grad(fast, x, upstream), original_grad(reference, x, upstream)) < RTOL


def test_wide_weight_matches_torch():
    # out < in: torch parametrizes the transpose and W has orthonormal rows.
    torch.manual_seed(0)
    reference = orthogonal_maps.register_orthogonal(nn.Linear(100, 16, bias=False), impl="torch")
    torch.manual_seed(0)
    fast = orthogonal_maps.register_orthogonal(nn.Linear(100, 16, bias=False), impl="fast")
    original = trained_like_original(16, 100)
    set_original(reference, original)
    set_original(fast, original)
    x, upstream = torch.randn(4, 100), torch.randn(4, 16)
    assert rel_err(fast.weight, reference.weight) < RTOL
    assert rel_err(original_grad(fast, x, upstream), original_grad(reference, x, upstream)) < RTOL
    assert orthogonality_err(fast.weight) < ORTH_TOL


# ---------------------------------------------------------------------------------------------
# Square (detection) and the other maps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orthogonal_map", [None, "cayley"])
def test_square_matches_torch(orthogonal_map):
    reference, fast = projector_pair(256, 256, orthogonal_map=orthogonal_map)
    original = trained_like_original(256, 256)
    set_original(reference, original)
    set_original(fast, original)
    x, upstream = torch.randn(8, 256), torch.randn(8, 256)
    assert rel_err(fast.weight, reference.weight) < RTOL
    assert rel_err(original_grad(fast, x, upstream), original_grad(reference, x, upstream)) < RTOL
    assert orthogonality_err(fast.weight) < orthogonality_tol(orthogonal_map or "matrix_exp")


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_rectangular_low_rank_maps_match_torch_in_float64(orthogonal_map):
    # The fast maps use the rank-2k structure of torch's n x n skew matrix; checked in float64
    # because torch's own fp32 backward of the n x n exponential is only ~1e-4 accurate.
    reference, fast = projector_pair(16, 100, orthogonal_map=orthogonal_map)
    reference.double()
    fast.double()
    original = trained_like_original(100, 16, cross_threshold=True).double()
    set_original(reference, original)
    set_original(fast, original)
    x, upstream = torch.randn(4, 16, dtype=torch.double), torch.randn(4, 100, dtype=torch.double)
    assert rel_err(fast.weight, reference.weight) < 1e-10
    assert rel_err(original_grad(fast, x, upstream), original_grad(reference, x, upstream)) < 1e-10


@pytest.mark.parametrize("orthogonal_map", orthogonal_maps.ORTHOGONAL_MAPS)
def test_every_map_is_orthogonal_and_starts_at_base(orthogonal_map):
    projector = fast_projector(192, 3024, orthogonal_map)
    base = projector.parametrizations.weight[0].base
    assert torch.allclose(projector.weight, base[:, :192], atol=1e-6)
    set_original(projector, trained_like_original(3024, 192))
    assert orthogonality_err(projector.weight) < orthogonality_tol(orthogonal_map)


@pytest.mark.parametrize("orthogonal_map", orthogonal_maps.ORTHOGONAL_MAPS)
def test_optimiser_steps_keep_orthogonality(orthogonal_map):
    projector = fast_projector(192, 3024, orthogonal_map)
    # weight_decay=0: decay would shrink the Householder diagonal below 1 in magnitude (see below).
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-2, weight_decay=0.0)
    x, target = torch.randn(8, 192), torch.randn(8, 3024)
    start = projector.weight.detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.smooth_l1_loss(projector(x), target).backward()
        optimizer.step()
    assert not torch.allclose(projector.weight, start, atol=1e-4)
    assert orthogonality_err(projector.weight) < orthogonality_tol(orthogonal_map)


def test_optimiser_trajectories_match_torch():
    reference, fast = projector_pair(16, 3024)
    x, target = torch.randn(8, 16), torch.randn(8, 3024)
    for projector in (reference, fast):
        optimizer = torch.optim.Adam(projector.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.smooth_l1_loss(projector(x), target).backward()
            optimizer.step()
    assert rel_err(fast.weight, reference.weight) < RTOL


def test_weight_decay_zeroes_householder_weight_like_torch():
    # (quirk of torch, kept) the diagonal of `original` never gets a gradient, so AdamW's decoupled
    # decay alone moves it from -1 to -0.99997, and int() truncation then zeroes every column.
    for projector in projector_pair(16, 300):
        optimizer = torch.optim.AdamW(projector.parameters(), lr=5e-4, weight_decay=0.05)
        projector(torch.randn(8, 16)).sum().backward()
        optimizer.step()
        assert torch.count_nonzero(projector.weight) == 0


# ---------------------------------------------------------------------------------------------
# How the fast projector is applied
# ---------------------------------------------------------------------------------------------

def test_factored_and_formed_paths_agree():
    torch.manual_seed(0)
    projector = OrthogonalProjector(32, 300, impl="fast")
    set_original(projector, trained_like_original(300, 32))
    small, large = torch.randn(4, 32), torch.randn(64, 32)  # fewer / more rows than k = 32
    assert rel_err(projector(small), small @ projector.weight.T) < 1e-5
    assert rel_err(projector(large), large @ projector.weight.T) < 1e-5


def test_deep_copy_uses_its_own_parameters():
    torch.manual_seed(0)
    projector = OrthogonalProjector(32, 300, impl="fast")
    replica = copy.deepcopy(projector)
    set_original(replica, trained_like_original(300, 32))
    x = torch.randn(4, 32)
    assert rel_err(replica(x), x @ replica.weight.T) < 1e-5
    assert not torch.allclose(replica(x), projector(x))


def test_bf16_autocast_runs_close_to_fp32():
    projector = fast_projector(192, 3024, "householder")
    set_original(projector, trained_like_original(3024, 192))
    x = torch.randn(8, 192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = projector(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), projector(x)) < 2e-2


def test_rejects_unknown_choices():
    with pytest.raises(ValueError):
        OrthogonalProjector(8, 16, impl="slow")
    with pytest.raises(ValueError):
        OrthogonalProjector(8, 16, orthogonal_map="svd")
    with pytest.raises(ValueError):
        OrthogonalProjector(8, 16, orthogonal_map="qr", impl="torch")
