"""One Hydra job: validate -> load -> calibration states (MCS) -> quantize -> save -> evaluate.

Whatever happens, the job writes `results.json` (status ok | failed, with the error) and
`layers.parquet` atomically into its output dir, finishes its W&B run and frees its model and GPU
memory: Hydra's basic launcher runs every job of a multirun in one process. A failing job ends
the process in a single run; in a multirun it is recorded and the sweep goes on.
"""

from __future__ import annotations

import gc
import logging
import random
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
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
from qdllm.calib.mcs import mcs_states
from qdllm.config.resolve import resolve_job
from qdllm.data.calibration import calibration_windows, load_texts
from qdllm.errors import ConfigError
from qdllm.eval.runner import evaluate
from qdllm.models.fingerprint import source_fingerprint
from qdllm.models.registry import load_dllm, save_dllm
from qdllm.packing.checkpoint import save_quantized
from qdllm.pipeline.quantize import quantize_model

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Run one job of `run.py`; returns its results record."""
    hydra = _hydra_info()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
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
    timing: dict[str, float] = {}
    layers: list[dict[str, Any]] = []
    tracker, dllm = NullTracker(), None
    start = time.perf_counter()
    try:
        record["config"] = _resolved(cfg)
    except ConfigError as exc:
        record["status"], record["error"] = "failed", str(exc)
        _write_record(record, layers, timing, start, output_dir, tracker)
        if not hydra["multirun"]:
            raise
        return record
    model_files = source_fingerprint(record["config"]["model"].get("source"))
    try:
        finished = _finished_record(output_dir, record["config"], model_files) if cfg.skip_finished else None
    except ConfigError as exc:  # the dir holds another finished run: leave its record untouched
        log.error("job refused: %s", exc)
        if not hydra["multirun"]:
            raise
        return {**record, "status": "failed", "error": str(exc)}
    if finished is not None:
        print(f"[qdllm] {output_dir} already holds a finished run of this config; skipping it")
        return finished
    try:
        specs = resolve_job(cfg)
        if cfg.print_config:
            print(OmegaConf.to_yaml(cfg, resolve=True))
        _seed_everything(cfg.seed)
        record["env"] = environment(specs.model.device)
        tracker = open_tracker(
            specs.logger,
            record["config"],
            output_dir,
            hydra["override_dirname"] or "default",
            _group(cfg, hydra),
        )
        with _timed(timing, "load_model"):
            dllm = load_dllm(specs.model)
        n_params = sum(p.numel() for p in dllm.model.parameters())
        record["model"] = {
            "name": specs.model.name,
            "family": dllm.family,
            "source": specs.model.source,
            "dtype": specs.model.dtype,
            "n_params": n_params,
            "source_fingerprint": model_files,
        }
        if specs.quant.method != "none":
            with _timed(timing, "calibration_data"):
                windows = calibration_windows(load_texts(specs.data), dllm.tokenizer, specs.data)
                states, _ = mcs_states(windows, dllm.mask_token_id, specs.mcs)
            record["calib"] = {"windows": len(windows), "states": len(states), "tokens": states.numel()}
            report = quantize_model(dllm, states, specs.quant, specs.pipeline)
            timing.update(report.timing)
            layers = report.layers
        record["quant"] = {
            **quant_summary(layers, n_params, specs.quant.method),
            "abmp_ratio": specs.quant.abmp_ratio if specs.quant.method == "daq" else 0.0,
            "abmp_scope": specs.quant.abmp_scope,
        }
        if cfg.save_model:
            with _timed(timing, "save_model"):
                save_dllm(dllm, output_dir / "model")
            record["artifacts"]["model"] = "model"
        with _timed(timing, "eval"):
            record["eval"] = evaluate(dllm, specs.eval)
        # packed after the evaluation, so that the model card carries the scores
        if cfg.pack and specs.quant.method == "none":
            record["artifacts"]["packed"] = "not written: quant.method=none has nothing to pack"
        elif cfg.pack:
            with _timed(timing, "save_packed"):
                sizes = save_quantized(
                    dllm,
                    report.packed,
                    output_dir / "packed",
                    _packed_provenance(specs, record),
                    {"base_model": specs.model.source, "config": record["config"], "eval": record["eval"]},
                )
            record["quant"]["packed_bytes"] = sizes
            record["artifacts"]["packed"] = "packed"
        record["status"] = "ok"
        if not cfg.keep_checkpoints and specs.pipeline.checkpoint_dir:
            shutil.rmtree(specs.pipeline.checkpoint_dir, ignore_errors=True)
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        log.error("job failed: %s", record["error"])
        if not hydra["multirun"] or not isinstance(exc, Exception):
            raise
    finally:
        _write_record(record, layers, timing, start, output_dir, tracker)
        dllm = None
        _free_memory()
    print(format_summary(record))
    return record


def _packed_provenance(specs, record: dict[str, Any]) -> dict[str, Any]:
    quant = specs.quant
    return {
        "method": quant.method,
        "group_size": quant.group_size,
        "sym": quant.sym,
        "bits": quant.bits,
        "order": quant.order,
        "abmp_ratio": record["quant"]["abmp_ratio"],  # as applied: 0 for methods without ABMP
        "abmp_scope": quant.abmp_scope,
        "avg_bits_per_weight": record["quant"]["bits_per_weight"],
        "calibration": {
            "mcs": specs.mcs.enabled,
            "nsamples": specs.data.nsamples,
            "seqlen": specs.data.seqlen,
        },
        "qdllm_version": record["env"].get("qdllm"),
    }


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
