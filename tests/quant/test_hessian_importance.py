"""Hessian factors, importance Z and the DOR mask against float64 recomputation."""

import pytest
import torch

from qdllm.quant.hessian import HessianError, factorize
from qdllm.quant.importance import importance, loss_weights, outlier_mask
from tests.conftest import correlated_second_moment, random_weight


def test_factors_match_float64_inverse():
    s = correlated_second_moment(64, 256, 0)
    f = factorize(s, 0.01)
    s64 = s.double()
    eps = 0.01 * s64.diagonal().mean()
    hinv64 = torch.linalg.inv(s64 + eps * torch.eye(64, dtype=torch.float64))
    assert f.tries == 1
    assert f.damp == pytest.approx(float(eps), rel=1e-6)
    assert torch.allclose(f.hinv.double(), hinv64, rtol=1e-3, atol=1e-6 * hinv64.abs().max())
    assert torch.equal(f.upper, torch.triu(f.upper))
    assert torch.allclose((f.upper.T @ f.upper).double(), hinv64, rtol=1e-3, atol=1e-6 * hinv64.abs().max())


def test_damping_escalates_on_indefinite_matrix():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    eig = torch.ones(16)
    eig[0] = -0.5  # indefinite: 1 % and 10 % damping of mean diag (~0.9) cannot fix it
    s = q @ torch.diag(eig) @ q.T
    f = factorize(s, 0.01)
    assert f.tries >= 3
    mean_diag = float(s.diagonal().mean())
    assert f.damp == pytest.approx(0.01 * mean_diag * 10 ** (f.tries - 1), rel=1e-5)
    with pytest.raises(HessianError, match="damping"):
        factorize(s, 0.01, max_tries=2)


def test_dead_channels_are_repaired():
    s = correlated_second_moment(32, 128, 3)
    s[5, :] = 0
    s[:, 5] = 0
    f = factorize(s, 0.01)
    assert f.dead.tolist() == [i == 5 for i in range(32)]
    assert torch.isfinite(f.hinv).all()


@pytest.mark.parametrize("z_mode", ["inv_diag_sq", "inv_diag", "chol_diag_sq", "magnitude"])
def test_importance_formulas(z_mode):
    w = random_weight(8, 48, 4)
    s = correlated_second_moment(48, 200, 5)
    f = factorize(s, 0.01)
    h64 = s.double() + f.damp * torch.eye(48, dtype=torch.float64)
    hinv = torch.linalg.inv(h64)
    d = hinv.diagonal()
    # U_jj^2 = [(H_{j:,j:})^-1]_jj, the conditional inverse diagonal
    u2 = torch.stack([torch.linalg.inv(h64[j:, j:])[0, 0] for j in range(48)])
    w2 = w.double() ** 2
    expected = {"inv_diag_sq": w2 / d**2, "inv_diag": w2 / d, "chol_diag_sq": w2 / u2, "magnitude": w2}[
        z_mode
    ]
    got = importance(w, f, z_mode).double()
    assert torch.allclose(got, expected, rtol=2e-3)


@pytest.mark.parametrize("scope", ["group", "matrix"])
def test_outlier_mask_is_three_sigma(scope):
    z = random_weight(40, 300, 6).abs() ** 2
    mask = outlier_mask(z, 128, scope, 3.0)
    z64 = z.double()
    ref = torch.zeros_like(mask)
    units = [slice(0, 128), slice(128, 256), slice(256, 300)] if scope == "group" else [slice(0, 300)]
    for cols in units:
        u = z64[:, cols]
        n = u.numel()
        mu = u.sum() / n
        sd = (((u - mu) ** 2).sum() / (n - 1)).sqrt()
        ref[:, cols] = (u - mu).abs() > 3 * sd
    assert torch.equal(mask, ref)
    assert 0 < mask.float().mean() < 0.05
    lam2 = loss_weights(mask, 2.0)
    assert set(lam2.unique().tolist()) == {1.0, 4.0}
