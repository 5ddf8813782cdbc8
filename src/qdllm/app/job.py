"""One Hydra job: validate -> load -> calibration states (MCS) -> transform -> quantize -> save ->
activation quantization hooks -> evaluate.

Whatever happens, the job writes `results.json` (status ok | failed, with the error) and
`layers.parquet` atomically into its output dir, finishes its W&B run and frees its model and GPU
memory: Hydra's basic launcher runs every job of a multirun in one process. A failing job ends
the process in a single run; in a multirun it is recorded and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from qdllm.app.results import (
    LAYERS_FILE,
    RESULTS_FILE,
    SCHEMA_VERSION,
    environment,
    quant_summary,
    read_results,
)
from qdllm.app.summary import format_summary
from qdllm.app.tracking import NullTracker, open_tracker
from qdllm.atomic import write_json_atomic, write_parquet_atomic
from qdllm.calib.mcs import calibration_states
from qdllm.config.resolve import resolve_job
from qdllm.errors import ConfigError
from qdllm.eval.runner import evaluate
from qdllm.models.fingerprint import source_fingerprint
from qdllm.models.registry import load_dllm, save_dllm
from qdllm.packing.checkpoint import provenance, save_quantized
from qdllm.pipeline.quantize import PipelineReport, quantize_model
from qdllm.pipeline.transform import transform_model
from qdllm.quant.activations import install_activation_quant
from qdllm.quant.methods import get_method

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """What one job accumulates; written as results.json / layers.parquet whatever happens."""

    output_dir: Path
    record: dict[str, Any]
    start: float
    timing: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    tracker: Any = field(default_factory=NullTracker)

    def write(self) -> None:
        _write_record(self.record, self.layers, self.timing, self.start, self.output_dir, self.tracker)


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Run one job of `run.py`; returns its results record."""
    hydra = _hydra_info()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job = _Job(output_dir, _new_record(hydra, output_dir), time.perf_counter())
    try:
        job.record["config"] = _resolved(cfg)
    except ConfigError as exc:
        job.record["status"], job.record["error"] = "failed", str(exc)
        job.write()
        if not hydra["multirun"]:
            raise
        return job.record
    model_files = source_fingerprint(job.record["config"]["model"].get("source"))
    earlier = _earlier_run(cfg, job, model_files, hydra)
    if earlier is not None:
        return earlier
    _execute(cfg, job, hydra, model_files)
    print(format_summary(job.record))
    return job.record


def _new_record(hydra: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "error": None,
        "run": {**hydra, "output_dir": str(output_dir), "start": _now(), "end": None},
        "config": None,
        "model": {},
        "calib": {},
        "quant": {},
        "eval": {},
        "timing": {},
        "env": {},
        "memory": _gpu_memory_start(),
        "artifacts": {},
    }


def _earlier_run(
    cfg: DictConfig, job: _Job, model_files: str | None, hydra: dict[str, Any]
) -> dict[str, Any] | None:
    """The record to return without running: this job's finished one (skipped), or a failed one
    when the dir holds another finished run (left untouched); None to run the job."""
    if not cfg.skip_finished:
        return None
    try:
        finished = _finished_record(job.output_dir, job.record["config"], model_files)
    except ConfigError as exc:
        log.error("job refused: %s", exc)
        if not hydra["multirun"]:
            raise
        return {**job.record, "status": "failed", "error": str(exc)}
    if finished is not None:
        print(f"[qdllm] {job.output_dir} already holds a finished run of this config; skipping it")
    return finished


def _execute(cfg: DictConfig, job: _Job, hydra: dict[str, Any], model_files: str | None) -> None:
    """Resolve, load, calibrate, quantize, evaluate and save; a failure is recorded (and raised
    unless a multirun goes on); the record is written and the model freed in every case."""
    dllm = None
    try:
        specs = resolve_job(cfg)
        _start(cfg, specs, job, hydra)
        with _timed(job.timing, "load_model"):
            dllm = load_dllm(specs.model)
        job.record["model"] = _model_record(specs, dllm, model_files)
        report = _quantize(dllm, specs, job)
        if cfg.save_model:
            with _timed(job.timing, "save_model"):
                save_dllm(dllm, job.output_dir / "model")
            job.record["artifacts"]["model"] = "model"
        # every method alike: the evaluation sees the WxAy model (no hook with act=none)
        hooks = install_activation_quant(dllm, specs.act)
        job.record["quant"]["act"] = {
            **dataclasses.asdict(specs.act),
            "linears": hooks.linears,
            "outputs": hooks.outputs,
        }
        with _timed(job.timing, "eval"):
            job.record["eval"] = evaluate(dllm, specs.eval)
        if cfg.pack:  # after the evaluation, so that the model card carries the scores
            _save_packed(dllm, specs, report, job)
        job.record["status"] = "ok"
        if not cfg.keep_checkpoints and specs.pipeline.checkpoint_dir:
            shutil.rmtree(specs.pipeline.checkpoint_dir, ignore_errors=True)
    except BaseException as exc:
        job.record["status"] = "failed"
        job.record["error"] = f"{type(exc).__name__}: {exc}"
        job.record["traceback"] = traceback.format_exc()
        log.error("job failed: %s", job.record["error"])
        if not hydra["multirun"] or not isinstance(exc, Exception):
            raise
    finally:
        job.write()
        dllm = None
        _free_memory()


