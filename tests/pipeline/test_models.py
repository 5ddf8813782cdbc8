"""Model families: official LLaDA-8B names and shapes, bidirectional attention, logit alignment."""

import pytest
import torch

from qdllm.models import ModelLoadError, load_dllm, save_dllm
from qdllm.models.llada import LLaDAConfig, LLaDAModelLM


def _official_llada8b_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of GSAI-ML/LLaDA-8B-Base, written out from its config."""
    d, ff, vocab = 4096, 12288, 126464
    shapes = {
        "model.transformer.wte.weight": (vocab, d),
        "model.transformer.ln_f.weight": (d,),
        "model.transformer.ff_out.weight": (vocab, d),
    }
    for i in range(32):
        p = f"model.transformer.blocks.{i}."
        shapes.update(
            {
                p + "attn_norm.weight": (d,),
                p + "ff_norm.weight": (d,),
                p + "q_proj.weight": (d, d),
                p + "k_proj.weight": (d, d),
                p + "v_proj.weight": (d, d),
                p + "attn_out.weight": (d, d),
                p + "ff_proj.weight": (ff, d),
                p + "up_proj.weight": (ff, d),
                p + "ff_out.weight": (d, ff),
            }
        )
    return shapes


def test_own_llada_loads_official_state_dict_on_meta():
    raw = {
        "d_model": 4096,
        "n_heads": 32,
        "n_kv_heads": 32,
        "n_layers": 32,
        "mlp_hidden_size": 12288,
        "vocab_size": 126464,
        "embedding_size": 126464,
        "rope_theta": 500000.0,
        "weight_tying": False,
        "block_group_size": 1,
        "activation_type": "silu",
    }
    with torch.device("meta"):
        model = LLaDAModelLM(LLaDAConfig.from_dict(raw))
        state = {k: torch.empty(v, dtype=torch.bfloat16) for k, v in _official_llada8b_shapes().items()}
    model.load_state_dict(state, strict=True, assign=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(torch.Size(v).numel() for v in _official_llada8b_shapes().values())
    assert 8.0e9 < n_params < 8.03e9


@pytest.mark.parametrize("family", ["llada", "dream", "ar_dllm"])
def test_attention_is_bidirectional_and_logits_aligned(family):
    dllm = load_dllm({"family": family})
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    base = dllm.logits(ids)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    # the last token influences the first position only through bidirectional attention
    assert not torch.allclose(dllm.logits(changed)[0, 0], base[0, 0])
    raw = dllm.head(_hidden(dllm, ids))
    if family == "llada":
        assert torch.equal(base, raw)
    else:  # position i is read from output i - 1
        assert torch.equal(base[:, 1:], raw[:, :-1]) and torch.equal(base[:, 0], raw[:, 0])


def _hidden(dllm, ids):
    h = dllm.embed(ids)
    for block in dllm.blocks():
        h = dllm.block_forward(block, h)
    return h


@pytest.mark.parametrize("family", ["llada", "dream", "ar_dllm"])
def test_save_and_reload_round_trip(tmp_path, family):
    dllm = load_dllm({"family": family, "seed": 3})
    save_dllm(dllm, tmp_path / family)
    again = load_dllm({"family": family, "source": str(tmp_path / family)})
    ids = torch.arange(20).unsqueeze(0)
    assert torch.equal(again.logits(ids), dllm.logits(ids))
    assert again.mask_token_id == dllm.mask_token_id == dllm.tokenizer.mask_token_id


def test_unknown_family_and_missing_source_are_clear_errors(monkeypatch):
    with pytest.raises(ModelLoadError, match="model.family"):
        load_dllm({"family": "gpt2"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model.source"):
        load_dllm({"family": "llada", "source": "/nonexistent/dir"})
