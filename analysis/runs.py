"""Load the results.json records (and layers.parquet tables) of qdllm jobs into pandas."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

RESULTS_FILE = "results.json"
LAYERS_FILE = "layers.parquet"
METHOD_LABELS = {
    "none": "FP",
    "rtn": "RTN",
    "gptq": "GPTQ",
    "gptaq": "GPTAQ",
    "slim": "SliM-LLM",
    "daq": "Quant-dLLM",
}


def _result_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    roots = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files.extend(sorted(root.rglob(RESULTS_FILE)))
        else:
            raise FileNotFoundError(f"{root} is neither a results.json nor a directory of runs")
    return files


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per job found under `paths` (directories searched recursively for results.json).

    Columns are the record flattened with dots (`config.abmp.ratio`, `quant.bits_per_weight`,
    `eval.ppl.ppl`, `timing.total`, ...) plus `dir` (the job's directory), `model` (config name),
    `method` (quant.method) and `label` (the paper's method name). Failed jobs are kept with their
    `status` and `error`; the table functions use the ok ones.
    """
    records = []
    for path in _result_files(paths):
        record = json.loads(path.read_text())
        record.pop("traceback", None)
        record["dir"] = str(path.parent)
        records.append(record)
    if not records:
        return pd.DataFrame(columns=["dir", "status", "model", "method", "label"])
    frame = pd.json_normalize(records, sep=".")
    frame["model"] = frame["config.model.name"]
    frame["method"] = frame["config.quant.method"]
    frame["label"] = frame["method"].map(METHOD_LABELS).fillna(frame["method"])
    return frame


def load_layers(runs: pd.DataFrame) -> pd.DataFrame:
    """Every job's layers.parquet (per-Linear metrics), tagged with `dir`, `model` and `label`."""
    frames = []
    for row in runs.itertuples(index=False):
        path = Path(row.dir) / LAYERS_FILE
        if path.is_file():
            layers = pd.read_parquet(path)
            layers["dir"], layers["model"], layers["label"] = row.dir, row.model, row.label
            frames.append(layers)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
