"""Packed checkpoints: save -> load gives the fake-quantized model's logits; size; bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdllm
import qdllm.packing.checkpoint as checkpoint_module
from qdllm.calib import MCSSpec, mcs_states
from qdllm.data import DataSpec, calibration_windows, load_texts
from qdllm.models import load_dllm
from qdllm.packing import ModuleFormat, PackedFormatError
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


def copy_checkpoint(source, target):
    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def edit_quantization_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("family", "cfg"),
    [
        ("llada", {"method": "daq", "abmp_ratio": 0.3}),
        ("dream", {"method": "daq", "bits": 3, "abmp_ratio": 0.0}),
        ("dream", {"method": "gptq", "bits": 2}),
        ("llada", {"method": "rtn", "bits": 4, "sym": True}),
        ("dream", {"method": "slim", "bits": 2}),
        ("dream", {"method": "awq", "bits": 3}),
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


@pytest.mark.parametrize(
    ("family", "transform", "cfg"),
    [
        ("llada", {"name": "quarot", "seed": 3}, {"method": "rtn", "bits": 4}),
        ("dream", {"name": "duquant", "block_size": 16, "rotation_steps": 8}, {"method": "gptq", "bits": 4}),
    ],
)
def test_online_rotations_are_stored_and_reattached(tmp_path, family, transform, cfg):
    """QuaRot's Hadamards (ffn_out input, across heads at attn_out) and DuQuant's block rotations
    (every Linear input) run on the packed model as on the fake-quantized one."""
    from qdllm.pipeline.transform import transform_model
    from qdllm.transforms import TransformSpec
    from qdllm.transforms.online import input_transform_of

    dllm = load_dllm({"family": family})
    spec = DataSpec(path=str(DATA_ROOT / "c4/c4_excerpt.jsonl"), nsamples=4, seqlen=64)
    windows = calibration_windows(load_texts(spec), dllm.tokenizer, spec)
    states, _ = mcs_states(windows, dllm.mask_token_id, MCSSpec(timesteps=2))
    transform_model(dllm, states, TransformSpec(**transform), PipelineSpec(progress=False))
    report = quantize_model(dllm, states, {**cfg, "group_size": 16}, PipelineSpec(progress=False, pack=True))
    save_quantized(dllm, report.packed, tmp_path / "ck", {"group_size": 16, "sym": False})
    loaded = qdllm.load_quantized(tmp_path / "ck")
    expected = {n for n, m in dllm.model.named_modules() if input_transform_of(m) is not None}
    assert expected and expected == {n for n, m in loaded.model.named_modules() if input_transform_of(m)}
    assert torch.equal(loaded.logits(windows[:2]), dllm.logits(windows[:2]))
    if family == "dream":  # transformers would load it without its rotations: refused by name
        from transformers import AutoModelForCausalLM

        with pytest.raises(ValueError, match="qdllm.load_quantized"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


def test_an_unknown_input_transform_fails_to_load(tmp_path):
    dllm = load_dllm({"family": "llada"})
    from qdllm.transforms.quarot import QuaRotSpec, apply_quarot

    apply_quarot(dllm, QuaRotSpec(seed=1))
    report = quantize_model(dllm, torch.zeros(2, 16, dtype=torch.long), {"method": "rtn", "group_size": 16},
                            PipelineSpec(progress=False, pack=True))  # fmt: skip
    save_quantized(dllm, report.packed, tmp_path / "ck", {"group_size": 16, "sym": False})

    def rename(qc):
        next(iter(qc["input_transforms"].values()))["kind"] = "spiral"

    edit_quantization_config(tmp_path / "ck", rename)
    with pytest.raises(PackedFormatError, match="unknown online input transform kind 'spiral'"):
        qdllm.load_quantized(tmp_path / "ck")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    dllm, report, _ = quantized("llada", {"method": "daq"})
    path = tmp_path_factory.mktemp("ck") / "packed"
    save_quantized(dllm, report.packed, path, {"group_size": 16, "sym": False})
    return path


def test_a_checkpoint_that_disagrees_with_its_config_fails_to_load(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    bad = copy_checkpoint(checkpoint, tmp_path / "bad")
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
    assert qc["quant_method"] == "qdllm" and qc["format_version"] == 2 and len(qc["modules"]) == 14
    formats = {json.dumps(raw, sort_keys=True) for raw in qc["modules"].values()}
    assert formats == {'{"group_size": 16, "kind": "bcq", "scale_dtype": "float16"}'}
    assert {"model.transformer.wte", "model.transformer.ff_out"} <= set(qc["modules_to_not_convert"])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["quant=quarot", "act=none"]], ids=["default", "quarot"])
def test_run_py_pack_writes_the_checkpoint_and_its_size(tmp_path, overrides):
    proc = run_cli("debug=tiny_cpu", "pack=true", *overrides, f"hydra.run.dir={tmp_path}")
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
    2.255 bits per weight in the blocks = 4.04 GB, the sizes docs/PACKED_FORMAT.md reports."""
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


@pytest.mark.parametrize(
    "cfg", [{"method": "daq", "abmp_ratio": 0.3}, {"method": "gptq", "bits": 3}, {"method": "awq", "bits": 4}]
)
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


@pytest.fixture(scope="module")
def asymmetric_rtn():
    """An asymmetric 2-bit RTN LLaDA (every module stores zero points), its report and windows."""
    return quantized("llada", {"method": "rtn", "bits": 2})


