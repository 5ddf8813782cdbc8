"""Model fingerprints: a local model rewritten in place must not match finished work on the old one."""

import os

import pytest
import torch

from qdllm.models import load_dllm, save_dllm
from qdllm.models.fingerprint import EDGE_BYTES, source_fingerprint, weights_digest
from qdllm.pipeline import PipelineSpec, quantize_model
from tests.app.conftest import read_record, run_cli
from tests.pipeline.conftest import quantize_killed_after_block_zero
from tests.pipeline.test_pipeline import _states


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_source_fingerprint_tells_same_size_rewrites_apart(tmp_path):
    weights = bytearray(os.urandom(3 * EDGE_BYTES))
    _write(tmp_path / "m" / "model.safetensors", bytes(weights))
    _write(tmp_path / "m" / "config.json", b"{}")
    first = source_fingerprint(str(tmp_path / "m"))
    assert first == source_fingerprint(str(tmp_path / "m"))  # deterministic
    weights[-1] ^= 0xFF  # same size, last weight byte differs (a retrained adapter)
    _write(tmp_path / "m" / "model.safetensors", bytes(weights))
    rewritten = source_fingerprint(str(tmp_path / "m"))
    assert rewritten != first
    (tmp_path / "m" / "config.json").rename(tmp_path / "m" / "other.json")
    assert source_fingerprint(str(tmp_path / "m")) not in (first, rewritten)  # names count
    single = tmp_path / "m" / "model.safetensors"
    assert source_fingerprint(str(single)) not in (None, first)  # a single file (a GGUF) works too
    assert source_fingerprint("GSAI-ML/LLaDA-8B-Base") is None and source_fingerprint(None) is None


def test_model_card_and_plots_do_not_change_the_fingerprint(tmp_path):
    _write(tmp_path / "m" / "adapter.safetensors", os.urandom(1000))
    _write(tmp_path / "m" / "tokenizer.json", b"{}")
    before = source_fingerprint(str(tmp_path / "m"))
    _write(tmp_path / "m" / "README.md", b"# model card with new scores")
    _write(tmp_path / "m" / "loss_curve.png", os.urandom(50))
    _write(tmp_path / "m" / "loss_curve.csv", b"step,loss\n1,4.0\n")
    assert source_fingerprint(str(tmp_path / "m")) == before
    _write(tmp_path / "m" / "tokenizer.json", b'{"a": 1}')  # a file the loader reads still counts
    assert source_fingerprint(str(tmp_path / "m")) != before


def test_weights_digest_changes_with_any_whole_tensor_and_not_with_a_reload():
    a, b = load_dllm({"family": "llada", "seed": 0}), load_dllm({"family": "llada", "seed": 0})
    assert weights_digest(a.model) == weights_digest(b.model)
    with torch.no_grad():
        next(iter(b.model.parameters())).mul_(1.001)
    assert weights_digest(a.model) != weights_digest(b.model)
    assert weights_digest(a.model) != weights_digest(load_dllm({"family": "llada", "seed": 1}).model)


def test_block_checkpoints_of_other_weights_are_refused(c4_path, tmp_path, monkeypatch):
    cfg = {"method": "daq", "abmp_ratio": 0.5}
    first = load_dllm({"family": "llada", "seed": 0})
    _, states = _states(first, c4_path)
    spec = PipelineSpec(progress=False, checkpoint_dir=str(tmp_path))
    quantize_killed_after_block_zero(monkeypatch, first, states, cfg, spec, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="another config"):
        quantize_model(load_dllm({"family": "llada", "seed": 1}), states, cfg, spec)


def test_a_finished_job_on_rewritten_model_files_is_refused_not_skipped(tmp_path):
    source, job = tmp_path / "model", tmp_path / "job"
    save_dllm(load_dllm({"family": "llada", "seed": 0}), source)
    args = ("debug=tiny_cpu", f"model.source={source}", f"hydra.run.dir={job}")
    assert run_cli(*args).returncode == 0
    record = read_record(job)
    assert record["model"]["source_fingerprint"] == source_fingerprint(str(source))
    assert "already holds a finished run" in run_cli(*args).stdout  # same files: skipped
    save_dllm(load_dllm({"family": "llada", "seed": 1}), source)  # same config, other weights
    again = run_cli(*args)
    assert again.returncode != 0 and "other files at model.source" in again.stderr
    assert read_record(job) == record
