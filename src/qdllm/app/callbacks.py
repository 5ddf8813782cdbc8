"""Hydra callbacks: at the end of a multirun, one table of every job's verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qdllm.app.results import RESULTS_FILE


def sweep_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per job directory under `sweep_dir`: job, overrides, status, bits, eval metrics, error."""
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{RESULTS_FILE}")):
        record = json.loads(path.read_text())
        row: dict[str, Any] = {
            "job": record["run"].get("job_num"),
            "overrides": record["run"].get("override_dirname"),
            "status": record["status"],
            "bits_per_weight": (record.get("quant") or {}).get("bits_per_weight"),
        }
        for task, metrics in (record.get("eval") or {}).items():
            row.update({f"{task}/{k}": v for k, v in metrics.items() if k != "windows"})
        row["error"] = record.get("error")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("job") if rows else pd.DataFrame()


class SweepSummary(Callback):
    """Writes `<sweep dir>/summary.csv` and prints it; says how many jobs failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir)
        if table.empty:
            return
        tmp = sweep_dir / "summary.csv.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(sweep_dir / "summary.csv")
        failed = int((table["status"] != "ok").sum())
        with pd.option_context("display.width", 160, "display.max_colwidth", 60):
            print(table.drop(columns="error").to_string(index=False))
        print(f"[qdllm] sweep {sweep_dir}: {len(table) - failed} ok, {failed} failed (summary.csv)")
