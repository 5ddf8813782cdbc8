"""quantize_weight end to end: baselines, compensation, reported numbers, errors, determinism."""

import pytest
import torch

from qdllm.quant import QuantConfigError, QuantInputError, QuantSpec, quantize_weight
from qdllm.quant.compensation import propagate_error
from qdllm.quant.hessian import factorize
from qdllm.quant.methods import METHODS, get_method
from tests.conftest import correlated_second_moment, devices, random_weight


def _proxy64(w, q, s):
    d = w.double() - q.double()
    w64 = w.double()
    return float(((d @ s.double()) * d).sum() / ((w64 @ s.double()) * w64).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    w, s = random_weight(96, 384, 1), correlated_second_moment(384, 1536, 2, scale_spread=0.0)
    rtn = quantize_weight(w, s, {"method": "rtn", "bits": bits})
    gptq = quantize_weight(w, s, {"method": "gptq", "bits": bits})
    assert gptq.proxy_error < 0.9 * rtn.proxy_error
    gptq_ao = quantize_weight(
        w, s, {"method": "gptq", "bits": bits, "act_order": True, "static_groups": True}
    )
    assert gptq_ao.proxy_error < rtn.proxy_error


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False)])
def test_gptq_equals_rtn_when_inputs_are_white(bits, sym):
    w = random_weight(32, 300, 3)
    eye = torch.eye(300)
    rtn = quantize_weight(w, eye, {"method": "rtn", "bits": bits, "sym": sym})
    gptq = quantize_weight(w, eye, {"method": "gptq", "bits": bits, "sym": sym})
    assert torch.equal(rtn.weight, gptq.weight)


def test_rtn_grid_invariants():
    w = random_weight(16, 256, 4)
    r = quantize_weight(w, None, {"method": "rtn", "bits": 3, "group_size": 128}, return_state=True)
    for gi, cols in enumerate([slice(0, 128), slice(128, 256)]):
        params = r.state["params"][gi]
        block, q = w[:, cols].double(), r.weight[:, cols].double()
        assert all(len(row.unique()) <= 8 for row in q)
        assert ((block - q).abs() <= params.scale.double().unsqueeze(1) / 2 + 1e-7).all()


@pytest.mark.parametrize("method,bits", [("daq", 2), ("rtn", 4)])
def test_compensation_lowers_proxy_and_exact_beats_diag(correlated_problem, method, bits):
    """Any per-group quantizer. (2-bit min-max RTN is excluded: compensation widens the ranges it
    refits on the compensated columns, which can cost more than it saves.)"""
    w, s = correlated_problem
    base = {"method": method, "bits": bits}
    proxies = {
        m: quantize_weight(w, s, {**base, "compensation": m}).proxy_error for m in ("off", "diag", "exact")
    }
    assert proxies["diag"] < proxies["off"]
    assert proxies["exact"] < proxies["off"]
    assert proxies["exact"] <= proxies["diag"]


