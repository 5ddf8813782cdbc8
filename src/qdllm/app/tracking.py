"""Experiment tracking sinks. W&B is a dashboard only: the job's canonical record is on disk.

One W&B run per job (`reinit="finish_previous"` as a safety net, `finish` in the job's `finally`),
config = the resolved Hydra config, offline unless `logger.mode` (from WANDB_MODE) says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


class NullTracker:
    """`logger=none`."""

    def log_results(self, results: dict[str, Any], layers: pd.DataFrame) -> None:
        """Nothing to do: results.json is the record."""

    def finish(self, ok: bool) -> None:
        """Nothing to close."""


class WandbTracker(NullTracker):
    def __init__(self, logger_cfg: Any, config: dict[str, Any], output_dir: Path, name: str, group: str):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            dir=str(output_dir),
            config=config,
            group=group,
            name=name,
            job_type=logger_cfg.job_type,
            tags=list(config.get("tags", [])),
            reinit="finish_previous",
            settings=wandb.Settings(console="off"),
        )
        self.log_layers = logger_cfg.log_layers

    def log_results(self, results: dict[str, Any], layers: pd.DataFrame) -> None:
        summary = {"status": results["status"]}
        for section in ("quant", "timing"):
            summary.update(_flatten({section: results.get(section) or {}}))
        for task, metrics in (results.get("eval") or {}).items():
            summary.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
        self.run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
        if self.log_layers and not layers.empty:
            self.run.log({"layers": self._wandb.Table(dataframe=layers)})

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def open_tracker(logger_cfg: Any, config: dict[str, Any], output_dir: Path, name: str, group: str):
    if logger_cfg.name == "wandb":
        return WandbTracker(logger_cfg, config, output_dir, name, group)
    return NullTracker()
