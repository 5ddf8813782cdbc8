"""Figures of `qdllm.analysis.outliers`: paper-style 3-D |x| surfaces and the statistics against t.

Each figure is rendered off-screen (Agg) into memory and written in one step.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qdllm.atomic import write_bytes_atomic  # noqa: E402

SUBSET_STYLES = {"all": "-", "mask": "--", "visible": ":"}
DPI = 90


def max_pool_plane(plane: torch.Tensor, max_points: int) -> torch.Tensor:
    """(L, C) |x| -> at most (max_points, max_points) by max-pooling each axis in equal bins (the
    peaks the plot is about survive; bins are ceil(size / max_points) wide, the last may be narrower)."""
    pooled = plane
    for dim in (0, 1):
        width = math.ceil(pooled.shape[dim] / max_points)
        if width > 1:
            moved = pooled.movedim(dim, -1).unsqueeze(0)
            moved = F.max_pool1d(moved, width, width, ceil_mode=True)
            pooled = moved.squeeze(0).movedim(-1, dim)
    return pooled


def surfaces(report, path: Path) -> None:
    """3-D |x| over token x channel of `report.plot_block`, one column per layer type, one row per
    (state, t) at the smallest and largest t (clean vs most masked), as in the study's Fig. 1-2."""
    ts = sorted({min(report.spec.ts), max(report.spec.ts)})
    rows = [(state, t) for (state, t) in report.planes if t in ts]
    kinds = list(next(iter(report.planes.values())))
    fig = plt.figure(figsize=(4.2 * len(kinds), 3.6 * len(rows)))
    for r, key in enumerate(rows):
        for c, kind in enumerate(kinds):
            plane = report.planes[key][kind]
            pooled = max_pool_plane(plane, report.spec.plot_max_points).numpy()
            tok_step = plane.shape[0] / pooled.shape[0]
            ch_step = plane.shape[1] / pooled.shape[1]
            ax = fig.add_subplot(len(rows), len(kinds), r * len(kinds) + c + 1, projection="3d")
            grid_ch, grid_tok = torch.meshgrid(
                torch.arange(pooled.shape[1]) * ch_step,
                torch.arange(pooled.shape[0]) * tok_step,
                indexing="xy",
            )
            ax.plot_surface(grid_tok.numpy(), grid_ch.numpy(), pooled, cmap="coolwarm", linewidth=0)
            state, t = key
            label = "" if state == "original" else f"{state}, "
            ax.set_title(
                f"block {report.plot_block} {kind} input\n{label}t={t:g}, max |x| {plane.max():.3g}",
                fontsize=9,
            )
            ax.set_xlabel("token", fontsize=8)
            ax.set_ylabel("channel", fontsize=8)
            ax.set_zlabel("|x|", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(
        f"{report.model}: |x| at Linear inputs (max-pooled to <= {report.spec.plot_max_points} per axis)"
    )
    _save(fig, path)


def massive_vs_mask_ratio(summary: pd.DataFrame, path: Path) -> None:
    """Share of tokens carrying a massive value, max/median and top-k share against t, per layer type;
    solid: all tokens, dashed: mask tokens, dotted: visible tokens; one line colour per layer type."""
    panels = [
        ("massive_token_share", "tokens with a massive value (mean over blocks)"),
        ("max_median", "max/median |x| (median over blocks)"),
        ("topk_share", "top-k channel share of |x| mass (mean)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0))
    states = list(dict.fromkeys(summary["state"]))
    kinds = list(dict.fromkeys(summary["layer_type"]))
    colours = dict(zip(kinds, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (column, title) in zip(axes, panels):
        for state in states:
            for kind in kinds:
                for subset, style in SUBSET_STYLES.items():
                    rows = summary[
                        (summary["state"] == state)
                        & (summary["layer_type"] == kind)
                        & (summary["subset"] == subset)
                    ].sort_values("t")
                    label = f"{kind} {subset}" + ("" if len(states) == 1 else f" ({state})")
                    alpha = 1.0 if state == states[0] else 0.5
                    ax.plot(
                        rows["t"],
                        rows[column],
                        style,
                        marker="o",
                        ms=3,
                        color=colours[kind],
                        alpha=alpha,
                        label=label,
                    )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("MCS mask ratio t")
        if column == "max_median":
            ax.set_yscale("log")
    axes[0].legend(fontsize=6, ncol=2)
    _save(fig, path)


def max_median_per_block(layers: pd.DataFrame, path: Path) -> None:
    """max/median |x| (all tokens) per block, one panel per layer type, one line per (state, t)."""
    rows = layers[layers["subset"] == "all"]
    kinds = list(dict.fromkeys(rows["layer_type"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), sharey=True)
    for ax, kind in zip(axes, kinds):
        for (state, t), group in rows[rows["layer_type"] == kind].groupby(["state", "t"], sort=False):
            label = f"t={t:g}" + ("" if state == "original" else f" ({state})")
            ax.plot(group["block"], group["max_median"], marker=".", label=label)
        ax.set_title(f"{kind} input", fontsize=9)
        ax.set_xlabel("block")
        ax.set_yscale("log")
    axes[0].set_ylabel("max/median |x|")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