@pytest.mark.parametrize("start", [0, 64])
def test_exact_compensation_is_the_obs_optimum(start):
    """The update equals argmin over the free columns of the proxy, given the group's error."""
    n, g = 160, 32
    s = correlated_second_moment(n, 640, 8)
    f = factorize(s, 0.01)
    h = s.double() + f.damp * torch.eye(n, dtype=torch.float64)
    sub = h[start:, start:]  # earlier columns are fixed: the sub-problem's Hessian
    block, free = slice(0, g), slice(g, n - start)
    delta = torch.randn(5, g, generator=torch.Generator().manual_seed(start), dtype=torch.float64)
    optimum = delta @ sub[block, free] @ torch.linalg.inv(sub[free, free])
    got = propagate_error(delta.float(), f.upper, slice(start, start + g), "exact").double()
    assert torch.allclose(-got, optimum, rtol=1e-3, atol=1e-4 * optimum.abs().max())
    diag = propagate_error(delta.float(), f.upper, slice(start, start + g), "diag").double()
    assert not torch.allclose(-diag, optimum, rtol=1e-2)


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "daq"},
        {"method": "daq", "bits": 3, "compensation": "off", "abmp_ratio": 0.0},
        {"method": "daq", "abmp_ratio": 0.3, "row_center": True, "compensation": "exact"},
        {"method": "rtn", "bits": 3, "sym": True},
        {"method": "gptq", "bits": 4},
    ],
)
def test_reported_errors_and_bits_recomputed(cfg):
    w = random_weight(40, 300, 5).bfloat16()  # ragged last group of 44 columns
    s = correlated_second_moment(300, 900, 6)
    r = quantize_weight(w, s, cfg, return_state=True)
    assert r.weight.dtype == torch.bfloat16 and r.weight.shape == w.shape
    delta = w.double() - r.weight.double()
    assert r.weight_error == pytest.approx(float(delta.norm() / w.double().norm()), rel=1e-5)
    assert r.proxy_error == pytest.approx(_proxy64(w, r.weight, s), rel=1e-4)
    # bits from the stored state itself: every sign/code bit, every 16-bit scale, 8 bits per group
    n_groups = 3
    if cfg["method"] == "daq":
        stored = sum(
            c.signs.numel()
            + 16 * (c.row_scales.numel() + c.col_scales.numel())
            + (16 * c.row_mean.numel() if c.row_mean is not None else 0)
            for c in r.state["codes"]
        )
        assert set(r.orders.tolist()) <= {1, 2, 3}
        assert float((r.orders * torch.tensor([128, 128, 44])).sum()) == cfg.get("bits", 2) * 300
    else:
        bits = cfg["bits"]
        stored = bits * w.numel() + 40 * n_groups * (16 + (0 if cfg.get("sym") else bits))
    assert r.bits_per_weight == pytest.approx((stored + 8 * n_groups) / w.numel(), rel=1e-12)


def test_daq_k2_beats_rtn_and_gptq_at_two_bits(correlated_problem):
    w, s = correlated_problem
    daq = quantize_weight(w, s, {"method": "daq"})
    gptq = quantize_weight(w, s, {"method": "gptq", "bits": 2})
    assert daq.proxy_error < gptq.proxy_error


def test_table2c_switches():
    w, s = random_weight(48, 256, 9), correlated_second_moment(256, 800, 10)
    common = {"method": "daq", "compensation": "off"}
    baseline = quantize_weight(w, s, {**common, "rsr": False})
    no_dor = quantize_weight(w, s, {**common, "dor": False})
    with_dor = quantize_weight(w, s, {**common})
    assert baseline.outlier_fraction is None and no_dor.outlier_fraction is None
    assert with_dor.outlier_fraction > 0
    assert no_dor.weight_error < baseline.weight_error
    assert not torch.equal(no_dor.weight, with_dor.weight)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["rtn", "gptq", "daq"])
def test_determinism_and_dtype(device, method):
    w = random_weight(64, 256, 11).to(device, torch.float16)
    s = correlated_second_moment(256, 700, 12).to(device)
    a = quantize_weight(w, s, {"method": method, "abmp_ratio": 0.5 if method == "daq" else 0.0})
    b = quantize_weight(
        w.clone(), s.clone(), {"method": method, "abmp_ratio": 0.5 if method == "daq" else 0.0}
    )
    assert a.weight.dtype == torch.float16 and a.weight.device.type == device
    assert torch.equal(a.weight, b.weight) and torch.equal(a.orders, b.orders)


def test_dead_channels_zero_their_columns():
    w = random_weight(8, 128, 13)
    s = correlated_second_moment(128, 400, 14)
    s[3, :] = 0
    s[:, 3] = 0
    r = quantize_weight(w, s, {"method": "daq"})
    assert r.dead_channels == 1
    assert (r.weight[:, 3] == 0).all()


def test_none_is_identity():
    w = random_weight(8, 64, 15).bfloat16()
    r = quantize_weight(w, torch.eye(64), {"method": "none"})
    assert torch.equal(r.weight, w) and r.proxy_error == 0 and r.bits_per_weight == 16


