"""Hadamard matrices (Sylvester, Paley I/II, Kronecker) and the fast rotations built from them."""

import math

import pytest
import torch

from qdllm.transforms.hadamard import (
    HadamardError,
    dense_factor,
    fwht,
    hadamard_decomposition,
    hadamard_matrix,
    rotation,
    sylvester_matrix,
)
from tests.transforms.fp64_models import kurtosis, max_to_mean

# head_dim 64, smol_dllm d 576 = 36 * 16 and FFN 1536 = 12 * 128, Dream d 3584 = 28 * 128,
# LLaDA d 4096, plus the Paley orders QuaRot stores (12, 20, 28, 36, 40, 60, 108, 140, 148)
MODEL_SIZES = [64, 576, 1536]
ROW_SAMPLED_SIZES = [3584, 4096]  # H H^T checked on 64 rows: the full product is seconds of fp64 matmul
LARGE_SIZES = [12288, 18944]  # LLaDA FFN = 12 * 1024, Dream FFN = 148 * 128: never formed densely
PALEY_ORDERS = [12, 20, 28, 36, 40, 60, 108, 140, 148]
# multiples of 4 up to 100 that need a prime-power Paley (25, 49) or another construction
UNCONSTRUCTIBLE_UP_TO_100 = {52, 92, 100}


def _is_hadamard(h: torch.Tensor) -> bool:
    n = h.shape[0]
    entries_ok = bool(((h == 1) | (h == -1)).all())
    return entries_ok and torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("n", MODEL_SIZES + PALEY_ORDERS)
def test_hadamard_matrix_of_every_needed_order(n):
    assert _is_hadamard(hadamard_matrix(n))  # exact: integer entries in fp64


@pytest.mark.parametrize("n", ROW_SAMPLED_SIZES)
def test_hadamard_matrix_of_large_model_orders_on_sampled_rows(n):
    h = hadamard_matrix(n)
    assert bool(((h == 1) | (h == -1)).all())
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:64]
    assert torch.equal(h[rows] @ h.T, n * torch.eye(n, dtype=h.dtype)[rows])


def test_every_small_order_is_built_or_refused_brute_force():
    for n in range(1, 101):
        possible = n in (1, 2) or n % 4 == 0
        if possible and n not in UNCONSTRUCTIBLE_UP_TO_100:
            assert _is_hadamard(hadamard_matrix(n)), n
        else:
            with pytest.raises(HadamardError, match=f"order {n}"):
                hadamard_matrix(n)


@pytest.mark.parametrize(
    "n,paley,power",
    [
        (3584, (28,), 128),
        (18944, (148,), 128),
        (12288, (12,), 1024),
        (576, (36,), 16),
        (1536, (12,), 128),
        (4096, (), 4096),
    ],
)
def test_decomposition_uses_the_smallest_dense_factor(n, paley, power):
    assert hadamard_decomposition(n) == (paley, power)


@pytest.mark.parametrize("n", LARGE_SIZES)
def test_large_orders_are_orthogonal_through_the_fast_apply(n):
    orders, power = hadamard_decomposition(n)
    assert _is_hadamard(dense_factor(orders)) and power & (power - 1) == 0
    rot = rotation(n, seed=0)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = rot(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(rot(y, transpose=True), x, rtol=0, atol=1e-12)
    # one entry of x Q against the closed form: column j of Q = (F ⊗ S)[:, j] d_j / sqrt(n)
    f, s = dense_factor(orders), sylvester_matrix(power)
    j = 12345 % n
    column = torch.kron(f[:, j // power], s[:, j % power]) * rot.signs[j] / math.sqrt(n)
    torch.testing.assert_close(y[:, j], x @ column, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 24, 64, 148, 576, 1536])
@pytest.mark.parametrize("seed", [None, 3])
def test_fast_apply_equals_dense_matmul_in_float64(n, seed):
    rot = rotation(n, seed=seed)
    dense = hadamard_matrix(n) / math.sqrt(n)
    if seed is not None:
        dense = dense * rot.signs  # H diag(d)
    else:
        assert rot.signs is None
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(rot(x), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot(x, transpose=True), x @ dense.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.matrix(), dense, rtol=0, atol=1e-12)


def test_fwht_is_sylvester_matmul():
    x = torch.randn(7, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fwht(x), x @ sylvester_matrix(256), rtol=0, atol=1e-11)


def test_float32_inputs_stay_float32_and_close_to_fp64():
    rot = rotation(1536, seed=1)
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(2))
    y = rot(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), rot(x.double()), rtol=0, atol=1e-5)


def test_seeds_give_identical_matrices_and_different_seeds_differ():
    a, b, c = rotation(576, seed=7), rotation(576, seed=7), rotation(576, seed=8)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), c.matrix())
    assert set(a.signs.tolist()) == {-1.0, 1.0}


def test_fallback_is_a_seeded_orthogonal_factor_times_the_fast_part():
    for n in (9, 18, 92):
        with pytest.raises(HadamardError):
            rotation(n, seed=0)
        rot = rotation(n, seed=0, fallback=True)
        assert not rot.is_hadamard and rot.power == n & -n
        q = rot.matrix()
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=q.dtype), rtol=0, atol=1e-12)
        ref = torch.kron(rot.factor, sylvester_matrix(rot.power) / math.sqrt(rot.power)) * rot.signs
        torch.testing.assert_close(q, ref, rtol=0, atol=1e-12)
        assert torch.equal(q, rotation(n, seed=0, fallback=True).matrix())
        assert not torch.equal(q, rotation(n, seed=1, fallback=True).matrix())


@pytest.mark.parametrize(
    "n,message",
    [
        (0, "positive integer"),
        (-4, "positive integer"),
        (6, "multiples of 4"),
        (10, "multiples of 4"),
        (92, "Paley"),
        (172, "Paley"),
    ],
)
def test_orders_without_construction_raise_clear_errors(n, message):
    with pytest.raises(HadamardError, match=message):
        hadamard_decomposition(n)


def test_wrong_width_and_non_power_of_two_are_refused():
    with pytest.raises(ValueError, match="order 64 applied to a tensor with last dim 32"):
        rotation(64)(torch.zeros(2, 32))
    with pytest.raises(HadamardError, match="not a power of two"):
        fwht(torch.zeros(3, 12))


def test_rotation_spreads_one_massive_channel():
    """A randomised Hadamard turns one massive channel into a flat, Gaussian-like activation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=gen, dtype=torch.float64)
    x[:, 7] += 100.0
    y = rotation(576, seed=0)(x)
    assert kurtosis(x) > 100 and kurtosis(y) < 3.5
    assert max_to_mean(x) > 100 and max_to_mean(y) < 6
    torch.testing.assert_close(y.square().sum(), x.square().sum(), rtol=1e-12, atol=0)
