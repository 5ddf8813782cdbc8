"""`run_job` in-process: on failure the tracker is finished, the model released, the record written."""

import gc
import json
import weakref

import pytest

import qdllm.app.job as job_module
from qdllm.app import run_job
from qdllm.app.results import read_results
from qdllm.models import load_dllm


class RecordingTracker:
    def __init__(self):
        self.logged, self.finished = None, None

    def log_results(self, record, layers):
        self.logged = (record["status"], len(layers))

    def finish(self, ok):
        self.finished = ok


@pytest.mark.parametrize("nsamples", [4, 100000], ids=["ok", "corpus-too-small"])
def test_job_finishes_tracker_and_releases_the_model(composer, monkeypatch, tmp_path, nsamples):
    tracker, models = RecordingTracker(), []

    def tracked_load(spec):
        dllm = load_dllm(spec)
        models.append(weakref.ref(dllm.model))
        return dllm

    monkeypatch.setattr(job_module, "open_tracker", lambda *args: tracker)
    monkeypatch.setattr(job_module, "load_dllm", tracked_load)
    cfg = composer("debug=tiny_cpu", f"calib.nsamples={nsamples}")
    if nsamples == 4:
        record = run_job(cfg)
        assert record["status"] == "ok" and tracker.finished is True
        assert tracker.logged == ("ok", 14)
    else:  # a single run re-raises after recording, so the process exits non-zero
        with pytest.raises(ValueError, match="corpus too small"):
            run_job(cfg)
        assert tracker.finished is False and tracker.logged == ("failed", 0)
    assert read_results(tmp_path)["status"] == ("ok" if nsamples == 4 else "failed")
    gc.collect()
    assert len(models) == 1 and models[0]() is None  # nothing keeps the job's model alive


@pytest.mark.parametrize(("method", "applied"), [("gptq", 0.0), ("daq", 0.2)])
def test_packed_checkpoint_records_the_abmp_ratio_the_job_applied(composer, tmp_path, method, applied):
    """ABMP is DAQ's: a GPTQ job with abmp.ratio set applies none, and results.json and the
    checkpoint's quantization_config both say so."""
    record = run_job(
        composer("debug=tiny_cpu", f"quant={method}", "abmp.ratio=0.2", "pack=true", "eval=none")
    )
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert record["quant"]["abmp_ratio"] == config["quantization_config"]["abmp_ratio"] == applied
