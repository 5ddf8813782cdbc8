"""Activation fake-quantization: closed forms, invariants, the hooks on a model, bad settings."""

import pytest
import torch

import qdllm
from qdllm.errors import ConfigError
from qdllm.models import load_dllm
from qdllm.packing.checkpoint import save_quantized
from qdllm.packing.module import QuantizedLinear
from qdllm.quant.activations import ActSpec, fake_quantize_activations, install_activation_quant

IDS = torch.arange(2 * 24).reshape(2, 24) % 250  # byte tokens of the tiny models


def test_per_token_matches_hand_computed_values():
    # 3 bits: q_max = 3. Row 0: scale 3/3 = 1. Row 1: zeros stay zeros. Row 2: scale 0.5/3 = 1/6,
    # x/scale = (-3, 1.8, 0.6, 1.2) -> (-3, 2, 1, 1).
    x = torch.tensor([[1.0, -2.0, 0.4, 3.0], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.3, 0.1, 0.2]])
    expected = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [-0.5, 2 / 6, 1 / 6, 1 / 6]])
    torch.testing.assert_close(fake_quantize_activations(x, 3, "token"), expected, rtol=0, atol=1e-7)
    # leading dimensions are tokens too: (B, L, C) gives the same rows
    batched = fake_quantize_activations(x.reshape(1, 3, 4), 3, "token")
    torch.testing.assert_close(batched.reshape(3, 4), expected, rtol=0, atol=1e-7)


def test_per_tensor_matches_hand_computed_values():
    # one scale: max|x| = 3.0, 3 bits -> scale 1; the small row is rounded on the big row's grid
    x = torch.tensor([[1.2, -2.6], [0.4, 3.0]])
    expected = torch.tensor([[1.0, -3.0], [0.0, 3.0]])
    assert torch.equal(fake_quantize_activations(x, 3, "tensor"), expected)
    # per token, row 0 gets its own finer scale 2.6/3
    per_token = fake_quantize_activations(x, 3, "token")
    torch.testing.assert_close(per_token[0], torch.tensor([2.6 / 3, -2.6]), rtol=0, atol=1e-6)


def test_clip_saturates_at_the_clipped_range():
    # clip 0.5, 3 bits: scale = 0.5 * 4 / 3 = 2/3; x/scale = (6, -1.65, 3.3, 0.15) -> (6, -2, 3, 0)
    # -> clamp to [-3, 3] -> (3, -2, 3, 0) -> (2, -4/3, 2, 0)
    x = torch.tensor([[4.0, -1.1, 2.2, 0.1]])
    expected = torch.tensor([[2.0, -4 / 3, 2.0, 0.0]])
    torch.testing.assert_close(
        fake_quantize_activations(x, 3, "token", clip=0.5), expected, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_idempotent_error_bounded_and_on_the_grid(granularity, bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 32, generator=gen) * torch.rand(3, 5, 1, generator=gen) * 10
    y = fake_quantize_activations(x, bits, granularity)
    assert torch.equal(fake_quantize_activations(y, bits, granularity), y)
    q_max = 2 ** (bits - 1) - 1
    x64 = x.double()
    absmax = x64.abs().amax(-1, keepdim=True) if granularity == "token" else x64.abs().amax()
    scale = absmax / q_max  # recomputed in float64, independently of the code under test
    assert ((y.double() - x64).abs() <= scale / 2 + 1e-6 * scale).all()
    levels = y.double() / scale
    assert (levels - levels.round()).abs().max() < 1e-4 and levels.abs().max() <= q_max + 1e-4


def test_clipped_values_saturate_and_the_rest_stay_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x, clip, bits = torch.randn(64, 48, generator=gen), 0.7, 4
    y = fake_quantize_activations(x, bits, "token", clip)
    edge = x.abs().amax(-1, keepdim=True) * clip
    scale = edge / (2 ** (bits - 1) - 1)
    inside = x.abs() <= edge
    assert ((y - x).abs() <= scale / 2 + 1e-6)[inside].all()
    torch.testing.assert_close(y[~inside].abs(), edge.expand_as(x)[~inside], rtol=1e-6, atol=0)


def test_16_bit_inputs_are_quantized_with_fp32_statistics():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 64, generator=gen) * 30).to(torch.bfloat16)
    y = fake_quantize_activations(x, 8)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fake_quantize_activations(x.float(), 8).to(torch.bfloat16))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"bits": 0}, "act.bits=0"),
        ({"bits": 1}, "act.bits=1"),
        ({"bits": 8, "clip": 1.5}, "act.clip=1.5"),
        ({"bits": 8, "clip": 0.0}, "act.clip=0.0"),
        ({"bits": 8, "granularity": "channel"}, "act.granularity='channel'"),
        ({"bits": None, "granularity": "channel"}, "act.granularity='channel'"),  # checked even when off
    ],
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("'", "'")):
        ActSpec(**settings).validated()
    if settings["bits"] is not None:
        args = {"granularity": "token", "clip": 1.0, **settings}
        with pytest.raises(ConfigError, match=field.split("=")[0].replace(".", r"\.")):
            fake_quantize_activations(torch.ones(2, 2), **args)