def _start(cfg: DictConfig, specs, job: _Job, hydra: dict[str, Any]) -> None:
    """Print the config, seed every generator, record the environment, open the tracker."""
    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    _seed_everything(cfg.seed)
    job.record["env"] = environment(specs.model.device)
    job.tracker = open_tracker(
        specs.logger,
        job.record["config"],
        job.output_dir,
        hydra["override_dirname"] or "default",
        _group(cfg, hydra),
    )


def _model_record(specs, dllm, model_files: str | None) -> dict[str, Any]:
    return {
        "name": specs.model.name,
        "family": dllm.family,
        "source": specs.model.source,
        "dtype": specs.model.dtype,
        "n_params": sum(p.numel() for p in dllm.model.parameters()),
        "source_fingerprint": model_files,
    }


def _quantize(dllm, specs, job: _Job) -> PipelineReport | None:
    """MCS calibration states, the FP model's transform (`quant.transform`), then the pipeline
    (skipped for a method that does not quantize)."""
    method = get_method(specs.quant.method)
    report, transformed = None, {}
    if method.quantizes or specs.transform.enabled:
        with _timed(job.timing, "calibration_data"):
            windows, states = calibration_states(dllm, specs.data, specs.mcs)
        job.record["calib"] = {"windows": len(windows), "states": len(states), "tokens": states.numel()}
        with _timed(job.timing, "transform"):
            transformed = transform_model(dllm, states, specs.transform, specs.pipeline)
    if method.quantizes:
        report = quantize_model(dllm, states, specs.quant, specs.pipeline)
        job.timing.update(report.timing)
        job.layers = report.layers
    job.record["quant"] = {
        **quant_summary(job.layers, job.record["model"]["n_params"], specs.quant.method),
        "abmp_ratio": specs.quant.abmp_ratio if method.supports_abmp else 0.0,
        "abmp_scope": specs.quant.abmp_scope,
        "transform": transformed,
    }
    return report


def _save_packed(dllm, specs, report: PipelineReport | None, job: _Job) -> None:
    if report is None:
        job.record["artifacts"]["packed"] = (
            f"not written: quant.method={specs.quant.method} has nothing to pack"
        )
        return
    with _timed(job.timing, "save_packed"):
        sizes = save_quantized(
            dllm,
            report.packed,
            job.output_dir / "packed",
            provenance(
                specs.quant,
                job.record["quant"]["bits_per_weight"],
                {"mcs": specs.mcs.enabled, "nsamples": specs.data.nsamples, "seqlen": specs.data.seqlen},
            ),
            {"base_model": specs.model.source, "config": job.record["config"], "eval": job.record["eval"]},
        )
    job.record["quant"]["packed_bytes"] = sizes
    job.record["artifacts"]["packed"] = "packed"


def _write_record(record, layers, timing, start, output_dir: Path, tracker) -> None:
    if record["status"] == "running":  # interrupted before the job could record a verdict
        record["status"], record["error"] = "failed", "interrupted"
    record["timing"] = {**timing, "total": time.perf_counter() - start}
    if torch.cuda.is_available():
        record["memory"]["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    record["run"]["end"] = _now()
    frame = pd.DataFrame(layers)
    if layers:
        write_parquet_atomic(output_dir / LAYERS_FILE, frame)
        record["artifacts"]["layers"] = LAYERS_FILE
    write_json_atomic(output_dir / RESULTS_FILE, record)
    try:
        tracker.log_results(record, frame)
    except Exception as exc:  # the dashboard is optional; results.json is already on disk
        log.warning("could not log to the tracker: %s", exc)
    finally:
        tracker.finish(record["status"] == "ok")


def _finished_record(
    output_dir: Path, config: dict[str, Any], model_files: str | None
) -> dict[str, Any] | None:
    """The finished record in `output_dir` when it is this job's; refuse one of another job."""
    previous = read_results(output_dir)
    if previous is None or previous.get("status") != "ok":
        return None
    if previous.get("config") != config:
        raise ConfigError(
            f"hydra.run.dir={output_dir} holds a finished run of another config; choose a new "
            "output dir, or set skip_finished=false to overwrite it"
        )
    # records written before fingerprints existed carry none: their config is all there is to match
    recorded = previous.get("model", {}).get("source_fingerprint", model_files)
    if recorded != model_files:
        raise ConfigError(
            f"hydra.run.dir={output_dir} holds a finished run on other files at model.source="
            f"{config['model'].get('source')!r} (fingerprint {recorded} -> {model_files}); choose a new "
            "output dir, or set skip_finished=false to overwrite it"
        )
    return previous


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:
        raise ConfigError(f"config does not resolve: {exc}") from exc


def _hydra_info() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"multirun": False, "job_num": 0, "override_dirname": "", "sweep_dir": None}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "multirun": multirun,
        "job_num": hc.job.num if multirun else 0,
        "override_dirname": hc.job.override_dirname,
        "sweep_dir": hc.sweep.dir if multirun else None,
    }


def _group(cfg: DictConfig, hydra: dict[str, Any]) -> str:
    if cfg.logger.group:
        return cfg.logger.group
    return f"{cfg.task_name}/{Path(hydra['sweep_dir']).name}" if hydra["multirun"] else cfg.task_name


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)


@contextmanager
def _timed(timing: dict[str, float], key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0


def _gpu_memory_start() -> dict[str, float]:
    """GPU memory held when the job starts (a multirun's earlier jobs must have released theirs)."""
    if not torch.cuda.is_available():
        return {}
    torch.cuda.reset_peak_memory_stats()
    return {"gpu_allocated_at_start_gb": torch.cuda.memory_allocated() / 2**30}


def _free_memory() -> None:
    """Release the job's model and GPU memory before the next job of a multirun."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
