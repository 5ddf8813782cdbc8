"""The paper's tables rebuilt from `load_runs` frames (ok jobs only).

Metrics: each task's primary metric (`primary_metric`); the tiny sweeps report ELBO perplexity
(lower is better) where the paper reports accuracy.
"""

from __future__ import annotations

import pandas as pd

from analysis.runs import METHOD_LABELS

# first one a task reports wins; generation tasks: lm-eval's flexible-extract filter
PRIMARY_METRICS = ("acc", "exact_match/flexible-extract", "exact_match", "pass@1", "pass_at_1", "ppl")
MODEL_ORDER = ("llada_base", "llada_instruct", "llada_1_5", "dream_base", "dream_instruct")
PARTS = {
    "a": ("config.calib.mcs", "MCS"),
    "b": ("config.abmp.ratio", "ABMP"),
    "c": ("daq_component", "DAQ component"),
    "d": ("config.calib.nsamples", "Calib. data size"),
}
PAPER_TABLE3_GB = {"FP": 16.09, "GPTQ": 3.70, "SliM-LLM": 3.72, "Quant-dLLM": 3.69}  # LLaDA-8B-Base
DAQ_COMPONENTS = {(False, False): "baseline", (True, False): "RSR w/o DOR", (True, True): "RSR w/ DOR"}


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs, newest first (tables keep the newest run of a repeated configuration)."""
    ok = runs[runs["status"] == "ok"]
    return ok.sort_values("run.end", ascending=False, kind="stable") if "run.end" in ok else ok.copy()


def prefer_experiment(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """The runs of the experiments named `prefix*` (e.g. table2b_abmp_tiny) when there are any,
    else every run: a results root holding several sweeps yields each table from its own sweep."""
    mine = runs["config.task_name"].astype(str).str.startswith(prefix)
    return runs[mine] if mine.any() else runs


def primary_metric(runs: pd.DataFrame, task: str) -> str:
    """`eval.<task>.<metric>` for the first of PRIMARY_METRICS the runs report for `task`."""
    for metric in PRIMARY_METRICS:
        column = f"eval.{task}.{metric}"
        if column in runs.columns and runs[column].notna().any():
            return column
    raise KeyError(f"no run reports a metric of task {task!r} among {PRIMARY_METRICS}")


def _tasks(runs: pd.DataFrame) -> list[str]:
    tasks = {c.split(".")[1] for c in runs.columns if c.startswith("eval.") and c.count(".") >= 2}
    return sorted(t for t in tasks if any(f"eval.{t}.{m}" in runs.columns for m in PRIMARY_METRICS))


def _ordered(frame: pd.DataFrame, levels: list[str]) -> pd.DataFrame:
    """Sort by the paper's model order, then method order (unknown names last, alphabetically)."""
    rank = {
        "model": {m: i for i, m in enumerate(MODEL_ORDER)},
        "label": {m: i for i, m in enumerate(METHOD_LABELS.values())},
    }

    def key(column: pd.Series) -> pd.Series:
        order = rank.get(column.name)
        return column.map(lambda v: (order.get(v, len(order)), str(v))) if order else column

    return frame.sort_values(levels, key=key, kind="stable")


def table1(runs: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Paper Table 1: rows (model, method), one column per task (primary metric) and their mean.

    `metric` picks the same metric name for every task instead (e.g. "acc_norm").
    """
    runs = prefer_experiment(_ok(runs), "table1")
    columns = {}
    for task in _tasks(runs):
        column = f"eval.{task}.{metric}" if metric else primary_metric(runs, task)
        if column in runs.columns:
            columns[column] = task
    table = _ordered(runs, ["model", "label"])[["model", "label", *columns]].rename(columns=columns)
    table = table.rename(columns={"label": "method"}).drop_duplicates(["model", "method"])
    table = table.set_index(["model", "method"])
    table["avg"] = table.mean(axis=1)
    return table


def table2(runs: pd.DataFrame, part: str, metric: str | None = None) -> pd.DataFrame:
    """Paper Table 2 (Quant-dLLM ablations): rows = model, columns = the factor of `part`.

    part: "a" MCS on/off (calib.mcs), "b" ABMP ratio, "c" DAQ component (from quant.rsr /
    quant.dor), "d" calibration set size (calib.nsamples). `metric`: a column name such as
    "eval.mmlu.acc"; default the primary metric of the first task.
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r}: use one of {sorted(PARTS)}")
    runs = prefer_experiment(_ok(runs), f"table2{part}")
    runs = runs[runs["method"] == "daq"].copy()
    if runs.empty:
        raise ValueError("no finished Quant-dLLM (quant.method=daq) runs to tabulate")
    metric = metric or primary_metric(runs, _tasks(runs)[0])
    factor, title = PARTS[part]
    if part == "c":
        runs[factor] = [
            DAQ_COMPONENTS.get((bool(r), bool(d)), f"rsr={r},dor={d}")
            for r, d in zip(runs["config.quant.rsr"], runs["config.quant.dor"])
        ]
    if part == "a":
        runs[factor] = runs[factor].map({False: "✗", True: "✓"})
    table = runs.pivot_table(index="model", columns=factor, values=metric, aggfunc="mean")
    if part == "c":
        table = table[[c for c in DAQ_COMPONENTS.values() if c in table.columns]]
    table.columns.name = title
    return _ordered(table.reset_index(), ["model"]).set_index("model")


def table3(runs: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 3: rows (model, method): nominal bits, effective bits with scales, memory (GB)."""
    runs = prefer_experiment(_ok(runs), "table3")
    columns = {
        "quant.avg_order_or_bits": "bits",
        "quant.bits_per_weight": "bits_with_scales",
        "quant.model_size_gb": "memory_gb",
    }
    if "quant.packed_bytes.total" in runs.columns:
        runs = runs.assign(**{"quant.packed_gb": runs["quant.packed_bytes.total"] / 1e9})
        columns["quant.packed_gb"] = "packed_gb"
    table = _ordered(runs, ["model", "label"])[["model", "label", *columns]]
    table = table.rename(columns={"label": "method", **columns})
    paper = [
        PAPER_TABLE3_GB.get(m) if model == "llada_base" else None
        for model, m in zip(table["model"], table["method"])
    ]
    table["paper_gb"] = paper
    return table.drop_duplicates(["model", "method"]).set_index(["model", "method"])
