"""GPTAQ (asymmetric calibration) against GPTQ and against the FP target it is fitted to."""

import pytest
import torch

from qdllm.quant import quantize_weight
from qdllm.quant.api import QuantInputError
from tests.conftest import random_weight


def streams(n_tokens: int, n_cols: int, seed: int, drift: float):
    """FP-model inputs X and quantized-model inputs X~ = X M + noise (a systematic drift)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_cols) + torch.randn(n_cols, n_cols, generator=gen) / n_cols**0.5
    x = torch.randn(n_tokens, n_cols, generator=gen) @ mix
    drift_map = torch.eye(n_cols) + drift * torch.randn(n_cols, n_cols, generator=gen) / n_cols**0.5
    x_q = x @ drift_map + drift * torch.randn(n_tokens, n_cols, generator=gen)
    return x.double(), x_q.double()


def output_error(q: torch.Tensor, w: torch.Tensor, x: torch.Tensor, x_q: torch.Tensor) -> float:
    """||X~ Q^T - X W^T||^2 in float64: the quantized layer on its inputs vs the FP layer on FP inputs."""
    return float(((x_q @ q.double().T - x @ w.double().T) ** 2).sum())


def moments(x, x_q):
    n = x.shape[0]
    return (x_q.T @ x_q / n).float(), ((x - x_q).T @ x_q / n).float()


def test_gptaq_equals_gptq_when_both_streams_coincide():
    w = random_weight(48, 256, 0)
    x, _ = streams(2048, 256, 1, 0.0)
    s, _ = moments(x, x)
    gptq = quantize_weight(w, s, {"method": "gptq", "bits": 2})
    gptaq = quantize_weight(w, s, {"method": "gptaq", "bits": 2}, cross_moment=torch.zeros(256, 256))
    assert torch.equal(gptq.weight, gptaq.weight) and gptaq.bits_per_weight == gptq.bits_per_weight


@pytest.mark.parametrize(("bits", "alpha"), [(8, 1.0), (4, 0.25), (3, 0.25)])
def test_gptaq_fits_the_fp_output_better_than_gptq_when_the_streams_differ(bits, alpha):
    w = random_weight(64, 256, 2)
    x, x_q = streams(4096, 256, 3, 0.3)
    s, d = moments(x, x_q)
    gptq = quantize_weight(w, s, {"method": "gptq", "bits": bits}).weight
    gptaq = quantize_weight(
        w, s, {"method": "gptaq", "bits": bits, "gptaq_alpha": alpha}, cross_moment=d
    ).weight
    assert output_error(gptaq, w, x, x_q) < output_error(gptq, w, x, x_q)


def test_full_strength_gptaq_recovers_most_of_the_input_drift():
    """Near-lossless grid (8 bits), alpha = 1: GPTQ keeps the drift error ||(X - X~) W^T||^2 while
    GPTAQ moves the weights towards the least-squares fit W + W D^T S^-1 (computed directly)."""
    w = random_weight(32, 128, 4)
    x, x_q = streams(4096, 128, 5, 0.3)
    s, d = moments(x, x_q)
    gptq = quantize_weight(w, s, {"method": "gptq", "bits": 8}).weight
    gptaq = quantize_weight(w, s, {"method": "gptaq", "bits": 8, "gptaq_alpha": 1.0}, cross_moment=d).weight
    best = w.double() + w.double() @ d.double() @ torch.linalg.inv(s.double())  # unconstrained optimum
    floor = output_error(best, w, x, x_q)
    assert output_error(gptaq, w, x, x_q) - floor < 0.5 * (output_error(gptq, w, x, x_q) - floor)


def test_gptaq_needs_the_cross_moment():
    w = random_weight(8, 64, 6)
    s, _ = moments(*streams(512, 64, 7, 0.1))
    with pytest.raises(QuantInputError, match="cross_moment"):
        quantize_weight(w, s, {"method": "gptaq"})


def test_gptaq_beats_rtn_on_correlated_inputs():
    w = random_weight(64, 256, 8)
    x, x_q = streams(4096, 256, 9, 0.1)
    s, d = moments(x, x_q)
    rtn = quantize_weight(w, s, {"method": "rtn", "bits": 2})
    gptaq = quantize_weight(w, s, {"method": "gptaq", "bits": 2}, cross_moment=d)
    assert gptaq.proxy_error < rtn.proxy_error
    assert output_error(gptaq.weight, w, x, x_q) < output_error(rtn.weight, w, x, x_q)
