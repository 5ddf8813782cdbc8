"""QuaRot: the rotated model computes the same logits, its norms are folded, its activations flatter."""

import copy

import pytest
import torch
import torch.nn.functional as F

from qdllm.models import load_dllm
from qdllm.transforms.folding import TransformError
from qdllm.transforms.hadamard import rotation
from qdllm.transforms.online import input_transform_of
from qdllm.transforms.quarot import QuaRotSpec, apply_quarot
from tests.transforms.fp64_models import (
    FAMILIES,
    SMOL_SPEC,
    exact_norms,
    fp64_tied_llada,
    fp64_tiny,
    max_to_mean,
    relative_error,
    token_ids,
)

FP64_RTOL = 1e-12  # exact transform in fp64: rounding only (measured ~1e-15)


@pytest.fixture(autouse=True)
def _exact_norms():
    with exact_norms():
        yield


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("online", [(True, True), (False, False), (True, False)])
def test_logits_unchanged_in_float64(family, online):
    dllm = fp64_tiny(family)
    ids = token_ids(256, seed=1)
    ref = dllm.logits(ids)
    report = apply_quarot(dllm, QuaRotSpec(seed=5, online_ffn_out=online[0], online_attn_out=online[1]))
    assert relative_error(dllm.logits(ids), ref) < FP64_RTOL
    assert len(report.online) == sum(online) * len(dllm.blocks())
    assert report.fallbacks == []  # 64 hidden, 4 heads of 16, FFN 192 = 12 * 16: all Hadamard


def test_the_check_sees_an_unrotated_v_bias():
    """The study's QuaRot left Dream's v_proj bias unrotated; that breaks the equivalence."""
    dllm = fp64_tiny("dream")
    ids = token_ids(256, seed=2)
    ref = dllm.logits(ids)
    v_bias = {i: b.self_attn.v_proj.bias.clone() for i, b in enumerate(dllm.blocks())}
    apply_quarot(dllm, QuaRotSpec(seed=0))
    assert relative_error(dllm.logits(ids), ref) < FP64_RTOL
    with torch.no_grad():
        for i, block in enumerate(dllm.blocks()):
            block.self_attn.v_proj.bias.copy_(v_bias[i])
    assert relative_error(dllm.logits(ids), ref) > 1e-3


def test_norms_are_folded_to_one_and_weights_are_rotated():
    dllm = fp64_tiny("dream")
    emb = dllm.embedding().weight.clone()
    apply_quarot(dllm, QuaRotSpec(seed=4))
    q = rotation(emb.shape[1], seed=4).matrix()
    torch.testing.assert_close(dllm.embedding().weight, emb @ q, rtol=0, atol=1e-14)
    for block in dllm.blocks():
        assert torch.equal(block.input_layernorm.weight, torch.ones_like(block.input_layernorm.weight))
        assert torch.equal(block.post_attention_layernorm.weight, torch.ones(64, dtype=torch.float64))
    assert torch.equal(dllm.final_norm().weight, torch.ones(64, dtype=torch.float64))


def test_unit_rms_norm_commutes_with_the_rotation():
    """rms(h Q) = rms(h): the mean square is the squared norm over d, which Q preserves."""
    h = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    q = rotation(64, seed=1).matrix()
    rms = h.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close((h @ q).square().mean(-1, keepdim=True).sqrt(), rms, rtol=1e-14, atol=0)
    norm = F.rms_norm(h, (64,), eps=1e-6)
    torch.testing.assert_close(F.rms_norm(h @ q, (64,), eps=1e-6), norm @ q, rtol=0, atol=1e-13)


def test_tied_embedding_and_head_are_untied():
    dllm = fp64_tied_llada()
    ids = token_ids(256, seed=3)
    ref = dllm.logits(ids)
    report = apply_quarot(dllm, QuaRotSpec(seed=1))
    assert report.untied_head and not dllm.model.config.weight_tying
    assert dllm.lm_head_weight() is not dllm.embedding().weight
    assert relative_error(dllm.logits(ids), ref) < FP64_RTOL


def test_later_hooks_see_the_rotated_input_the_weight_multiplies():
    dllm = fp64_tiny("ar_dllm")
    apply_quarot(dllm, QuaRotSpec(seed=0))
    down = dllm.blocks()[0].mlp.down_proj
    assert input_transform_of(down) is not None
    seen = {}
    down.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    down.register_forward_hook(lambda m, args, out: seen.update(y=out))
    dllm.logits(token_ids(256, seed=4))
    torch.testing.assert_close(seen["y"], F.linear(seen["x"], down.weight), rtol=0, atol=1e-14)


def test_deep_copy_keeps_the_online_transforms():
    dllm = fp64_tiny("llada")
    ids = token_ids(256, seed=5)
    ref = dllm.logits(ids)
    apply_quarot(dllm, QuaRotSpec(seed=0))
    blocks = dllm.blocks()
    for i in range(len(blocks)):
        blocks[i] = copy.deepcopy(blocks[i])
    assert relative_error(dllm.logits(ids), ref) < FP64_RTOL


def test_a_massive_residual_channel_is_spread_at_the_qkv_input():
    dllm = fp64_tiny("llada")
    with torch.no_grad():
        dllm.embedding().weight[:, 3] += 40.0  # one massive channel in every token's residual
    ids = token_ids(256, seed=6)
    q_proj = dllm.blocks()[0].q_proj
    seen = []
    q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    dllm.logits(ids)
    apply_quarot(dllm, QuaRotSpec(seed=0))
    dllm.logits(ids)
    before, after = seen
    assert max_to_mean(before) > 20 and max_to_mean(after) < max_to_mean(before) / 5


def test_bad_spec_and_layer_norm_are_refused():
    with pytest.raises(TransformError, match="quarot.seed"):
        QuaRotSpec(seed="0")
    with pytest.raises(TransformError, match="quarot.online_ffn_out"):
        QuaRotSpec(online_ffn_out=1)
    dllm = fp64_tiny("ar_dllm")
    dllm.model.model.norm = torch.nn.LayerNorm(64, dtype=torch.float64)
    with pytest.raises(TransformError, match="final norm: LayerNorm is not an RMSNorm"):
        apply_quarot(dllm, QuaRotSpec())


@pytest.mark.slow
def test_smol_dllm_logits_unchanged_in_float32():
    dllm = load_dllm(SMOL_SPEC)
    ids = token_ids(dllm.model.config.vocab_size, seed=7, batch=1, length=24)
    ref = dllm.logits(ids)
    report = apply_quarot(dllm, QuaRotSpec(seed=0))
    assert report.untied_head and report.fallbacks == ["heads (9)"]  # 9 heads: Haar factor
    assert dllm.lm_head_weight() is not dllm.embedding().weight
    assert not dllm.model.config.tie_word_embeddings
    assert relative_error(dllm.logits(ids), ref) < 3e-4  # fp32 rounding through 30 blocks (~4e-5 seen)
