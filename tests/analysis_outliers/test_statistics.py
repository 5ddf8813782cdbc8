"""Outlier statistics against closed forms and independent float64 (numpy) recomputations."""

import math

import numpy as np
import pytest
import torch

from qdllm.analysis.outliers import (
    TokenView,
    channel_max_abs,
    kurtosis,
    massive_level,
    massive_positions,
    massive_token_list,
    massive_tokens,
    max_median_ratio,
    median,
    split_stats,
    topk_channel_share,
)
from qdllm.errors import ConfigError


def _np_kurtosis(v: np.ndarray) -> float:
    v = v.astype(np.float64)
    c = v - v.mean()
    return float(np.mean(c**4) / np.mean(c**2) ** 2)


def test_kurtosis_closed_forms_per_token():
    n = 50
    p = 1 / n
    one_hot = torch.zeros(n)
    one_hot[7] = 3.0
    two_point = torch.tensor([2.0, -2.0] * (n // 2))
    rows = torch.stack([one_hot, two_point])
    # one nonzero value among n: a Bernoulli(p) sample, kurtosis (1 - 3p + 3p^2) / (p (1 - p))
    expected = torch.tensor([(1 - 3 * p + 3 * p * p) / (p * (1 - p)), 1.0], dtype=torch.float64)
    torch.testing.assert_close(kurtosis(rows, dim=-1), expected, rtol=1e-12, atol=0)


def test_kurtosis_of_samples_matches_numpy_and_the_distribution():
    gen = torch.Generator().manual_seed(0)
    n = 2_000_000
    gauss = torch.randn(n, generator=gen)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    for sample, population in ((gauss, 3.0), (laplace, 6.0)):
        value = float(kurtosis(sample.reshape(1000, -1)))  # dim=None: every element, any shape
        assert value == pytest.approx(_np_kurtosis(sample.numpy()), rel=1e-9)
        assert value == pytest.approx(population, abs=0.2)  # sampling sd ~0.035 for Laplace at this n


def test_median_matches_numpy_for_odd_and_even_counts():
    gen = torch.Generator().manual_seed(1)
    for count in (7, 8, 1):
        values = torch.randn(count, generator=gen)
        assert float(median(values)) == pytest.approx(float(np.median(values.double().numpy())), abs=0)


def test_channel_max_topk_share_and_max_median_by_hand():
    x = torch.tensor([[1.0, -2, 0, 0, 3], [1, 2, 0, 1, -3], [2, 0, 0, 0, 0]])
    torch.testing.assert_close(channel_max_abs(x), torch.tensor([2.0, 2, 0, 1, 3], dtype=torch.float64))
    # channel masses 4, 4, 0, 1, 6 of 15
    assert topk_channel_share(x, 1) == pytest.approx(6 / 15)
    assert topk_channel_share(x, 2) == pytest.approx(10 / 15)
    assert topk_channel_share(x, 5) == pytest.approx(1.0)
    # |x| sorted: 0 x7, 1 x3, 2 x3, 3 x2 (15 values): median 1
    assert max_median_ratio(x) == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="topk=6"):
        topk_channel_share(x, 6)


def _planted(seed: int = 2):
    """(2, 16, 32) Gaussian activations with three planted massive values and a mask pattern."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 32, generator=gen)
    planted = {(0, 0, 5): 5e3, (1, 9, 5): 2e4, (1, 3, 17): -1e4}  # (sample, position, channel): value
    for (b, pos, ch), value in planted.items():
        x[b, pos, ch] = value
    is_mask = torch.zeros(2, 16, dtype=torch.bool)
    is_mask[1, 8:] = True  # the second window's last half is masked: (1, 9) is a mask token
    is_mask[0, 10:12] = True
    return x, planted, is_mask


def test_massive_detection_finds_exactly_the_planted_tokens():
    x, planted, is_mask = _planted()
    level = massive_level(x, 100.0)
    assert level == pytest.approx(100 * float(np.median(np.abs(x.double().numpy()))))
    rows = torch.nonzero(massive_tokens(x, level)).reshape(-1).tolist()
    assert rows == sorted(b * 16 + pos for b, pos, _ in planted)
    view = TokenView.of(x, is_mask)
    listing = massive_token_list(view, level, limit=10)
    # largest peak first
    assert [(r["sample"], r["position"], r["channel"]) for r in listing] == [(1, 9, 5), (1, 3, 17), (0, 0, 5)]
    assert [r["is_mask"] for r in listing] == [True, False, False]
    assert [r["peak"] for r in listing] == [2e4, 1e4, 5e3]
    assert len(massive_token_list(view, level, limit=2)) == 2
    assert massive_positions(view, level, limit=10) == [[0, 1], [3, 1], [9, 1]]


def test_split_counts_and_statistics_against_numpy():
    x, planted, is_mask = _planted()
    stats = split_stats(TokenView.of(x, is_mask), topk=4, threshold=100.0)
    n_mask = int(is_mask.sum())
    counts = [stats[s]["tokens"] for s in ("all", "mask", "visible")]
    assert counts == [32, n_mask, 32 - n_mask]
    assert [stats[s]["massive_tokens"] for s in ("all", "mask", "visible")] == [3, 1, 2]  # (1, 9) is masked
    assert stats["mask"]["massive_token_share"] == pytest.approx(1 / n_mask)
    total = np.abs(x.double().numpy()).sum()
    assert stats["all"]["massive_mass_share"] == pytest.approx(sum(abs(v) for v in planted.values()) / total)
    # each subset is measured on its own tokens (own median, kurtosis, channel masses)
    for subset, rows in (("visible", ~is_mask.reshape(-1)), ("mask", is_mask.reshape(-1))):
        sub = x.reshape(-1, 32)[rows].double().numpy()
        got = stats[subset]
        assert got["kurtosis"] == pytest.approx(_np_kurtosis(sub), rel=1e-9)
        assert got["max_median"] == pytest.approx(np.abs(sub).max() / np.median(np.abs(sub)), rel=1e-12)
        token_kurt = [_np_kurtosis(row) for row in sub]
        assert got["token_kurtosis_mean"] == pytest.approx(np.mean(token_kurt), rel=1e-9)
        assert got["token_kurtosis_max"] == pytest.approx(np.max(token_kurt), rel=1e-9)
        mass = np.sort(np.abs(sub).sum(0))[::-1]
        assert got["topk_share"] == pytest.approx(mass[:4].sum() / mass.sum(), rel=1e-12)


def test_kurtosis_from_power_sums_is_accurate_with_a_nonzero_mean():
    gen = torch.Generator().manual_seed(3)
    v = 4.0 + torch.randn(64, 256, generator=gen, dtype=torch.float64) ** 3  # skewed, mean 4, std ~3.9
    per_row = kurtosis(v, dim=-1)
    torch.testing.assert_close(
        per_row, torch.tensor([_np_kurtosis(r) for r in v.numpy()], dtype=torch.float64), rtol=1e-10, atol=0
    )
    per_column = kurtosis(v, dim=0)
    torch.testing.assert_close(
        per_column,
        torch.tensor([_np_kurtosis(c) for c in v.numpy().T], dtype=torch.float64),
        rtol=1e-10,
        atol=0,
    )


def test_a_massive_value_is_judged_against_the_whole_input_median():
    # the masked tokens are all large, so their own median is large; the level is the whole input's
    x = torch.ones(1, 4, 8)
    x[0, 2:] = 500.0
    is_mask = torch.tensor([[False, False, True, True]])
    assert massive_level(x, 100.0) == pytest.approx(100 * (1 + 500) / 2)
    assert split_stats(TokenView.of(x, is_mask), topk=1, threshold=100.0)["all"]["massive_tokens"] == 0
    x[0, 3, 0] = 3e4  # > 25,050 but < 100 x the mask tokens' own median 500
    stats = split_stats(TokenView.of(x, is_mask), topk=1, threshold=100.0)
    assert (stats["mask"]["massive_tokens"], stats["visible"]["massive_tokens"]) == (1, 0)


def test_empty_subset_gives_nan_statistics_and_zero_counts():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    stats = split_stats(TokenView.of(x, torch.zeros(2, 3, dtype=torch.bool)), topk=2, threshold=100.0)
    assert stats["mask"]["tokens"] == 0 and stats["mask"]["massive_tokens"] == 0
    assert math.isnan(stats["mask"]["kurtosis"]) and math.isnan(stats["mask"]["max_median"])
    assert stats["visible"] == stats["all"]


def test_token_view_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ConfigError, match="is_mask"):
        TokenView.of(torch.zeros(2, 3, 8), torch.zeros(3, 2, dtype=torch.bool))
