"""SmoothQuant: eq. 4 in closed form, exact functional invariance (float64), activation maxima, registry."""

from pathlib import Path

import pytest
import torch

from qdllm.errors import ConfigError
from qdllm.models import load_dllm
from qdllm.pipeline import PipelineSpec, quantize_model
from qdllm.pipeline.transform import activation_absmax, transform_model
from qdllm.transforms import SMOOTH_SITES, TransformSpec, get_transform
from qdllm.transforms.smooth import apply_smoothquant, smoothing_scales
from tests.pipeline.conftest import quantize_killed_after_block_zero

SMOL = Path(__file__).resolve().parents[2] / "assets" / "smol_dllm"
ALL_SITES = list(SMOOTH_SITES)


def test_scales_match_equation_4_and_leave_dead_channels_alone():
    a, w = torch.tensor([4.0, 1.0, 0.0, 9.0, 8.0]), torch.tensor([1.0, 4.0, 2.0, 0.0, 2.0])
    # alpha 0.5: sqrt(a) / sqrt(w); channel 2 (never active) and 3 (no weight) keep s = 1
    torch.testing.assert_close(smoothing_scales(a, w, 0.5), torch.tensor([2.0, 0.5, 1.0, 1.0, 2.0]))
    # alpha 0.75: a^0.75 / w^0.25, e.g. 8^0.75 / 2^0.25 = 2^2.25 / 2^0.25 = 4
    torch.testing.assert_close(smoothing_scales(a, w, 0.75)[4], torch.tensor(4.0))
    assert smoothing_scales(a, w, 0.0)[1] == 0.25  # alpha 0: s = 1 / max|W| (all onto activations)


def _float64_model(spec: dict, seed: int):
    """The model in float64 with random norm weights and biases (random-init norms are all ones and
    biases zero, which would hide a fold that forgets them) and wide activation ranges."""
    dllm = load_dllm(spec)
    dllm.model.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    anatomy = dllm.anatomy()
    with torch.no_grad():
        for block in dllm.blocks():
            for norm in (anatomy.attn_norm, anatomy.ffn_norm):
                weight = block.get_submodule(norm).weight
                weight.copy_(torch.exp(torch.randn(weight.shape, generator=gen, dtype=torch.float64)))
            for name in (*anatomy.qkv, anatomy.attn_out, *anatomy.ffn_in, anatomy.ffn_out):
                bias = block.get_submodule(name).bias
                if bias is not None:
                    bias.copy_(0.1 * torch.randn(bias.shape, generator=gen, dtype=torch.float64))
    return dllm


def _states(dllm, seed: int, n: int = 4, length: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = dllm.lm_head_weight().shape[0]
    states = torch.randint(0, min(vocab, dllm.mask_token_id), (n, length), generator=gen)
    masked = torch.rand(n, length, generator=gen) < torch.linspace(0.1, 0.9, n)[:, None]
    return states.masked_fill(masked, dllm.mask_token_id)


def _weights(dllm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in dllm.model.state_dict().items()}


def _check_invariance(dllm, seed: int, sites: list[str]) -> dict:
    states = _states(dllm, seed)
    reference, before = dllm.logits(states), _weights(dllm)
    report = transform_model(
        dllm, states, TransformSpec(name="smoothquant", sites=sites), PipelineSpec(progress=False)
    )
    torch.testing.assert_close(dllm.logits(states), reference, rtol=1e-9, atol=1e-9)
    after = dllm.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # the fold moved real mass: some weights change by tens of percent, not by rounding
    assert max(((after[k] - before[k]).abs().max() / before[k].abs().max()).item() for k in changed) > 0.3
    assert report["scale_max"] / report["scale_min"] > 10
    return report | {"changed": changed}


def test_smoothing_llada_is_exact_and_folds_every_site():
    """tiny_llada is MHA: all four sites fold, attn_out into v_proj's rows."""
    dllm = _float64_model({"family": "llada"}, seed=0)
    report = _check_invariance(dllm, 1, ALL_SITES)
    assert report["folded"] == {site: 2 for site in ALL_SITES} and report["skipped"] == {}
    assert "model.transformer.blocks.0.v_proj.weight" in report["changed"]


def test_smoothing_dream_with_gqa_is_exact_and_skips_attn_out():
    dllm = _float64_model({"family": "dream"}, seed=2)  # 4 query heads, 2 kv heads, q/k/v biases
    v_before = dllm.blocks()[0].self_attn.v_proj.weight.clone()
    report = _check_invariance(dllm, 3, ALL_SITES)
    assert report["folded"] == {"qkv": 2, "ffn_in": 2, "ffn_out": 2}
    assert "GQA" in report["skipped"]["attn_out"]
    # v_proj's columns take the qkv scales, its rows nothing: each row is a positive multiple per column
    ratio = dllm.blocks()[0].self_attn.v_proj.weight / v_before
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)


def test_smoothing_dream_without_gqa_folds_attn_out_into_the_v_bias():
    dllm = _float64_model({"family": "dream", "tiny": {"heads": 4, "kv_heads": 4}}, seed=4)
    v_bias = dllm.blocks()[1].self_attn.v_proj.bias.clone()
    report = _check_invariance(dllm, 5, ALL_SITES)
    assert report["folded"]["attn_out"] == 2
    assert not torch.equal(dllm.blocks()[1].self_attn.v_proj.bias, v_bias)


