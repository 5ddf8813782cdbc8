"""Figures: accuracy vs model size (paper Figure 1) and per-layer error / order maps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.tables import prefer_experiment, table1, table3


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))[1]


def plot_accuracy_vs_size(runs: pd.DataFrame, metric: str | None = None, ax=None):
    """Paper Figure 1: the task average of `table1` against the model's memory (GB), one marker
    style per method, each point labelled with its model."""
    ax = _axes(ax)
    runs = prefer_experiment(runs[runs["status"] == "ok"], "table1")
    scores = table1(runs, metric)["avg"]
    sizes = table3(runs)["memory_gb"]
    joined = pd.concat([scores, sizes], axis=1, join="inner").reset_index()
    for method, group in joined.groupby("method", sort=False):
        ax.scatter(group["memory_gb"], group["avg"], label=method, s=40)
        for row in group.itertuples(index=False):
            ax.annotate(row.model, (row.memory_gb, row.avg), fontsize=7, alpha=0.7)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4))
    ax.set_xlabel("model memory (GB)")
    ax.set_ylabel(f"task average ({metric or 'primary metric'})")
    ax.legend(fontsize=8)
    return ax


def plot_layer_metric(layers: pd.DataFrame, metric: str = "proxy_error", ax=None):
    """`metric` of every quantized Linear in pipeline order, one line per (model, method) run."""
    ax = _axes(ax)
    for (model, label, _), group in layers.groupby(["model", "label", "dir"], sort=False):
        ax.plot(np.arange(len(group)), group[metric].to_numpy(), marker=".", label=f"{model} / {label}")
    ax.set_xlabel("Linear (block-major, stage order)")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return ax


def order_map(layers: pd.DataFrame) -> pd.DataFrame:
    """The order (DAQ K, or bits) of every column group of one run: one row per Linear
    ("block.name", pipeline order), one column per group index; shorter rows padded with NaN."""
    rows = {f"{r.block}.{r.name}": json.loads(r.orders) for r in layers.itertuples(index=False)}
    width = max(len(v) for v in rows.values())
    return pd.DataFrame.from_dict(
        {k: v + [np.nan] * (width - len(v)) for k, v in rows.items()}, orient="index"
    ).rename_axis(index="linear", columns="group")


def plot_order_map(layers: pd.DataFrame, ax=None):
    """Heat map of `order_map` for one run: where ABMP moved groups to K-1 and K+1."""
    ax = _axes(ax)
    grid = order_map(layers)
    values = grid.to_numpy(dtype=float)
    low, high = int(np.nanmin(values)), int(np.nanmax(values))
    image = ax.imshow(
        values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=low - 0.5, vmax=high + 0.5
    )
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=6)
    ax.set_xlabel("column group")
    ax.figure.colorbar(image, ax=ax, ticks=range(low, high + 1), label="order")
    return ax
