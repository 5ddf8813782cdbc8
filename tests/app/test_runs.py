"""End-to-end jobs through `run.py` (subprocesses, tiny models, offline)."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.app.conftest import read_record, run_cli

pytestmark = pytest.mark.slow
RESULT_KEYS = {
    "schema_version",
    "status",
    "error",
    "run",
    "config",
    "model",
    "calib",
    "quant",
    "eval",
    "timing",
}
RESULT_KEYS |= {"env", "artifacts"}


def test_abmp_sweep_on_tiny_llada_writes_one_ok_record_per_job(tmp_path):
    proc = run_cli(
        "debug=tiny_cpu", f"hydra.sweep.dir={tmp_path}", "model=tiny_llada", "abmp.ratio=0.05,0.1", "-m"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == [
        "0_abmp.ratio=0.05,debug=tiny_cpu,model=tiny_llada",
        "1_abmp.ratio=0.1,debug=tiny_cpu,model=tiny_llada",
    ]
    hists = []
    for job, ratio in zip(jobs, (0.05, 0.1)):
        record = read_record(tmp_path / job)
        assert set(record) >= RESULT_KEYS and record["status"] == "ok" and record["error"] is None
        assert record["config"]["abmp"]["ratio"] == ratio and record["quant"]["abmp_ratio"] == ratio
        assert record["model"]["family"] == "llada" and record["model"]["n_params"] > 0
        assert record["env"]["torch"] == torch.__version__
        assert record["eval"]["ppl"]["ppl"] > 1
        layers = pd.read_parquet(tmp_path / job / record["artifacts"]["layers"])
        assert len(layers) == 2 * 7  # 2 blocks x (q, k, v, attn_out, ff_proj, up_proj, ff_out)
        # ABMP moves as many weights up as down: the weight-averaged order stays K = 2 exactly
        assert record["quant"]["avg_order_or_bits"] == pytest.approx(2.0, abs=1e-12)
        hists.append(record["quant"]["orders_hist"])
    assert hists[0] != hists[1]  # the larger ratio moves more groups
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["status"].tolist() == ["ok", "ok"]


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run_cli("debug=tiny_cpu", "calib.nsamples=100000,4", f"hydra.sweep.dir={tmp_path}", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = read_record(tmp_path / "0_calib.nsamples=100000,debug=tiny_cpu")
    assert failed["status"] == "failed" and "corpus too small" in failed["error"]
    assert "calib.nsamples" in failed["error"] and failed["quant"] == {}
    assert read_record(tmp_path / "1_calib.nsamples=4,debug=tiny_cpu")["status"] == "ok"
    assert "1 ok, 1 failed" in proc.stdout


def test_single_run_saves_the_model_skips_when_finished_and_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        proc = run_cli("debug=tiny_cpu", "save_model=true", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (first / "checkpoints").exists()  # block checkpoints are removed after success
    record = read_record(first)
    again = run_cli("debug=tiny_cpu", "save_model=true", f"hydra.run.dir={first}")
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    assert read_record(first) == record
    other = run_cli("debug=tiny_cpu", "save_model=true", "abmp.ratio=0.1", f"hydra.run.dir={first}")
    assert other.returncode != 0 and "another config" in other.stderr
    assert read_record(first) == record  # the finished run's record is untouched


def test_wandb_offline_run_lives_in_the_job_dir(tmp_path):
    proc = run_cli("debug=tiny_cpu", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "ok"
