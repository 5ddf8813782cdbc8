"""End-to-end pipeline on tiny models: runs, identity, untouched modules, resume."""

import json
import tempfile
import time
from pathlib import Path

import pytest
import torch

from qdllm.calib import MCSSpec, mcs_states
from qdllm.data import DataSpec, calibration_windows, load_texts
from qdllm.models import load_dllm
from qdllm.pipeline import PipelineSpec, quantize_model
from tests.pipeline.conftest import quantize_killed_after_block_zero


def quantizable(dllm) -> list[tuple[int, str, torch.nn.Linear]]:
    """(block index, name in block, module) for every Linear of the pipeline's stages."""
    return [
        (index, name, block.get_submodule(name))
        for index, block in enumerate(dllm.blocks())
        for stage in dllm.stages
        for name in stage.linears
    ]


def _states(dllm, c4_path, n=6, seqlen=96):
    spec = DataSpec(path=c4_path, nsamples=n, seqlen=seqlen)
    windows = calibration_windows(load_texts(spec), dllm.tokenizer, spec)
    states, _ = mcs_states(windows, dllm.mask_token_id, MCSSpec(timesteps=4))
    return windows, states


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_end_to_end_quantizes_every_linear_and_nothing_else(c4_path, family):
    dllm = load_dllm({"family": family})
    windows, states = _states(dllm, c4_path)
    before = {k: v.clone() for k, v in dllm.model.state_dict().items()}
    start = time.perf_counter()
    report = quantize_model(dllm, states, {"method": "daq", "abmp_ratio": 0.5}, PipelineSpec(progress=False))
    assert time.perf_counter() - start < 60
    quantized = {f"{i}.{n}" for i, n, _ in quantizable(dllm)}
    assert {f"{r['block']}.{r['name']}" for r in report.layers} == quantized
    changed = {k for k, v in dllm.model.state_dict().items() if not torch.equal(v, before[k])}
    targets = {id(m.weight) for _, _, m in quantizable(dllm)}
    expected = {k for k, p in dllm.model.named_parameters() if id(p) in targets}
    # every target Linear changed; embeddings, norms, biases and the LM head are untouched
    assert changed == expected and len(expected) == 14
    assert all(0 < r["proxy_error"] < 1 for r in report.layers)
    assert set(report.timing) >= {"embed", "propagate", "stats/qkv", "quant/ff_out"}


def test_method_none_is_bit_identical(c4_path):
    dllm = load_dllm({"family": "llada"})
    windows, states = _states(dllm, c4_path)
    before = dllm.logits(windows[:2])
    quantize_model(dllm, states, {"method": "none"}, PipelineSpec(progress=False))
    assert torch.equal(dllm.logits(windows[:2]), before)


def test_killed_run_resumes_to_identical_weights(c4_path, tmp_path, monkeypatch):
    cfg = {"method": "daq", "abmp_ratio": 0.5}
    reference = load_dllm({"family": "llada"})
    _, states = _states(reference, c4_path)
    quantize_model(reference, states, cfg, PipelineSpec(progress=False))

    killed = load_dllm({"family": "llada"})
    spec = PipelineSpec(progress=False, checkpoint_dir=str(tmp_path))
    quantize_killed_after_block_zero(monkeypatch, killed, states, cfg, spec, KeyboardInterrupt())

    resumed = load_dllm({"family": "llada"})
    report = quantize_model(resumed, states, cfg, PipelineSpec(progress=False, checkpoint_dir=str(tmp_path)))
    assert report.blocks_resumed == 1
    for (k, v), (k2, v2) in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2), k


