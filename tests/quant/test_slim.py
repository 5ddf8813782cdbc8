"""SliM-LLM: exact average bits, salience-ordered allocation, SQC search, binarisation, quality."""

import pytest
import torch

from qdllm.quant import quantize_weight
from qdllm.quant.api import QuantInputError
from qdllm.quant.slim import (
    SQC_GRID,
    allocate_bits,
    binarize_params,
    choose_k,
    output_kl,
    rtn_mixed,
    sqc_params,
)
from qdllm.quant.uniform import find_params
from tests.conftest import random_weight


def correlated_inputs(n_tokens: int, n_cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_cols) + torch.randn(n_cols, n_cols, generator=gen) / n_cols**0.5
    scales = torch.exp(0.5 * torch.randn(n_cols, generator=gen))
    return torch.randn(n_tokens, n_cols, generator=gen) @ mix * scales


def test_allocation_keeps_the_average_and_follows_salience():
    salience = torch.tensor([5.0, 0.1, 9.0, 3.0, 0.5, 7.0])
    alloc = allocate_bits(salience, 2, 2)
    assert alloc.tolist() == [2, 1, 3, 2, 1, 3] and alloc.float().mean() == 2


def test_salient_groups_get_more_bits_end_to_end():
    w = random_weight(64, 512, 0)
    w[:, 128:256] *= 8  # group 1 carries most of the salience
    x = correlated_inputs(2048, 512, 1)
    r = quantize_weight(w, x.T @ x / 2048, {"method": "slim", "bits": 2}, inputs=x[:512])
    orders = r.orders.tolist()
    assert orders[1] == 3 and sum(orders) == 2 * len(orders)  # the exact average of 2 bits per weight
    assert orders.count(1) == orders.count(3) >= 1


def test_sqc_picks_the_best_range_of_the_grid_for_every_row():
    x = random_weight(6, 128, 2)
    weights = torch.ones_like(x)
    chosen = sqc_params(x, 2, weights, torch.float16).fake_quantize(x)
    chosen_loss = ((x - chosen).abs() ** 2.4).sum(1)
    every = torch.stack(
        [
            ((x - find_params(x, 2, False, torch.float16, float(p)).fake_quantize(x)).abs() ** 2.4).sum(1)
            for p in SQC_GRID
        ]
    )
    torch.testing.assert_close(chosen_loss, every.min(0).values)
    plain = ((x - find_params(x, 2, False, torch.float16).fake_quantize(x)).abs() ** 2.4).sum(1)
    assert (chosen_loss <= plain + 1e-6).all()


def test_binarisation_closed_form():
    x = torch.tensor([[1.0, 3.0, -2.0, 6.0]])
    params = binarize_params(x, torch.float32)
    mean, scale = 2.0, (1 + 1 + 4 + 4) / 4
    assert params.mean.item() == mean and params.scale.item() == scale
    assert params.fake_quantize(x).tolist() == [[mean - scale, mean + scale, mean - scale, mean + scale]]


def test_choose_k_is_the_argmin_of_the_output_kl():
    w = random_weight(32, 640, 3)
    x = correlated_inputs(512, 640, 4)
    salience = torch.rand(5, generator=torch.Generator().manual_seed(5))
    k = choose_k(w, salience, 2, 128, x, torch.float16)
    kls = {
        c: output_kl(w, rtn_mixed(w, allocate_bits(salience, c, 2), 128, torch.float16), x) for c in (1, 2)
    }
    assert k == min(kls, key=kls.get)


def test_slim_beats_rtn_on_correlated_inputs_and_needs_inputs():
    w = random_weight(96, 768, 6)
    x = correlated_inputs(4096, 768, 7)
    s = x.T @ x / 4096
    rtn = quantize_weight(w, s, {"method": "rtn", "bits": 2})
    slim = quantize_weight(w, s, {"method": "slim", "bits": 2}, inputs=x[:1024])
    assert slim.proxy_error < rtn.proxy_error
    with pytest.raises(QuantInputError, match="inputs"):
        quantize_weight(w, s, {"method": "slim", "bits": 2})
