"""Diffusion samplers: every mask filled, LLaDA's block order, step counts, determinism."""

import pytest
import torch

from qdllm.errors import ConfigError
from qdllm.eval.sampler import GenSpec, commit_schedule, dream_generate, llada_generate
from qdllm.models import load_dllm


def recording(monkeypatch, dllm):
    canvases = []
    original = dllm.logits
    monkeypatch.setattr(
        dllm, "logits", lambda ids, *span: canvases.append(ids[0].clone()) or original(ids, *span)
    )
    return canvases


def test_commit_schedule_splits_evenly():
    assert commit_schedule(10, 4) == [3, 3, 2, 2] and sum(commit_schedule(7, 7)) == 7


def test_llada_fills_every_mask_block_by_block(monkeypatch):
    dllm = load_dllm({"family": "llada", "source": "tiny"})
    canvases = recording(monkeypatch, dllm)
    prompt = list(b"Q: 2+2? A:")
    spec = GenSpec(gen_length=12, steps=6, block_length=4)
    out = llada_generate(dllm, prompt, spec, torch.Generator().manual_seed(0))
    assert len(out) == 12 and dllm.mask_token_id not in out
    assert len(canvases) == 6  # one forward per step
    for canvas in canvases:
        answer = canvas[len(prompt) :] != dllm.mask_token_id
        blocks = answer.view(3, 4)
        started = [bool(b.any()) for b in blocks]
        for b in range(1, 3):  # a later block is touched only once the earlier one is complete
            assert not started[b] or bool(blocks[b - 1].all())
    assert canvases[0][: len(prompt)].tolist() == prompt


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin"])
def test_dream_fills_every_mask_and_is_seeded(alg):
    dllm = load_dllm({"family": "dream", "source": "tiny"})
    spec = GenSpec(gen_length=10, steps=5, block_length=10, alg=alg, temperature=0.7)
    a = dream_generate(dllm, list(b"Hello"), spec, torch.Generator().manual_seed(3))
    b = dream_generate(dllm, list(b"Hello"), spec, torch.Generator().manual_seed(3))
    assert a == b and len(a) == 10 and dllm.mask_token_id not in a


def test_sampler_settings_are_validated():
    with pytest.raises(ConfigError, match="eval.gen.block_length"):
        GenSpec(gen_length=10, block_length=4).validated()
    with pytest.raises(ConfigError, match="eval.gen.steps"):
        GenSpec(gen_length=8, block_length=4, steps=3).validated()