def test_block_scope_abmp_keeps_budget(c4_path):
    dllm = load_dllm({"family": "dream"})
    _, states = _states(dllm, c4_path)
    report = quantize_model(
        dllm,
        states,
        {"method": "daq", "abmp_ratio": 0.3, "abmp_scope": "block"},
        PipelineSpec(progress=False),
    )
    for block in (0, 1):
        rows = [r for r in report.layers if r["block"] == block]
        weighted, total = 0, 0
        for r in rows:
            widths = [min(r["group_size"], r["cols"] - s) for s in range(0, r["cols"], r["group_size"])]
            orders = json.loads(r["orders"])
            weighted += sum(k * r["rows"] * w for k, w in zip(orders, widths, strict=True))
            total += r["rows"] * r["cols"]
        assert weighted == 2 * total  # exact average order over the block, by weight count
    assert any(set(json.loads(r["orders_hist"])) != {"2"} for r in report.layers)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_block_scope_abmp_leaves_uniform_baselines_at_one_width(c4_path, method):
    """An ABMP setting in a sweep's shared config must not touch the uniform baselines: the same
    weights as with ABMP off."""
    with_abmp, without = load_dllm({"family": "dream"}), load_dllm({"family": "dream"})
    _, states = _states(with_abmp, c4_path)
    quantize_model(
        with_abmp,
        states,
        {"method": method, "abmp_ratio": 0.1, "abmp_scope": "block"},
        PipelineSpec(progress=False),
    )
    quantize_model(without, states, {"method": method}, PipelineSpec(progress=False))
    for (k, v), (_, v2) in zip(
        with_abmp.model.state_dict().items(), without.model.state_dict().items(), strict=True
    ):
        assert torch.equal(v, v2), k


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_disk_cache_and_offloaded_blocks_give_identical_weights(c4_path, tmp_path, monkeypatch, family):
    cfg = {"method": "daq", "abmp_ratio": 0.5}
    in_memory = load_dllm({"family": family})
    _, states = _states(in_memory, c4_path)
    quantize_model(in_memory, states, cfg, PipelineSpec(progress=False))
    on_disk = load_dllm({"family": family})
    spec = PipelineSpec(progress=False, cache_device="disk", cache_dir=str(tmp_path), exec_device="cpu")
    written = record_chunk_files(monkeypatch)
    quantize_model(on_disk, states, cfg, spec)
    assert len({p.name for p in written}) == -(-len(states) // spec.batch_size)
    assert all(tmp_path in p.parents for p in written)
    for (k, v), (_, v2) in zip(
        in_memory.model.state_dict().items(), on_disk.model.state_dict().items(), strict=True
    ):
        assert torch.equal(v, v2), k


def record_chunk_files(monkeypatch) -> list[Path]:
    """Paths of the cache chunk files the pipeline writes from now on (filled as it runs)."""
    from qdllm.pipeline import quantize as pipeline_module

    real, written = pipeline_module.save_file, []

    def recording(tensors, filename, *args, **kwargs):
        if Path(filename).name.startswith("chunk_"):
            written.append(Path(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "save_file", recording)
    return written


@pytest.mark.parametrize("killed", [False, True], ids=["finished", "killed"])
@pytest.mark.parametrize("explicit_dir", [True, False], ids=["cache_dir", "system_temp"])
def test_disk_caches_leave_no_folder_behind(c4_path, tmp_path, monkeypatch, killed, explicit_dir):
    """GPTAQ keeps two disk caches (quantized and FP trajectories); their folders are removed when
    the run finishes and when it dies mid-way, in `pipeline.cache_dir` or the system's temp folder."""
    dllm = load_dllm({"family": "llada"})
    _, states = _states(dllm, c4_path)
    root = tmp_path / "caches"
    root.mkdir()
    if not explicit_dir:
        monkeypatch.setattr(tempfile, "tempdir", str(root))  # where mkdtemp(dir=None) goes
    spec = PipelineSpec(progress=False, cache_device="disk", cache_dir=str(root) if explicit_dir else None)
    written = record_chunk_files(monkeypatch)
    if killed:
        error = RuntimeError("killed")
        quantize_killed_after_block_zero(monkeypatch, dllm, states, {"method": "gptaq"}, spec, error)
    else:
        quantize_model(dllm, states, {"method": "gptaq"}, spec)
    assert written and all(root in p.parents for p in written)  # the caches were on disk, under root
    assert sorted(root.iterdir()) == []
    assert len({p.parent for p in written}) == 2  # one folder per cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_blocks_offloaded_from_cpu_match_a_model_on_gpu(c4_path, family):
    cfg = {"method": "daq", "abmp_ratio": 0.5}
    on_gpu = load_dllm({"family": family})  # tiny weights depend on the device they are built on
    on_gpu.model.to("cuda")
    _, states = _states(on_gpu, c4_path)
    quantize_model(on_gpu, states, cfg, PipelineSpec(progress=False))
    offloaded = load_dllm({"family": family})
    quantize_model(
        offloaded, states, cfg, PipelineSpec(progress=False, exec_device="cuda", cache_device="cpu")
    )
    assert offloaded.device.type == "cpu"
    for (k, v), (_, v2) in zip(
        on_gpu.model.state_dict().items(), offloaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(v.cpu(), v2), k


def _weights(dllm):
    return {f"{b}.{n}": m.weight.detach().clone() for b, n, m in quantizable(dllm)}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_gptaq_pipeline_against_gptq(c4_path, family):
    """alpha = 0 is GPTQ exactly; with alpha > 0 the first stage of block 0 (both streams start at
    the same embeddings, so D = 0) still equals GPTQ while later stages see D != 0 and differ."""
    results = {}
    for name, cfg in {
        "gptq": {"method": "gptq"},
        "gptaq0": {"method": "gptaq", "gptaq_alpha": 0.0},
        "gptaq": {"method": "gptaq"},
    }.items():
        dllm = load_dllm({"family": family})
        _, states = _states(dllm, c4_path)
        quantize_model(dllm, states, cfg, PipelineSpec(progress=False))
        results[name] = _weights(dllm)
    gptq, same, asym = results["gptq"], results["gptaq0"], results["gptaq"]
    assert all(torch.equal(gptq[k], same[k]) for k in gptq)
    first_stage = [f"0.{n}" for n in load_dllm({"family": family}).stages[0].linears]
    assert all(torch.equal(gptq[k], asym[k]) for k in first_stage)
    assert sum(not torch.equal(gptq[k], asym[k]) for k in gptq) >= len(gptq) - len(first_stage) - 1


def test_gptaq_resumes_to_identical_weights(c4_path, tmp_path, monkeypatch):
    """A resumed run rebuilds the FP trajectory from the original weights of finished blocks."""
    cfg = {"method": "gptaq"}
    reference = load_dllm({"family": "llada"})
    _, states = _states(reference, c4_path)
    quantize_model(reference, states, cfg, PipelineSpec(progress=False))
    spec = PipelineSpec(progress=False, checkpoint_dir=str(tmp_path))
    quantize_killed_after_block_zero(
        monkeypatch, load_dllm({"family": "llada"}), states, cfg, spec, RuntimeError("killed")
    )
    resumed = load_dllm({"family": "llada"})
    assert quantize_model(resumed, states, cfg, spec).blocks_resumed == 1
    assert all(torch.equal(a, b) for a, b in zip(_weights(reference).values(), _weights(resumed).values()))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_slim_pipeline_quantizes_every_linear_at_an_exact_average(c4_path, family):
    dllm = load_dllm({"family": family})
    _, states = _states(dllm, c4_path)
    report = quantize_model(dllm, states, {"method": "slim", "group_size": 16}, PipelineSpec(progress=False))
    assert len(report.layers) == 14
    for row in report.layers:
        orders = json.loads(row["orders"])
        assert sum(orders) == 2 * len(orders) and set(orders) <= {1, 2, 3}
        assert 0 < row["proxy_error"] < 1
