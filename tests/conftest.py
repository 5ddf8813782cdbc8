"""Shared fixtures: seeded random weights and correlated second moments."""

import pytest
import torch


def correlated_second_moment(
    n_cols: int, n_tokens: int, seed: int, strength: float = 1.0, scale_spread: float = 1.0
) -> torch.Tensor:
    """S = X^T X / N for inputs with cross-channel correlation and log-normal channel scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_cols) + strength * torch.randn(n_cols, n_cols, generator=gen) / n_cols**0.5
    scales = torch.exp(scale_spread * torch.randn(n_cols, generator=gen))
    x = torch.randn(n_tokens, n_cols, generator=gen) @ mix * scales
    return x.T @ x / n_tokens


def random_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights (Student-t like), as LLM weights are."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w *= 1 + 3 * (torch.rand(rows, cols, generator=gen) > 0.99)
    return w


@pytest.fixture
def correlated_problem():
    return random_weight(96, 384, 1), correlated_second_moment(384, 1536, 2)


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