@pytest.mark.parametrize(
    "provenance",
    [{"group_size": 16, "sym": True}, {"sym": False}, {}],
    ids=["wrong-sym", "no-group-size", "none"],
)
def test_the_loader_reads_each_module_format_not_the_callers_provenance(tmp_path, asymmetric_rtn, provenance):
    """A wrong or missing caller-supplied sym / group_size is provenance only: the checkpoint loads
    the fake-quantized model exactly from the formats recorded per module."""
    dllm, report, windows = asymmetric_rtn
    save_quantized(dllm, report.packed, tmp_path / "ck", provenance)
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert all(
        raw == {"kind": "uniform", "group_size": 16, "scale_dtype": "float16", "sym": False}
        for raw in qc["modules"].values()
    )
    assert torch.equal(qdllm.load_quantized(tmp_path / "ck").logits(windows[:2]), dllm.logits(windows[:2]))


MODULE = "model.transformer.blocks.0.q_proj"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("group_size"), r"missing \['group_size'\]"),
        (lambda m: m.update(group_size=32), "group_size=32 makes"),
        (lambda m: m.update(scale_dtype="float32"), "scale_dtype='float32' but bcq_row_scale"),
        (lambda m: m.update(kind="uniform", sym=False), "lacks packed tensors"),
    ],
    ids=["no-group-size", "wrong-group-size", "wrong-scale-dtype", "wrong-kind"],
)
def test_a_module_format_that_disagrees_with_its_tensors_fails_to_load(checkpoint, tmp_path, edit, match):
    bad = copy_checkpoint(checkpoint, tmp_path / "bad")
    edit_quantization_config(bad, lambda qc: edit(qc["modules"][MODULE]))
    with pytest.raises(PackedFormatError, match=f"module {MODULE}.*{match}"):
        qdllm.load_quantized(bad)


def as_version_1(qc: dict, group_size: int, sym: bool) -> None:
    """The format_version 1 layout: one kind per module, group_size / sym once for all."""
    modules = {name: raw["kind"] for name, raw in qc["modules"].items()}
    qc.update(format_version=1, modules=modules, group_size=group_size, sym=sym)


def test_version_1_checkpoints_load_and_their_shared_fields_are_checked(tmp_path, asymmetric_rtn):
    dllm, report, windows = asymmetric_rtn
    save_quantized(dllm, report.packed, tmp_path / "v2", {})
    v1 = copy_checkpoint(tmp_path / "v2", tmp_path / "v1")
    edit_quantization_config(v1, lambda qc: as_version_1(qc, 16, False))
    assert torch.equal(qdllm.load_quantized(v1).logits(windows[:2]), dllm.logits(windows[:2]))
    edit_quantization_config(v1, lambda qc: qc.update(sym=True))  # the silent error of version 1
    with pytest.raises(PackedFormatError, match="sym=True but the module stores zero points"):
        qdllm.load_quantized(v1)
    edit_quantization_config(v1, lambda qc: qc.pop("group_size"))
    with pytest.raises(PackedFormatError, match="quantization_config.group_size is missing"):
        qdllm.load_quantized(v1)


def test_a_failed_save_leaves_no_staging_dir_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    dllm = load_dllm({"family": "llada"})
    save_quantized(dllm, {}, tmp_path / "ck", {"run": 1})
    before = {f.name: f.read_bytes() for f in (tmp_path / "ck").iterdir()}

    def failing_card(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "model_card", failing_card)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(dllm, {}, tmp_path / "ck", {"run": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "ck").iterdir()} == before


def test_provenance_cannot_overwrite_the_packed_format(tmp_path):
    dllm = load_dllm({"family": "llada"})
    with pytest.raises(PackedFormatError, match=r"keys \['format_version'\] would overwrite"):
        save_quantized(dllm, {}, tmp_path / "ck", {"format_version": 1})
    assert not any(tmp_path.iterdir())


def test_resumed_pipeline_blocks_keep_their_packed_formats(tmp_path):
    dllm = load_dllm({"family": "llada"})
    spec = DataSpec(path=str(DATA_ROOT / "c4/c4_excerpt.jsonl"), nsamples=2, seqlen=32)
    windows = calibration_windows(load_texts(spec), dllm.tokenizer, spec)
    states, _ = mcs_states(windows, dllm.mask_token_id, MCSSpec(timesteps=1))
    cfg = {"method": "gptq", "bits": 2, "group_size": 16, "sym": True, "scale_dtype": "float32"}
    pipeline = PipelineSpec(progress=False, pack=True, checkpoint_dir=str(tmp_path))
    first = quantize_model(dllm, states, cfg, pipeline)
    resumed = quantize_model(load_dllm({"family": "llada"}), states, cfg, pipeline)
    assert resumed.blocks_resumed == 2 and resumed.packed.keys() == first.packed.keys()
    for name, (fmt, tensors) in resumed.packed.items():
        assert fmt == ModuleFormat("uniform", 16, "float32", True)
        assert tensors.keys() == first.packed[name][1].keys()
        assert all(torch.equal(t, first.packed[name][1][key]) for key, t in tensors.items())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(sym=True), "sym=True but the module stores zero points"),
        (lambda m: m.pop("scale_dtype"), r"missing \['scale_dtype'\]"),
    ],
    ids=["wrong-sym", "no-scale-dtype"],
)
def test_transformers_from_pretrained_checks_each_module_format(tmp_path, edit, match):
    from transformers import AutoModelForCausalLM

    dllm, report, _ = quantized("dream", {"method": "rtn", "bits": 2})
    save_quantized(dllm, report.packed, tmp_path / "ck", {})
    module = "model.layers.1.mlp.down_proj"
    edit_quantization_config(tmp_path / "ck", lambda qc: edit(qc["modules"][module]))
    with pytest.raises(PackedFormatError, match=f"module {module}: .*{match}"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
