"""Rebuild the paper's tables and figures from qdllm results directories (never from W&B).

from analysis import load_runs, table1, table2, table3
runs = load_runs("logs/table2b_abmp_tiny")
table2(runs, "b")
"""

from analysis.plots import order_map, plot_accuracy_vs_size, plot_layer_metric, plot_order_map
from analysis.runs import load_layers, load_runs
from analysis.tables import prefer_experiment, primary_metric, table1, table2, table3

__all__ = [
    "load_layers",
    "load_runs",
    "order_map",
    "plot_accuracy_vs_size",
    "plot_layer_metric",
    "plot_order_map",
    "prefer_experiment",
    "primary_metric",
    "table1",
    "table2",
    "table3",
]
