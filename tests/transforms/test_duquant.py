"""DuQuant: smoothing + greedy block rotations + zigzag permutation, exact in FP, flatter activations."""

import math

import pytest
import torch
import torch.nn.functional as F

from qdllm.models import load_dllm
from qdllm.transforms.duquant import (
    DuQuantSpec,
    apply_duquant,
    block_transform,
    greedy_rotations,
    smoothing_scales,
    zigzag_permutation,
)
from qdllm.transforms.folding import TransformError
from qdllm.transforms.online import input_transform_of
from tests.transforms.fp64_models import (
    FAMILIES,
    SMOL_SPEC,
    exact_norms,
    fp64_tiny,
    input_absmax,
    kurtosis,
    linear_names,
    max_to_mean,
    relative_error,
    token_ids,
)

FP64_RTOL = 1e-12


@pytest.fixture(autouse=True)
def _exact_norms():
    with exact_norms():
        yield


def _massive_activation(tokens: int, channels: int, seed: int) -> torch.Tensor:
    """Gaussian activations with one massive channel on a few tokens (the ffn_out pattern)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=gen, dtype=torch.float64)
    x[:: tokens // 8, 37 % channels] = 300.0
    return x


@pytest.mark.parametrize("family", FAMILIES)
# block 16: several blocks; 24: ragged tails (64 = 2 * 24 + 16, 192 = 8 * 24); 128: one block (64 channels)
@pytest.mark.parametrize("block_size", [16, 24, 128])
def test_logits_unchanged_in_float64(family, block_size):
    dllm = fp64_tiny(family)
    calib, ids = token_ids(256, seed=10, batch=4, length=32), token_ids(256, seed=11)
    absmax = input_absmax(dllm, calib)
    ref = dllm.logits(ids)
    report = apply_duquant(dllm, DuQuantSpec(block_size=block_size, steps=32), absmax)
    assert relative_error(dllm.logits(ids), ref) < FP64_RTOL
    assert len(report.sites) == 4 * len(dllm.blocks())
    for site in report.sites:
        assert site.rotated_estimate <= site.smoothed_absmax * (1 + 1e-12)


@pytest.mark.parametrize("smooth,permute", [(False, False), (False, True), (True, False)])
def test_variants_are_exact_too(smooth, permute):
    dllm = fp64_tiny("dream")  # GQA: smoothing of the attn_out input is shared per KV head
    absmax = input_absmax(dllm, token_ids(256, seed=12, batch=4, length=32))
    ids = token_ids(256, seed=13)
    ref = dllm.logits(ids)
    apply_duquant(dllm, DuQuantSpec(block_size=16, steps=16, smooth=smooth, permute=permute), absmax)
    assert relative_error(dllm.logits(ids), ref) < FP64_RTOL


def test_smoothing_is_folded_and_flattens_the_channel_maxima():
    dllm = fp64_tiny("llada")
    calib = token_ids(256, seed=14, batch=4, length=32)
    absmax = input_absmax(dllm, calib)
    spec = DuQuantSpec(steps=0, permute=False)  # smoothing only (identity rotations)
    gains = [b.attn_norm.weight.clone() for b in dllm.blocks()]
    w_max = [
        torch.cat([b.q_proj.weight, b.k_proj.weight, b.v_proj.weight]).abs().amax(0) for b in dllm.blocks()
    ]
    apply_duquant(dllm, spec, absmax)
    after = input_absmax(dllm, calib)
    for i, block in enumerate(dllm.blocks()):
        name = linear_names(dllm)[7 * i]  # q_proj of block i
        s = absmax[name].double().sqrt() / w_max[i].sqrt()  # alpha 0.5, by hand
        torch.testing.assert_close(block.attn_norm.weight, gains[i] / s, rtol=1e-12, atol=0)
        # the q_proj input after the transform is x / s: its maxima are sqrt(m * max|W|)
        torch.testing.assert_close(after[name].double(), absmax[name].double() / s, rtol=1e-5, atol=0)


def test_greedy_rotation_spreads_massive_channels_to_the_rms():
    maxima = torch.ones(3, 128, dtype=torch.float64)
    maxima[0, 5] = 1000.0
    maxima[1, [5, 70]] = torch.tensor([1000.0, 500.0], dtype=torch.float64)
    r, a = greedy_rotations(torch.diag_embed(maxima.square()), steps=256)
    eye = torch.eye(128, dtype=torch.float64).expand(3, 128, 128)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye, rtol=0, atol=1e-12)
    # independent recomputation of the estimate: (R^T diag(m^2) R)_jj = sum_i R_ij^2 m_i^2
    estimate = torch.diagonal(a, dim1=1, dim2=2).sqrt()
    torch.testing.assert_close(
        estimate, (r.square() * maxima.square()[:, :, None]).sum(1).sqrt(), rtol=1e-10, atol=0
    )
    rms = maxima.square().mean(-1).sqrt()  # the best any orthogonal R can reach
    torch.testing.assert_close(estimate.amax(-1), rms, rtol=1e-6, atol=0)
    assert torch.equal(r[2], eye[2])  # flat block: nothing to do
    # one massive channel reaches all n channels after n - 1 pair rotations, not before
    one = torch.diag_embed(maxima[:1].square())
    assert torch.diagonal(greedy_rotations(one, 127)[1], dim1=1, dim2=2).max().sqrt() < 1.000001 * rms[0]
    assert torch.diagonal(greedy_rotations(one, 126)[1], dim1=1, dim2=2).max().sqrt() > 1.1 * rms[0]
    r0, a0 = greedy_rotations(torch.diag_embed(maxima.square()), steps=0)
    assert torch.equal(r0, eye) and torch.equal(torch.diagonal(a0, dim1=1, dim2=2), maxima.square())


def test_greedy_rotation_spreads_correlated_channels():
    """A rank-1 covariance b b^T (32 channels carrying one token's outlier, as after B1 and the
    zigzag): every channel of b R ends at |b| / sqrt(n)."""
    b = torch.zeros(1, 128, dtype=torch.float64)
    b[0, :32] = 26.5 * torch.tensor([1.0, -1.0]).repeat(16)
    r, a = greedy_rotations(b[:, :, None] * b[:, None, :], steps=128)
    rotated = torch.einsum("bi,bij->bj", b, r)
    torch.testing.assert_close(
        rotated.abs(), torch.full((1, 128), 26.5 / 2, dtype=torch.float64), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(torch.diagonal(a, dim1=1, dim2=2), rotated.square(), rtol=1e-9, atol=1e-12)


def test_zigzag_permutation_hand_computed():
    # channel i has the i-th largest maximum; blocks of 4 over 10 channels (sizes 4, 4, 2):
    # pass 0 -> blocks 0,1,2 get ranks 0,1,2; pass 1 (reversed) -> 2,1,0 get 3,4,5;
    # pass 2 -> 0,1 get 6,7 (block 2 full); pass 3 (reversed) -> 1,0 get 8,9
    maxima = torch.arange(10, 0, -1, dtype=torch.float64)
    perm = zigzag_permutation(maxima, 4)
    assert perm.tolist() == [0, 5, 6, 9, 1, 4, 7, 8, 2, 3]
    shuffled = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert zigzag_permutation(maxima[shuffled], 4).tolist() == shuffled.argsort()[perm].tolist()


def test_zigzag_balances_outlier_mass_across_blocks():
    gen = torch.Generator().manual_seed(1)
    maxima = torch.rand(1024, generator=gen, dtype=torch.float64).pow(4) * 100  # heavy-tailed
    perm = zigzag_permutation(maxima, 128)
    assert sorted(perm.tolist()) == list(range(1024))
    sums_before, sums_after = maxima.reshape(8, 128).sum(1), maxima[perm].reshape(8, 128).sum(1)
    assert (sums_after.max() - sums_after.min()) < 0.1 * (sums_before.max() - sums_before.min())


@pytest.mark.parametrize("channels,block_size", [(256, 128), (192, 128), (40, 16), (12, 128)])
def test_block_rotation_equals_its_dense_matrix(channels, block_size):
    x = _massive_activation(64, channels, seed=2)
    transform, _ = block_transform(x.abs().amax(0), DuQuantSpec(block_size=block_size))
    n = min(block_size, channels)
    sizes = [min(n, channels - b * n) for b in range(math.ceil(channels / n))]
    b1 = torch.block_diag(*[transform.r1[b, :k, :k] for b, k in enumerate(sizes)])
    b2 = torch.block_diag(*[transform.r2[b, :k, :k] for b, k in enumerate(sizes)])
    p = torch.zeros(channels, channels, dtype=torch.float64)
    p[transform.perm, torch.arange(channels)] = 1.0  # (x P)_k = x_perm[k]
    dense = b1 @ p @ b2
    torch.testing.assert_close(dense @ dense.T, torch.eye(channels, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(transform(x), x @ dense, rtol=0, atol=1e-11)
    assert transform(x.float()).dtype == torch.float32


def test_rotation_reduces_kurtosis_and_max_to_mean_of_a_massive_channel():
    x = _massive_activation(256, 512, seed=3)
    spec = DuQuantSpec()
    transform, estimate = block_transform(x.abs().amax(0), spec)
    y = transform(x)
    assert kurtosis(x) > 100 and kurtosis(y) < kurtosis(x) / 10
    assert max_to_mean(y) < max_to_mean(x) / 5
    # B1 spreads the massive channel over its block, the zigzag deals that block out, B2 spreads it
    # over all 512 channels: the massive tokens end near 300 / sqrt(512), as estimated
    spread = 300 / math.sqrt(512)
    assert y[:: 256 // 8].abs().max() < 1.5 * spread
    assert spread < estimate.max() < 1.15 * spread


def test_seeded_inputs_give_identical_transforms():
    absmax = _massive_activation(64, 384, seed=4).abs().amax(0)
    a, _ = block_transform(absmax, DuQuantSpec())
    b, _ = block_transform(absmax.clone(), DuQuantSpec())
    assert torch.equal(a.r1, b.r1) and torch.equal(a.perm, b.perm) and torch.equal(a.r2, b.r2)


def test_smoothing_scales_closed_form():
    m = torch.tensor([4.0, 0.0, 9.0], dtype=torch.float64)
    w = torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64)
    s = smoothing_scales(m, w, alpha=0.5, min_scale=1e-4)
    torch.testing.assert_close(s, torch.tensor([2.0, 1e-2 / 2.0, 3.0 / 1e-2], dtype=torch.float64))


def test_online_transform_runs_before_later_hooks():
    dllm = fp64_tiny("ar_dllm")
    absmax = input_absmax(dllm, token_ids(256, seed=15, batch=2, length=16))
    apply_duquant(dllm, DuQuantSpec(block_size=16), absmax)
    block = dllm.blocks()[1]
    q, k = block.self_attn.q_proj, block.self_attn.k_proj
    assert input_transform_of(q) is input_transform_of(k) is not None  # one T per site
    seen = {}
    q.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    q.register_forward_hook(lambda m, args, out: seen.update(y=out))
    dllm.logits(token_ids(256, seed=16))
    torch.testing.assert_close(seen["y"], F.linear(seen["x"], q.weight), rtol=0, atol=1e-14)


def test_bad_inputs_are_refused():
    for kwargs, field in [
        ({"alpha": 1.5}, "alpha"),
        ({"block_size": 1}, "block_size"),
        ({"steps": -1}, "steps"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"permute": "yes"}, "permute"),
    ]:
        with pytest.raises(TransformError, match=f"duquant.{field}"):
            DuQuantSpec(**kwargs)
    dllm = fp64_tiny("llada")
    absmax = input_absmax(dllm, token_ids(256, seed=17))
    missing = {k: v for k, v in absmax.items() if not k.endswith(("q_proj", "k_proj", "v_proj"))}
    with pytest.raises(TransformError, match="no entry for model.transformer.blocks.0.q_proj"):
        apply_duquant(dllm, DuQuantSpec(), missing)
    wrong = dict(absmax)
    wrong["model.transformer.blocks.0.attn_out"] = torch.ones(32)
    with pytest.raises(TransformError, match="expected 64 finite nonnegative"):
        apply_duquant(fp64_tiny("llada"), DuQuantSpec(), wrong)


@pytest.mark.slow
def test_smol_dllm_logits_unchanged_in_float32():
    dllm = load_dllm(SMOL_SPEC)
    vocab = dllm.model.config.vocab_size
    absmax = input_absmax(dllm, token_ids(vocab, seed=18, batch=1, length=32))
    ids = token_ids(vocab, seed=19, batch=1, length=24)
    ref = dllm.logits(ids)
    report = apply_duquant(dllm, DuQuantSpec(), absmax)  # 576 = 4.5 blocks of 128: a ragged tail
    assert relative_error(dllm.logits(ids), ref) < 3e-4  # fp32 rounding through 30 blocks
    down = [s for s in report.sites if s.linears[0].endswith("down_proj")]
    assert all(s.rotated_estimate < s.smoothed_absmax for s in down)