@pytest.mark.skipif(not SMOL.is_dir(), reason="assets/smol_dllm is not here")
@pytest.mark.slow
def test_smoothing_smol_dllm_is_exact():
    """The real dLLM (SmolLM2 layout: 9 query heads, 3 kv heads, tied embeddings), in float64."""
    dllm = load_dllm({"name": "smol_dllm", "family": "ar_dllm", "source": str(SMOL)})
    dllm.model.to(torch.float64)
    states = _states(dllm, 6, n=2, length=16)
    reference = dllm.logits(states)
    report = transform_model(dllm, states, TransformSpec(name="smoothquant", sites=ALL_SITES))
    assert report["folded"] == {"qkv": 30, "ffn_in": 30, "ffn_out": 30} and "attn_out" in report["skipped"]
    torch.testing.assert_close(dllm.logits(states), reference, rtol=1e-9, atol=1e-9)


def test_alpha_one_half_balances_activation_and_weight_maxima():
    """After smoothing with alpha 0.5, max|X_c| = sqrt(a_c w_c) = max|W_c| for every channel
    (eq. 4: X_c / s_c and W_c * s_c), measured again on the smoothed model."""
    dllm = _float64_model({"family": "llada"}, seed=7)
    states = _states(dllm, 8)
    transform_model(dllm, states, TransformSpec(name="smoothquant", alpha=0.5, sites=["qkv", "ffn_in"]))
    after = activation_absmax(dllm, states)
    names = dllm.module_names()
    for block in dllm.blocks():
        for group in (("q_proj", "k_proj", "v_proj"), ("ff_proj", "up_proj")):
            linears = [block.get_submodule(n) for n in group]
            weight_max = torch.stack([m.weight.abs().amax(0) for m in linears]).amax(0).float()
            torch.testing.assert_close(after[names[id(linears[0])]], weight_max, rtol=1e-5, atol=0)


@pytest.mark.parametrize("pipeline", [{}, {"cache_device": "cpu", "batch_size": 3}, {"cache_device": "disk"}])
def test_activation_absmax_matches_a_full_forward(pipeline):
    dllm = load_dllm({"family": "dream"})
    states = _states(dllm, 9, n=5)
    seen: dict[str, torch.Tensor] = {}
    names = dllm.module_names()
    for block in dllm.blocks():
        for stage in dllm.stages:
            for name in stage.linears:
                module = block.get_submodule(name)
                key = names[id(module)]

                def record(_m, args, key=key):
                    x = args[0].detach().abs().reshape(-1, args[0].shape[-1])
                    seen[key] = torch.maximum(seen.get(key, x.amax(0)), x.amax(0))

                module.register_forward_pre_hook(record)
    for row in states:  # one state at a time through the whole model
        dllm.logits(row[None])
    for hook_owner in dllm.model.modules():
        hook_owner._forward_pre_hooks.clear()
    absmax = activation_absmax(dllm, states, PipelineSpec(progress=False, **pipeline))
    assert set(absmax) == set(seen) and len(seen) == 14
    for key in seen:
        assert absmax[key].dtype == torch.float32
        torch.testing.assert_close(absmax[key], seen[key], rtol=1e-6, atol=1e-6)


def test_a_resumed_smoothquant_run_gives_identical_weights(tmp_path, monkeypatch):
    """The transform is applied again to the fresh FP model; the block checkpoints then resume."""
    cfg = {"method": "rtn", "bits": 4, "group_size": -1}
    spec = PipelineSpec(progress=False, checkpoint_dir=str(tmp_path))
    transform = TransformSpec(name="smoothquant")

    def fresh():
        dllm = load_dllm({"family": "llada"})
        return dllm, _states(dllm, 10)

    whole, states = fresh()
    transform_model(whole, states, transform)
    quantize_model(whole, states, cfg, PipelineSpec(progress=False))
    killed, states = fresh()
    transform_model(killed, states, transform)
    quantize_killed_after_block_zero(monkeypatch, killed, states, cfg, spec, KeyboardInterrupt())
    resumed, states = fresh()
    transform_model(resumed, states, transform)
    report = quantize_model(resumed, states, cfg, spec)
    assert report.blocks_resumed == 1
    expected = whole.model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in resumed.model.state_dict().items())


def test_none_leaves_the_model_alone_and_bad_settings_name_the_field():
    dllm = load_dllm({"family": "llada"})
    before = _weights(dllm)
    assert transform_model(dllm, None, TransformSpec()) == {}
    assert all(torch.equal(v, dllm.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="needs calibration states"):
        transform_model(dllm, None, TransformSpec(name="smoothquant"))
    assert get_transform("smoothquant").apply is apply_smoothquant
    for settings, field in [
        ({"name": "quarot_typo"}, "quant.transform.name='quarot_typo'"),
        ({"alpha": 1.5}, "quant.transform.alpha=1.5"),
        ({"sites": ["qkv", "lm_head"]}, "quant.transform.sites"),
        ({"sites": ["qkv", "qkv"]}, "quant.transform.sites"),
        ({"block_size": 0}, "quant.transform.block_size=0"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            TransformSpec(**settings).validated()