@pytest.mark.parametrize(
    "weight,hessian,cfg,match",
    [
        (torch.full((4, 8), float("nan")), torch.eye(8), {"method": "rtn"}, "NaN"),
        (torch.ones(4, 8), torch.eye(7), {"method": "daq"}, "does not match"),
        (torch.ones(4, 8), torch.eye(8).fill_diagonal_(float("inf")), {"method": "daq"}, "NaN/Inf"),
        (torch.ones(4, 8), None, {"method": "daq"}, "second moment"),
        (torch.ones(4, 200), torch.eye(200), {"method": "daq", "require_full_groups": True}, "multiple"),
        (torch.ones(8), torch.eye(8), {"method": "rtn"}, "2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(weight, hessian, cfg, match):
    with pytest.raises(QuantInputError, match=match):
        quantize_weight(weight, hessian, cfg)


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"method": "quarot"}, "quant.method"),
        ({"method": "daq", "order": 0}, "quant.order"),
        ({"method": "daq", "abmp_ratio": 0.7}, "quant.abmp_ratio"),
        ({"method": "daq", "bits": 1, "abmp_ratio": 0.05}, "quant.order"),
        ({"method": "daq", "lamda": 2}, "unknown quant config key"),
        ({"method": "gptq", "compensation": "diag"}, "quant.compensation"),
        ({"method": "daq", "z_mode": "hessian"}, "quant.z_mode"),
    ],
)
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(QuantConfigError, match=field):
        quantize_weight(torch.ones(4, 8), torch.eye(8), cfg)


def test_daq_quantizes_at_the_order_its_bit_width_names():
    """`bits` is DAQ's order K (paper eq. 3): bits=3 stores three sign planes per group."""
    w, s = random_weight(16, 256, 21), correlated_second_moment(256, 800, 22)
    r = quantize_weight(w, s, {"method": "daq", "bits": 3, "abmp_ratio": 0.0}, return_state=True)
    assert r.orders.tolist() == [3, 3]
    assert [code.signs.shape[0] for code in r.state["codes"]] == [3, 3]
    explicit = quantize_weight(w, s, {"method": "daq", "bits": 3, "order": 3, "abmp_ratio": 0.0})
    assert torch.equal(r.weight, explicit.weight)


def test_order_that_contradicts_bits_names_both_fields():
    with pytest.raises(QuantConfigError, match=r"quant\.order=2.*quant\.bits=3"):
        QuantSpec.from_any({"method": "daq", "bits": 3, "order": 2})


@pytest.mark.parametrize("method", ["rtn", "gptq", "daq"])
def test_proxy_error_with_dead_channels_follows_its_definition(method):
    """Tr(dW S dW^T) / Tr(W S W^T) on the S given, where a dead channel j (S_jj = 0) contributes
    nothing, whatever the weight of its column."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(600, 128, generator=gen)
    x[:, [3, 70]] = 0
    s = x.T @ x / 600
    w = random_weight(16, 128, 24)
    w[:, [3, 70]] = 0.5  # large weights on the dead inputs: zeroed by the quantizer
    r = quantize_weight(w, s, {"method": method, "bits": 2, "abmp_ratio": 0.0})
    assert r.dead_channels == 2
    assert r.proxy_error == pytest.approx(_proxy64(w, r.weight, s), rel=1e-4)


def test_unknown_method_lists_the_known_ones():
    known = r"\['awq', 'daq', 'gptaq', 'gptq', 'none', 'rtn', 'slim'\]"
    with pytest.raises(QuantConfigError, match=r"quant\.method='quarot'.*" + known):
        QuantSpec.from_any({"method": "quarot"})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_declares_the_statistics_it_needs(name):
    """A method refuses to run without exactly the statistics its registry entry declares."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(256, 64, generator=gen)
    w, s = random_weight(8, 64, 26), x.T @ x / 256
    cfg = {"method": name, "bits": 2, "group_size": 16, "abmp_ratio": 0.0}
    full = {"cross_moment": 1e-3 * s, "inputs": x}
    quantize_weight(w, s, cfg, **full)
    for statistic, needed in (("cross_moment", method.needs_cross_moment), ("inputs", method.needs_inputs)):
        missing = {k: v for k, v in full.items() if k != statistic}
        if needed:
            with pytest.raises(QuantInputError, match=statistic):
                quantize_weight(w, s, cfg, **missing)
        else:
            quantize_weight(w, s, cfg, **missing)
    if method.needs_hessian(QuantSpec.from_any(cfg)):
        with pytest.raises(QuantInputError, match="second moment"):
            quantize_weight(w, None, cfg, **full)
    else:
        quantize_weight(w, None, cfg, **full)
    orders = torch.full((4,), 2, dtype=torch.int64)
    if method.supports_abmp:
        assert quantize_weight(w, s, cfg, orders=orders, **full).orders.tolist() == [2] * 4
    else:
        with pytest.raises(QuantInputError, match="order map"):
            quantize_weight(w, s, cfg, orders=orders, **full)
