"""DAQ: RSR monotonicity, exact closed forms, sign search against brute force."""

import itertools

import pytest
import torch

from qdllm.quant.daq import (
    binary_rc_init,
    daq_quantize,
    rsr_scales,
    sign_search,
)


def weighted_loss(w: torch.Tensor, q: torch.Tensor, lam2: torch.Tensor | None) -> torch.Tensor:
    """(G,) DAQ loss sum Lambda^2 (W - Q)^2 (paper eq. 6) of (G, R, C) units; lam2=None: Lambda = 1."""
    err = (w - q).square()
    if lam2 is not None:
        err = err * lam2
    return err.sum((-2, -1))


def _units(g=3, r=12, c=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, r, c, generator=gen) * 0.02
    lam2 = (1 + (torch.rand(g, r, c, generator=gen) > 0.9).float()) ** 2
    return w, lam2


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("use_dor", [False, True])
def test_rsr_never_increases_weighted_loss(order, use_dor):
    w, lam2 = _units(seed=order)
    lam2 = lam2 if use_dor else None
    code = binary_rc_init(w, order, 1e-7)
    losses = [weighted_loss(w, code.dequantize(), lam2)]
    for _ in range(8):
        code = rsr_scales(w, lam2, code, 1e-7)
        losses.append(weighted_loss(w, code.dequantize(), lam2))
        code.signs = sign_search(w, code.row_scales, code.col_scales)
        losses.append(weighted_loss(w, code.dequantize(), lam2))
    for before, after in zip(losses, losses[1:]):
        assert (after <= before * (1 + 1e-5) + 1e-12).all()
    assert (losses[-1] < losses[0]).all()


def test_row_and_column_updates_are_weighted_least_squares():
    """Eq. 8-9 against a float64 lstsq per row / per column (order 2, residual form)."""
    w, lam2 = _units(g=1, r=6, c=10, seed=7)
    code = binary_rc_init(w, 2, 1e-7)
    new = rsr_scales(w, lam2, code, 1e-12)
    w64, l64 = w[0].double(), lam2[0].double()
    a = code.row_scales[:, 0].double().clone()
    c = code.col_scales[:, 0].double().clone()
    b = code.signs[:, 0].double()
    for k in range(2):
        other = 1 - k
        resid = w64 - a[other, :, None] * c[other, None, :] * b[other]
        sw = l64.sqrt()
        for i in range(6):  # row update: min_a sum_j lam2 (resid_ij - a c_j B_ij)^2
            design = (sw[i] * c[k] * b[k, i]).unsqueeze(1)
            a[k, i] = torch.linalg.lstsq(design, (sw[i] * resid[i]).unsqueeze(1)).solution.item()
        for j in range(10):  # column update with the new row scales
            design = (sw[:, j] * a[k] * b[k, :, j]).unsqueeze(1)
            c[k, j] = torch.linalg.lstsq(design, (sw[:, j] * resid[:, j]).unsqueeze(1)).solution.item()
    assert torch.allclose(new.row_scales[:, 0].double(), a, rtol=1e-4, atol=1e-9)
    assert torch.allclose(new.col_scales[:, 0].double(), c, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sign_search_equals_brute_force(order):
    gen = torch.Generator().manual_seed(order)
    w = torch.randn(2, 5, 7, generator=gen)
    a = torch.randn(order, 2, 5, generator=gen)  # signed scales: the search must handle them
    c = torch.rand(order, 2, 7, generator=gen) + 0.1
    signs = sign_search(w, a, c)
    for g, i, j in itertools.product(range(2), range(5), range(7)):
        best, best_err = None, float("inf")
        for pattern in itertools.product([1.0, -1.0], repeat=order):
            v = sum(p * float(a[k, g, i]) * float(c[k, g, j]) for k, p in enumerate(pattern))
            err = abs(float(w[g, i, j]) - v)
            if err < best_err - 1e-12:
                best, best_err = pattern, err
        assert tuple(signs[:, g, i, j].tolist()) == best


def test_greedy_init_is_classic_binarisation_for_order_one():
    """K = 1: B = sign(W), a_i = mean_j |W_ij|, c_j = mean_i |W_ij| / a_i (ARB-RC init)."""
    w, _ = _units(g=1, r=4, c=6, seed=3)
    code = binary_rc_init(w, 1, 1e-7)
    w64 = w[0].double()
    a = w64.abs().mean(1)
    c = (w64.abs() / a[:, None]).mean(0)
    assert torch.allclose(code.row_scales[0, 0].double(), a, rtol=1e-6)
    assert torch.allclose(code.col_scales[0, 0].double(), c, rtol=1e-6)
    assert torch.equal(code.signs[0, 0], torch.where(w[0] >= 0, 1.0, -1.0))


def test_higher_order_fits_better_and_row_centring_is_included():
    w, lam2 = _units(g=2, r=32, c=64, seed=9)
    errs = [weighted_loss(w, daq_quantize(w, k, lam2, 10, 1e-7).dequantize(), lam2).sum() for k in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    shifted = w + 0.05  # a row offset the binary planes cannot express cheaply
    plain = daq_quantize(shifted, 1, None, 10, 1e-7).dequantize()
    centred = daq_quantize(shifted, 1, None, 10, 1e-7, row_center=True)
    assert centred.row_mean is not None
    assert (centred.dequantize() - shifted).norm() < (plain - shifted).norm()


def test_scales_are_rounded_to_storage_dtype():
    w, lam2 = _units(seed=11)
    code = daq_quantize(w, 2, lam2, 3, 1e-7, scale_dtype=torch.float16)
    assert torch.equal(code.row_scales, code.row_scales.half().float())
    assert torch.equal(code.col_scales, code.col_scales.half().float())
