"""Hooks on tiny_llada / tiny_dream, MCS-masked inputs, and the whole analysis on a tiny model."""

import pytest
import torch
from torch import nn

import qdllm
from qdllm.analysis.outliers import (
    LAYER_TYPES,
    OutlierSpec,
    analyze,
    capture_linear_inputs,
    linear_sites,
    masked_inputs,
    run_blocks,
    timestep_count,
)
from qdllm.calib.mcs import MCSSpec
from qdllm.errors import ConfigError


@pytest.fixture(scope="module", params=["tiny_llada", "tiny_dream"])
def dllm(request):
    return qdllm.load(request.param)


def test_hooks_capture_every_block_linear_with_its_input_shape(dllm):
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = []
    with capture_linear_inputs(dllm, lambda site, x: seen.append((site.block, site.name, tuple(x.shape)))):
        run_blocks(dllm, ids)
    # every nn.Linear inside the blocks, enumerated independently of the anatomy
    expected = [
        (index, name, (2, 9, module.in_features))
        for index, block in enumerate(dllm.blocks())
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]
    assert sorted(seen) == sorted(expected) and len(seen) == len(expected) == 7 * len(dllm.blocks())
    # layer types: 3 qkv, 1 attn_out, 2 ffn_in, 1 ffn_out per block
    kinds = [site.layer_type for site in linear_sites(dllm) if site.block == 0]
    assert [kinds.count(kind) for kind in LAYER_TYPES] == [3, 1, 2, 1]
    # the hooks are gone after the context
    seen.clear()
    run_blocks(dllm, ids)
    assert seen == []


def test_captured_qkv_input_is_the_attention_norm_of_the_embedding(dllm):
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    captured = {}
    with capture_linear_inputs(dllm, lambda site, x: captured.setdefault((site.block, site.name), x.clone())):
        run_blocks(dllm, ids)
    anatomy = dllm.anatomy()
    block0 = dllm.blocks()[0]
    with torch.no_grad():
        expected = block0.get_submodule(anatomy.attn_norm)(dllm.embed(ids))
    torch.testing.assert_close(captured[(0, anatomy.qkv[0])], expected)


def test_masked_inputs_follow_mcs():
    gen = torch.Generator().manual_seed(2)
    windows = torch.randint(1, 100, (3, 40), generator=gen)
    mcs = MCSSpec(gamma=0.25, seed=5)
    out = masked_inputs(windows, mask_token_id=0, ts=[0.0, 0.5, 1.0], mcs=mcs, max_timesteps=100)
    assert [t for t, _, _ in out] == [0.0, 0.5, 1.0]
    (_, clean, clean_mask), (_, half, half_mask), (_, full, full_mask) = out
    assert torch.equal(clean, windows) and not clean_mask.any()
    prefix = 10  # floor(0.25 * 40) stays visible
    assert not full_mask[:, :prefix].any() and full_mask[:, prefix:].all()
    assert torch.equal(full_mask, full == 0) and torch.equal(half_mask, half == 0)
    assert torch.equal(half[~half_mask], windows[~half_mask])
    assert 0.2 < half_mask[:, prefix:].float().mean() < 0.8  # Bernoulli(0.5) over 90 tokens


def test_timestep_count_puts_every_t_on_the_mcs_grid():
    assert timestep_count([0.0, 0.25, 0.5, 0.75, 1.0], 100) == 4
    assert timestep_count([0.3, 0.5], 100) == 10
    with pytest.raises(ConfigError, match="t=1.5"):
        timestep_count([1.5], 100)
    with pytest.raises(ConfigError, match="max_timesteps=100"):
        timestep_count([0.333], 100)


def test_analyze_reports_every_block_and_layer_type_per_t(dllm):
    spec = OutlierSpec(ts=(0.0, 1.0), samples=2, seqlen=16, plot_max_points=8)
    windows = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    report = analyze(dllm, windows, spec)
    n_blocks = len(dllm.blocks())
    assert len(report.records) == 2 * n_blocks * len(LAYER_TYPES)
    qkv = [rec for rec in report.records if rec["layer_type"] == "qkv"]
    assert all(len(rec["linears"]) == 3 for rec in qkv)
    # t = 1: everything past the visible prefix floor(0.25 * 16) = 4 is masked
    at_one = [rec for rec in report.records if rec["t"] == 1.0]
    assert all(rec["stats"]["mask"]["tokens"] == 2 * 12 for rec in at_one)
    assert all(rec["mask_fraction"] == pytest.approx(0.75) for rec in at_one)
    summary = report.summary()
    assert len(summary) == 2 * len(LAYER_TYPES) * 3
    assert set(report.planes) == {("original", 0.0), ("original", 1.0)}
    assert set(report.planes[("original", 0.0)]) == set(LAYER_TYPES)
    assert 0 <= report.plot_block < n_blocks


def test_the_automatic_plot_block_has_the_largest_clean_ffn_out_ratio(dllm):
    spec = OutlierSpec(ts=(0.0, 0.5), samples=2, seqlen=16)
    windows = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(4))
    report = analyze(dllm, windows, spec)
    ratios = {
        rec["block"]: rec["stats"]["all"]["max_median"]
        for rec in report.records
        if rec["t"] == 0.0 and rec["layer_type"] == "ffn_out"
    }
    assert report.plot_block == max(ratios, key=ratios.get)
    # the plotted plane is |x| of window 0 at that block's ffn_out input
    plane = report.planes[("original", 0.0)]["ffn_out"]
    assert plane.shape == (16, dllm.blocks()[0].get_submodule(dllm.anatomy().ffn_out).in_features)
    assert float(plane.min()) >= 0.0


def test_max_pool_plane_keeps_the_peaks():
    from qdllm.analysis.outlier_plots import max_pool_plane

    plane = torch.zeros(30, 100)
    plane[7, 61] = 9.0
    plane[29, 99] = 4.0
    pooled = max_pool_plane(plane, 8)
    assert pooled.shape == (8, 8)  # bins of ceil(30/8) = 4 tokens and ceil(100/8) = 13 channels
    assert pooled[7 // 4, 61 // 13] == 9.0 and pooled[29 // 4, 99 // 13] == 4.0
    assert float(pooled.sum()) == 13.0
    assert torch.equal(max_pool_plane(plane, 200), plane)