def _on_token_grid(x: torch.Tensor, bits: int) -> bool:
    """Every token row of x is an integer multiple of max|row| / q_max (recomputed here)."""
    x = x.double().reshape(-1, x.shape[-1])
    scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    levels = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    return bool((levels - levels.round()).abs().max() < 1e-3)


def _record_inputs(dllm) -> dict[str, list]:
    """Pre-hooks registered after the quantizer's: they see what each Linear really receives."""
    seen: dict[str, list] = {}
    names = dllm.module_names()
    for block in dllm.blocks():
        for stage in dllm.stages:
            for name in stage.linears:
                module = block.get_submodule(name)
                key = names[id(module)]
                seen[key] = []
                module.register_forward_pre_hook(lambda m, a, key=key: seen[key].append(a[0]))
    return seen


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_hooks_reach_every_quantized_linear_and_change_the_output(family):
    dllm = load_dllm({"family": family})
    reference = dllm.logits(IDS)
    off = install_activation_quant(dllm, ActSpec())
    assert (off.linears, off.outputs, off.handles) == (0, 0, [])
    assert torch.equal(dllm.logits(IDS), reference)  # act=none: bit-identical
    hooks = install_activation_quant(dllm, ActSpec(bits=4, qk=True))
    assert hooks.linears == 2 * 7 and hooks.outputs == 2 * 2  # 2 blocks x (q k v o gate up down); q, k
    seen = _record_inputs(dllm)
    quantized = dllm.logits(IDS)
    assert len(seen) == 14 and all(len(xs) == 1 and _on_token_grid(xs[0], 4) for xs in seen.values())
    assert not torch.allclose(quantized, reference, atol=1e-3)
    hooks.remove()
    assert len(dllm.blocks()[0].get_submodule(dllm.stages[0].linears[0])._forward_pre_hooks) == 1  # ours


def test_qk_quantizes_the_q_and_k_outputs_per_token_and_head():
    dllm = load_dllm({"family": "llada"})
    anatomy = dllm.anatomy()
    install_activation_quant(dllm, ActSpec(bits=4, qk=True))
    outputs = {}
    for name in anatomy.qkv:  # forward hooks run in registration order: these see the quantized outputs
        module = dllm.blocks()[0].get_submodule(name)
        module.register_forward_hook(lambda m, a, out, key=name: outputs.setdefault(key, out))
    dllm.logits(IDS)
    q, k, v = (outputs[name] for name in anatomy.qkv)
    for out in (q, k):
        assert _on_token_grid(out.reshape(*out.shape[:-1], -1, anatomy.head_dim), 4)
        assert not _on_token_grid(out, 4)  # one scale per head, not one over all heads
    assert not _on_token_grid(v.reshape(*v.shape[:-1], -1, anatomy.head_dim), 4)  # V is left alone


def test_packed_model_gets_the_same_activation_quantization(tmp_path):
    from qdllm.calib import MCSSpec, mcs_states
    from qdllm.data import DataSpec, calibration_windows, load_texts
    from qdllm.paths import data_root
    from qdllm.pipeline import PipelineSpec, quantize_model

    dllm = load_dllm({"family": "llada"})
    data = DataSpec(path=str(data_root() / "c4/c4_excerpt.jsonl"), nsamples=4, seqlen=64)
    states, _ = mcs_states(
        calibration_windows(load_texts(data), dllm.tokenizer, data), dllm.mask_token_id, MCSSpec(timesteps=2)
    )
    cfg = {"method": "rtn", "bits": 8, "group_size": -1}
    report = quantize_model(dllm, states, cfg, PipelineSpec(progress=False, pack=True))
    save_quantized(dllm, report.packed, tmp_path / "ck", {"group_size": -1, "sym": False})
    packed = qdllm.load_quantized(tmp_path / "ck")
    spec = ActSpec(bits=4)
    hooks = install_activation_quant(packed, spec)
    assert hooks.linears == 14 == sum(isinstance(m, QuantizedLinear) for m in packed.model.modules())
    install_activation_quant(dllm, spec)
    torch.testing.assert_close(packed.logits(IDS), dllm.logits(IDS), rtol=1e-5, atol=1e-5)
