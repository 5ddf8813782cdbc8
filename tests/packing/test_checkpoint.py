"""Packed checkpoints: save -> load gives the fake-quantized model's logits; size; bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdllm
from qdllm.calib import MCSSpec, mcs_states
from qdllm.data import DataSpec, calibration_windows, load_texts
from qdllm.models import load_dllm
from qdllm.packing import PackedFormatError
from qdllm.packing.checkpoint import save_quantized
from qdllm.packing.module import QuantizedLinear
from qdllm.pipeline import PipelineSpec, quantize_model
from tests.app.conftest import DATA_ROOT, read_record, run_cli


def quantized(family: str, cfg: dict):
    dllm = load_dllm({"family": family})
    spec = DataSpec(path=str(DATA_ROOT / "c4/c4_excerpt.jsonl"), nsamples=4, seqlen=64)
    windows = calibration_windows(load_texts(spec), dllm.tokenizer, spec)
    states, _ = mcs_states(windows, dllm.mask_token_id, MCSSpec(timesteps=2))
    report = quantize_model(dllm, states, {**cfg, "group_size": 16}, PipelineSpec(progress=False, pack=True))
    return dllm, report, windows


@pytest.mark.parametrize(
    ("family", "cfg"),
    [
        ("llada", {"method": "daq", "abmp_ratio": 0.3}),
        ("dream", {"method": "daq", "bits": 3, "abmp_ratio": 0.0}),
        ("dream", {"method": "gptq", "bits": 2}),
        ("llada", {"method": "rtn", "bits": 4, "sym": True}),
        ("dream", {"method": "slim", "bits": 2}),
    ],
)
def test_packed_checkpoint_round_trips_to_identical_logits(tmp_path, family, cfg):
    dllm, report, windows = quantized(family, cfg)
    sizes = save_quantized(
        dllm, report.packed, tmp_path / "ck", {"group_size": 16, "sym": cfg.get("sym", False)}
    )
    loaded = qdllm.load_quantized(tmp_path / "ck")
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.model.modules()) == 14
    assert torch.equal(loaded.logits(windows[:2]), dllm.logits(windows[:2]))
    accounted = sum(r["bits_per_weight"] * r["rows"] * r["cols"] for r in report.layers) / 8
    packed = sizes["signs_or_codes"] + sizes["scales_and_zeros"] + sizes["maps"]
    assert packed == pytest.approx(accounted, rel=0.01)
    shards = list((tmp_path / "ck").glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards)  # safetensors JSON header
    assert sum(p.stat().st_size for p in shards) - headers == sizes["total"]  # tensor bytes, nothing else


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    dllm, report, _ = quantized("llada", {"method": "daq"})
    path = tmp_path_factory.mktemp("ck") / "packed"
    save_quantized(dllm, report.packed, path, {"group_size": 16, "sym": False})
    return path


def test_a_checkpoint_that_disagrees_with_its_config_fails_to_load(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config["d_model"] = 2 * config["d_model"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackedFormatError, match="stores a .* weight but the config builds"):
        qdllm.load_quantized(bad)
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    shard = next(bad.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("bcq_signs"))
    del tensors[name]
    save_file(tensors, str(shard))
    with pytest.raises(PackedFormatError, match="lacks packed tensors"):
        qdllm.load_quantized(bad)


def test_model_card_and_config_describe_the_quantization(checkpoint):
    card = (checkpoint / "README.md").read_text()
    assert "base_model_relation: quantized" in card and "qdllm.load_quantized" in card
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qdllm" and qc["format_version"] == 1 and len(qc["modules"]) == 14
    assert {"model.transformer.wte", "model.transformer.ff_out"} <= set(qc["modules_to_not_convert"])


@pytest.mark.slow
def test_run_py_pack_writes_the_checkpoint_and_its_size(tmp_path):
    proc = run_cli("debug=tiny_cpu", "pack=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_record(tmp_path)
    assert record["artifacts"]["packed"] == "packed" and record["quant"]["packed_bytes"]["total"] > 0
    assert "| ppl | ppl |" in (tmp_path / "packed" / "README.md").read_text()  # the card has the scores
    assert torch.equal(
        qdllm.load_quantized(tmp_path / "packed").logits(torch.tensor([[1, 2, 3]])).isfinite(),
        torch.ones(1, 3, 260, dtype=torch.bool),
    )


def test_table3_from_shapes_matches_the_spec_accounting():
    """experiments/table3_sizes.py: LLaDA-8B FP16 = 16.03 GB (8.015 B parameters) and Quant-dLLM at
    2.255 bits per weight in the blocks = 4.04 GB, the figures of algorithm.md §12.3."""
    import importlib.util

    from tests.app.conftest import REPO

    spec = importlib.util.spec_from_file_location("table3", REPO / "experiments" / "table3_sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fp16, _ = module.model_gb("FP16")
    daq, daq_bpw = module.model_gb("Quant-dLLM")
    gptq, _ = module.model_gb("GPTQ")
    assert fp16 == pytest.approx(16.03, abs=0.01) and daq == pytest.approx(4.04, abs=0.01)
    assert daq_bpw == pytest.approx(2.255, abs=1e-3) and gptq < daq < fp16


@pytest.mark.parametrize("cfg", [{"method": "daq", "abmp_ratio": 0.3}, {"method": "gptq", "bits": 3}])
def test_transformers_from_pretrained_loads_a_packed_dream(tmp_path, cfg):
    """After `import qdllm`, transformers builds the Qwen2 model with QuantizedLinears itself."""
    from transformers import AutoModelForCausalLM

    from qdllm.models.registry import wrap_model

    dllm, report, windows = quantized("dream", cfg)
    save_quantized(dllm, report.packed, tmp_path / "ck", {"group_size": 16, "sym": False})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    assert model.model.layers[0].self_attn.q_proj.packed()["weight_shape"].dtype == torch.int32
    loaded = wrap_model("dream", model, dllm.tokenizer, dllm.mask_token_id, "loaded")
    assert torch.equal(loaded.logits(windows[:2]), dllm.logits(windows[:2]))
