"""Activation outliers at every block Linear's input, clean and under MCS masking.

The QDLM study (§3.3, Fig. 1-2) shows 3-D plots of |x| over token x channel at Linear inputs from one
clean forward: "normal" outliers (large channels across all tokens: q/attn_out/ff_proj inputs) and
"massive" ones (extreme values on a few tokens: the ff_out/down_proj input). This module measures
them instead, per Linear input x in R^{N x C} (N tokens, C input channels), in float64:

* per-channel max |x|: cmax_j = max_n |x_nj|;
* top-k channel share of the |x| mass: sum of the k largest m_j over sum_j m_j, m_j = sum_n |x_nj|
  (k / C for a flat profile);
* Pearson kurtosis kappa = E[(v - mu)^4] / E[(v - mu)^2]^2 (3 for a Gaussian), over the whole tensor
  and per token over its channels;
* max / median of |x| (exact median, mean of the two middle values for an even count);
* massive values |x_nj| > tau * median(|x|) (tau = 100 by default, after the massive-activation
  literature): the tokens carrying one, their positions, whether they are mask tokens, and the
  share of the |x| mass they hold.

Inputs are calibration windows (`qdllm.data.calibration`) masked as MCS masks them
(`qdllm.calib.mcs`, paper §3.2 eq. 1): the prefix [0, floor(gamma L)) stays visible and every other
token is replaced by the mask token with probability 1 - alpha(t) (t itself for the linear schedule).
t = 0 is the clean forward of the study. Statistics are reported for all tokens and separately for
mask-token and visible positions; the massive level tau * median is the whole tensor's in all three,
so the subsets' massive-token counts add up to the total.

    python -m qdllm.analysis.outliers --model smol_dllm --out outliers/ --t 0 0.5 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qdllm.calib.mcs import SCHEDULES, MCSSpec, mcs_states
from qdllm.errors import ConfigError, require

LAYER_TYPES = ("qkv", "attn_out", "ffn_in", "ffn_out")
SUBSETS = ("all", "mask", "visible")
ORIGINAL = "original"


# ---------------------------------------------------------------------------------------------------
# statistics on one (N, C) input


def tokens_by_channels(x: torch.Tensor) -> torch.Tensor:
    """(..., C) activations -> (N, C) float64, N the product of the leading dimensions."""
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def median(values: torch.Tensor) -> torch.Tensor:
    """Exact median of all elements, as float64 (numpy's convention: the mean of the two middle
    values when the count is even). One selection pass (numpy's introselect, on the CPU) finds both
    middle values; it is several times faster than two `torch.kthvalue` calls."""
    flat = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    n = flat.size
    require(n > 0, "median", n, "needs at least one value")
    middle = sorted({(n - 1) // 2, n // 2})
    return torch.tensor(np.partition(flat, middle)[middle].mean(), dtype=torch.float64)


def power_sums(values: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., 4) float64 sums of v, v^2, v^3, v^4 over the last dimension."""
    v = values.to(torch.float64)
    v2 = v.square()
    return torch.stack([v.sum(-1), v2.sum(-1), (v2 * v).sum(-1), v2.square().sum(-1)], dim=-1)


def kurtosis_from_sums(count: int | torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis m4 / m2^2 from `count` values' power sums (..., 4) (`power_sums`), with the
    central moments expanded in raw moments (float64: exact enough while |mean| is not >> std)."""
    r1, r2, r3, r4 = (sums / count).unbind(-1)
    m2 = r2 - r1.square()
    m4 = r4 - 4 * r1 * r3 + 6 * r1.square() * r2 - 3 * r1.square().square()
    return m4 / m2.square()


def kurtosis(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Pearson kurtosis E[(v - mu)^4] / E[(v - mu)^2]^2 with population moments (Gaussian: 3).

    Args:
        x: any shape; computed in float64.
        dim: None for all elements (a scalar), else the dimension reduced (per token: dim=-1 on (N, C)).
    """
    v = x.reshape(-1) if dim is None else x.movedim(dim, -1)
    return kurtosis_from_sums(v.shape[-1], power_sums(v))


def channel_max_abs(x: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (C,) max_n |x_nj| in float64."""
    return tokens_by_channels(x).abs().amax(0)


def topk_channel_share(x: torch.Tensor, k: int) -> float:
    """Share of the total |x| mass held by the k channels with the most mass m_j = sum_n |x_nj|."""
    return _topk_share(tokens_by_channels(x).abs().sum(0), k)


def _topk_share(channel_mass: torch.Tensor, k: int) -> float:
    require(
        1 <= k <= channel_mass.numel(),
        "topk",
        k,
        f"must lie in [1, {channel_mass.numel()}] (the input's channels)",
    )
    return float(channel_mass.topk(k).values.sum() / channel_mass.sum())


def max_median_ratio(x: torch.Tensor) -> float:
    """max |x| / median |x| over all elements."""
    a = tokens_by_channels(x).abs()
    return float(a.max() / median(a))


def massive_level(x: torch.Tensor, threshold: float) -> float:
    """The |x| level above which a value is massive: threshold x median(|x|)."""
    return float(threshold * median(tokens_by_channels(x).abs()))


def massive_tokens(x: torch.Tensor, level: float) -> torch.Tensor:
    """(N,) bool: tokens (rows of the (N, C) view) with at least one |x_nj| > level."""
    return tokens_by_channels(x).abs().amax(-1) > level


@dataclass
class TokenView:
    """Per-token quantities of one Linear input x (B, L, C), computed once for every statistic.

    `abs_values` (N, C) float64 |x| with N = B L; `sums` (N, 4) power sums of x over channels;
    `peak` (N,) max_j |x_nj| and `peak_channel` (N,) its channel; `is_mask` (N,) bool.
    """

    batch: int
    length: int
    abs_values: torch.Tensor
    sums: torch.Tensor
    peak: torch.Tensor
    peak_channel: torch.Tensor
    is_mask: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, is_mask: torch.Tensor) -> TokenView:
        """x: (B, L, C) activations; is_mask: (B, L) bool, True where the input token is the mask token."""
        require(x.dim() == 3, "x", tuple(x.shape), "a Linear input must be (batch, length, channels)")
        require(
            tuple(is_mask.shape) == tuple(x.shape[:2]),
            "is_mask",
            tuple(is_mask.shape),
            f"must be {tuple(x.shape[:2])}",
        )
        values = tokens_by_channels(x)
        abs_values = values.abs()
        peak, peak_channel = abs_values.max(-1)
        mask = is_mask.reshape(-1).to(device=values.device, dtype=torch.bool)
        return cls(x.shape[0], x.shape[1], abs_values, power_sums(values), peak, peak_channel, mask)

    @property
    def channels(self) -> int:
        return self.abs_values.shape[1]


def split_stats(view: TokenView, topk: int, threshold: float) -> dict[str, dict[str, float]]:
    """Every statistic for all tokens, the mask-token positions and the visible positions.

    Per subset S (NaN and zero counts when S is empty): tokens |S|; max_abs, median_abs,
    max_median of |x|; topk_share; kurtosis of all |S| C values and the per-token kurtosis's mean
    and max; massive_tokens (tokens with |x| > level somewhere), massive_token_share (of |S|) and
    massive_mass_share (|x| mass above the level over the subset's |x| mass).

    Args:
        threshold: massive values are |x| > threshold x the whole input's median |x| (one level for
            all three subsets, so that the subsets' massive-token counts add up).
    """
    selectors = {"all": torch.ones_like(view.is_mask), "mask": view.is_mask, "visible": ~view.is_mask}
    medians = {
        name: float(median(view.abs_values[sel])) if sel.any() else math.nan
        for name, sel in selectors.items()
    }
    level = threshold * medians["all"]
    channel_mass = torch.stack([sel.to(torch.float64) for sel in selectors.values()]) @ view.abs_values
    token_kurt = kurtosis_from_sums(view.channels, view.sums)
    massive = view.peak > level
    heavy = view.abs_values[massive]
    massive_mass = torch.zeros_like(view.peak)
    massive_mass[massive] = (heavy * (heavy > level)).sum(-1)
    out = {}
    for mass, (name, sel) in zip(channel_mass, selectors.items()):
        n = int(sel.sum())
        if n == 0:
            out[name] = {"tokens": 0, **{key: math.nan for key in _STAT_KEYS}, "massive_tokens": 0}
            continue
        peak, mid = float(view.peak[sel].max()), medians[name]
        n_massive = int(massive[sel].sum())
        out[name] = {
            "tokens": n,
            "max_abs": peak,
            "median_abs": mid,
            "max_median": peak / mid if mid > 0 else math.inf,
            "topk_share": _topk_share(mass, topk),
            "kurtosis": float(kurtosis_from_sums(n * view.channels, view.sums[sel].sum(0))),
            "token_kurtosis_mean": float(token_kurt[sel].mean()),
            "token_kurtosis_max": float(token_kurt[sel].max()),
            "massive_tokens": n_massive,
            "massive_token_share": n_massive / n,
            "massive_mass_share": float(massive_mass[sel].sum() / mass.sum()),
        }
    return out


_STAT_KEYS = (
    "max_abs",
    "median_abs",
    "max_median",
    "topk_share",
    "kurtosis",
    "token_kurtosis_mean",
    "token_kurtosis_max",
    "massive_token_share",
    "massive_mass_share",
)


def massive_token_list(view: TokenView, level: float, limit: int) -> list[dict]:
    """The `limit` massive tokens (|x| > level somewhere) with the largest peaks: sample, position,
    mask flag, peak |x| and its channel."""
    rows = torch.nonzero(view.peak > level).reshape(-1)
    rows = rows[view.peak[rows].argsort(descending=True)][:limit].tolist()
    return [
        {
            "sample": row // view.length,
            "position": row % view.length,
            "is_mask": bool(view.is_mask[row]),
            "peak": float(view.peak[row]),
            "channel": int(view.peak_channel[row]),
        }
        for row in rows
    ]


def massive_positions(view: TokenView, level: float, limit: int) -> list[list[int]]:
    """[position, count] for the `limit` sequence positions that carry massive tokens most often,
    counted over the batch's samples (most frequent first, ties by position)."""
    hits = (view.peak > level).reshape(view.batch, view.length).sum(0)
    order = hits.argsort(descending=True, stable=True)
    return [[int(p), int(hits[p])] for p in order[:limit] if hits[p] > 0]


# ---------------------------------------------------------------------------------------------------
# collection: forward pre-hooks on every block Linear


@dataclass(frozen=True)
class LinearSite:
    """One block Linear: its block index, layer type (`LAYER_TYPES`), block-relative name, module."""

    block: int
    layer_type: str
    name: str
    module: nn.Module


def layer_groups(dllm) -> dict[str, tuple[str, ...]]:
    """Layer type -> block-relative names of the Linears reading that input (`dllm.anatomy()`)."""
    anatomy = dllm.anatomy()
    return {
        "qkv": tuple(anatomy.qkv),
        "attn_out": (anatomy.attn_out,),
        "ffn_in": tuple(anatomy.ffn_in),
        "ffn_out": (anatomy.ffn_out,),
    }


def linear_sites(dllm) -> list[LinearSite]:
    """Every block Linear of `dllm`, in block order then forward order."""
    groups = layer_groups(dllm)
    return [
        LinearSite(index, layer_type, name, block.get_submodule(name))
        for index, block in enumerate(dllm.blocks())
        for layer_type, names in groups.items()
        for name in names
    ]


@contextmanager
def capture_linear_inputs(dllm, callback: Callable[[LinearSite, torch.Tensor], None]) -> Iterator[None]:
    """Call `callback(site, x)` with each block Linear's input x (B, L, C) while the context is open."""
    handles = [
        site.module.register_forward_pre_hook(lambda _module, args, site=site: callback(site, args[0]))
        for site in linear_sites(dllm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_blocks(dllm, input_ids: torch.Tensor) -> None:
    """Embedding and every block on (B, L) ids; the LM head is skipped (its input is no block's)."""
    hidden = dllm.embed(input_ids.to(dllm.device))
    for block in dllm.blocks():
        hidden = dllm.block_forward(block, hidden)


# ---------------------------------------------------------------------------------------------------
# masked inputs


def timestep_count(ts: Sequence[float], max_timesteps: int) -> int:
    """The smallest MCS grid size T with every requested t on the grid {0} u {1/T, ..., T/T}."""
    for t in ts:
        require(0.0 <= t <= 1.0, "t", t, "mask ratios (MCS timesteps) must lie in [0, 1]")
    count = 1
    for t in ts:
        frac = Fraction(t).limit_denominator(max_timesteps)
        require(
            abs(float(frac) - t) < 1e-9,
            "t",
            t,
            f"is not k/T for any T <= max_timesteps={max_timesteps}; use a ratio such as 0.25 or 0.3",
        )
        count = math.lcm(count, frac.denominator)
    require(count <= max_timesteps, "t", list(ts), f"needs T={count} > max_timesteps={max_timesteps}")
    return count


def masked_inputs(
    windows: torch.Tensor, mask_token_id: int, ts: Sequence[float], mcs: MCSSpec, max_timesteps: int
) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """MCS states of `windows` at each requested t, from `qdllm.calib.mcs.mcs_states` itself.

    The grid is T = `timestep_count(ts)` steps with t = 0 included (`mode="full"`: every window at
    every grid t), and the rows at the requested t are kept, so the masks are the ones MCS draws.

    Args:
        windows: (n, L) int64 clean token windows.
        mcs: gamma, schedule and seed of the masking (its timesteps / mode / grid fields are set here).
    Returns:
        [(t, states (n, L) int64, is_mask (n, L) bool)] in the order of `ts`.
    """
    spec = dataclasses.replace(
        mcs, enabled=True, timesteps=timestep_count(ts, max_timesteps), include_full_visible=True, mode="full"
    )
    states, taus = mcs_states(windows, mask_token_id, spec)
    out = []
    for t in ts:
        rows = torch.isclose(taus, torch.tensor(float(t)), atol=1e-6, rtol=0.0)
        picked = states[rows]
        out.append((float(t), picked, picked != windows))
    return out


# ---------------------------------------------------------------------------------------------------
# the analysis


@dataclass
class OutlierSpec:
    """Every knob of one outlier analysis (CLI flags of the same names)."""

    ts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # MCS timesteps; 0 = the clean forward
    samples: int = 4  # calibration windows (one batch per t)
    seqlen: int = 128
    data_path: str | None = None  # calibration text (DataSpec.path); None: the bundled C4 excerpt
    seed: int = 42  # window choice and MCS masks
    gamma: float = MCSSpec.gamma  # visible prefix ratio of MCS
    schedule: str = MCSSpec.schedule
    max_timesteps: int = 100  # largest MCS grid T used to place the requested t
    massive_threshold: float = 100.0  # massive: |x| > this x median |x| (Sun et al. 2024: ~1000x and > 100)
    topk: int = 8  # channels in the top-k mass share
    list_limit: int = 8  # massive tokens and positions listed per layer in the JSON
    plot_block: int | None = None  # block of the 3-D plots; None: the clean ffn_out max/median peak
    plot_sample: int = 0  # window shown in the 3-D plots
    plot_max_points: int = 192  # 3-D surfaces are max-pooled to at most this many channels / tokens
    transform: str | None = None  # a `qdllm.transforms` registry name: analyse before and after it

    def validated(self) -> OutlierSpec:
        """Check every field; errors name the CLI flag."""
        require(len(self.ts) >= 1, "--t", list(self.ts), "give at least one mask ratio")
        require(self.samples >= 1, "--samples", self.samples, "must be >= 1")
        require(self.seqlen >= 2, "--seqlen", self.seqlen, "must be >= 2 tokens")
        require(0.0 <= self.gamma < 1.0, "--gamma", self.gamma, "prefix ratio must lie in [0, 1)")
        require(self.schedule in SCHEDULES, "--schedule", self.schedule, f"use one of {SCHEDULES}")
        require(self.max_timesteps >= 1, "--max-timesteps", self.max_timesteps, "must be >= 1")
        require(self.massive_threshold > 1.0, "--massive-threshold", self.massive_threshold, "must be > 1")
        require(self.topk >= 1, "--topk", self.topk, "must be >= 1")
        require(self.list_limit >= 0, "--list-limit", self.list_limit, "must be >= 0")
        require(
            0 <= self.plot_sample < self.samples, "--plot-sample", self.plot_sample, "must be < --samples"
        )
        require(self.plot_max_points >= 2, "--plot-max-points", self.plot_max_points, "must be >= 2")
        timestep_count(self.ts, self.max_timesteps)
        return self

    def mcs(self) -> MCSSpec:
        return MCSSpec(gamma=self.gamma, schedule=self.schedule, seed=self.seed)


@dataclass
class OutlierReport:
    """One analysis: per-layer records and the plotted planes.

    `records` has one dict per (state, t, block, layer_type): the Linears, channels, realised mask
    fraction, `stats[subset]` (`split_stats`), `massive_tokens` and `massive_positions`.
    `planes[(state, t)][layer_type]` is |x| (L, C) float32 of `plot_block` for window `plot_sample`.
    """

    spec: OutlierSpec
    model: str
    n_blocks: int
    records: list[dict]
    plot_block: int
    planes: dict[tuple[str, float], dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def layers(self) -> pd.DataFrame:
        """One row per (state, t, block, layer_type, subset): `layer_table(self.records)`."""
        return layer_table(self.records)

    def summary(self) -> pd.DataFrame:
        """Per (state, t, layer_type, subset), aggregated over blocks: `summarise(self.layers)`."""
        return summarise(self.layers, self.n_blocks)


class _Collector:
    """Hook callback of one forward: statistics per (block, layer type), the plot block's planes.

    Linears of one layer type read one input (q/k/v; gate/up), one after the other: the later ones'
    inputs are checked equal to the first's (held until the next layer type) and measured once.
    """

    def __init__(self, is_mask: torch.Tensor, spec: OutlierSpec, plot_block: int | None):
        self.is_mask, self.spec, self.plot_block = is_mask, spec, plot_block
        self.records: dict[tuple[int, str], dict] = {}
        self.current: tuple[tuple[int, str] | None, torch.Tensor | None] = (None, None)
        self.planes: dict[str, torch.Tensor] = {}

    def __call__(self, site: LinearSite, x: torch.Tensor) -> None:
        key = (site.block, site.layer_type)
        if key in self.records:
            shared = key == self.current[0] and (x is self.current[1] or torch.equal(x, self.current[1]))
            if not shared:
                raise RuntimeError(
                    f"block {site.block}: {site.name} reads another input than "
                    f"{self.records[key]['linears'][0]}, but both are {site.layer_type} Linears"
                )
            self.records[key]["linears"].append(site.name)
            return
        spec = self.spec
        self.current = (key, x)
        view = TokenView.of(x, self.is_mask)
        stats = split_stats(view, spec.topk, spec.massive_threshold)
        level = spec.massive_threshold * stats["all"]["median_abs"]
        self.records[key] = {
            "block": site.block,
            "layer_type": site.layer_type,
            "linears": [site.name],
            "channels": view.channels,
            "massive_level": level,
            "stats": stats,
            "massive_tokens": massive_token_list(view, level, spec.list_limit),
            "massive_positions": massive_positions(view, level, spec.list_limit),
        }
        if site.block == self.plot_block:
            self.planes[site.layer_type] = x[spec.plot_sample].detach().abs().float().cpu()


def measure(
    dllm, inputs: list[tuple[float, torch.Tensor, torch.Tensor]], spec: OutlierSpec, state: str = ORIGINAL
) -> tuple[list[dict], dict[float, dict[str, torch.Tensor]], int]:
    """One forward per t; returns the per-layer records, the plot planes per t and the plot block.

    Without `spec.plot_block` the plot block is the one whose ffn_out input has the largest
    max/median at the first t (the first forward keeps every block's planes until it is chosen).
    """
    records, planes = [], {}
    plot_block = spec.plot_block
    for t, ids, is_mask in tqdm(inputs, desc=f"outliers ({state})", unit="t"):
        collector = (
            _Collector(is_mask, spec, plot_block) if plot_block is not None else _AllPlanes(is_mask, spec)
        )
        with capture_linear_inputs(dllm, collector):
            run_blocks(dllm, ids)
        if plot_block is None:
            plot_block = max(
                (rec["stats"]["all"]["max_median"], rec["block"])
                for (_, kind), rec in collector.records.items()
                if kind == "ffn_out"
            )[1]
            collector.planes = collector.block_planes[plot_block]
        planes[t] = collector.planes
        for rec in collector.records.values():
            records.append({"state": state, "t": t, "mask_fraction": float(is_mask.float().mean()), **rec})
    return records, planes, plot_block


class _AllPlanes(_Collector):
    """A collector keeping every block's planes (the first forward, before the plot block is known)."""

    def __init__(self, is_mask: torch.Tensor, spec: OutlierSpec):
        super().__init__(is_mask, spec, None)
        self.block_planes: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, site: LinearSite, x: torch.Tensor) -> None:
        first = (site.block, site.layer_type) not in self.records
        super().__call__(site, x)
        if first:
            plane = x[self.spec.plot_sample].detach().abs().float().cpu()
            self.block_planes.setdefault(site.block, {})[site.layer_type] = plane


def layer_table(records: list[dict]) -> pd.DataFrame:
    """Per-layer records -> one row per (state, t, block, layer_type, subset) with every statistic."""
    rows = []
    for rec in records:
        for subset in SUBSETS:
            rows.append(
                {
                    "state": rec["state"],
                    "t": rec["t"],
                    "mask_fraction": rec["mask_fraction"],
                    "block": rec["block"],
                    "layer_type": rec["layer_type"],
                    "linears": "+".join(rec["linears"]),
                    "channels": rec["channels"],
                    "subset": subset,
                    **rec["stats"][subset],
                }
            )
    return pd.DataFrame(rows)


def summarise(layers: pd.DataFrame, n_blocks: int) -> pd.DataFrame:
    """Aggregate the per-block rows over blocks, per (state, t, layer_type, subset).

    Columns: tokens per block; max_abs (max over blocks); max_median (median over blocks) and
    max_median_max (max); topk_share (mean); kurtosis (median over blocks of the tensor kurtosis);
    token_kurtosis (mean over blocks of the per-token mean); massive_token_share and
    massive_mass_share (means over blocks); blocks_with_massive (blocks with >= 1 massive token).
    """
    keys = ["state", "t", "layer_type", "subset"]
    grouped = layers.groupby(keys, sort=False)
    table = grouped.agg(
        mask_fraction=("mask_fraction", "first"),
        tokens=("tokens", "first"),
        max_abs=("max_abs", "max"),
        max_median=("max_median", "median"),
        max_median_max=("max_median", "max"),
        topk_share=("topk_share", "mean"),
        kurtosis=("kurtosis", "median"),
        token_kurtosis=("token_kurtosis_mean", "mean"),
        massive_token_share=("massive_token_share", "mean"),
        massive_mass_share=("massive_mass_share", "mean"),
        blocks_with_massive=("massive_tokens", lambda s: int((s > 0).sum())),
    ).reset_index()
    table["blocks"] = n_blocks
    return table


def analyze(dllm, windows: torch.Tensor, spec: OutlierSpec, state: str = ORIGINAL) -> OutlierReport:
    """Outlier statistics of `dllm` (any model, e.g. a transformed or quantized one) on `windows`.

    Args:
        windows: (n, L) int64 clean calibration windows (n = spec.samples, L = spec.seqlen).
        state: the label of the rows ("original", "transformed:<name>").
    """
    spec.validated()
    n_blocks = len(dllm.blocks())
    if spec.plot_block is not None:
        require(
            0 <= spec.plot_block < n_blocks,
            "--plot-block",
            spec.plot_block,
            f"the model has {n_blocks} blocks",
        )
    inputs = masked_inputs(windows, dllm.mask_token_id, spec.ts, spec.mcs(), spec.max_timesteps)
    records, planes, plot_block = measure(dllm, inputs, spec, state)
    return OutlierReport(
        spec=spec,
        model=dllm.name,
        n_blocks=n_blocks,
        records=records,
        plot_block=plot_block,
        planes={(state, t): p for t, p in planes.items()},
    )


def merge(before: OutlierReport, after: OutlierReport) -> OutlierReport:
    """One report holding both states (before and after a transform), plotted at the same block."""
    require(
        after.plot_block == before.plot_block, "--plot-block", after.plot_block, "both states need one block"
    )
    return dataclasses.replace(
        before, records=before.records + after.records, planes={**before.planes, **after.planes}
    )


# ---------------------------------------------------------------------------------------------------
# transforms (optional): qdllm.transforms' registry


def transform_names() -> list[str]:
    """The transforms `--transform` accepts: `qdllm.transforms.TRANSFORMS`."""
    from qdllm.transforms import TRANSFORMS

    return sorted(TRANSFORMS)


def apply_transform(dllm, name: str, windows: torch.Tensor) -> dict:
    """Rewrite `dllm` in place with the registered transform `name` (its default settings),
    calibrated on the clean `windows` (n, L) where it reads activation maxima; returns its report."""
    from qdllm.pipeline.transform import transform_model
    from qdllm.transforms import TransformSpec

    require(name in transform_names(), "--transform", name, f"use one of {transform_names()}")
    return transform_model(dllm, windows, TransformSpec(name=name))


# ---------------------------------------------------------------------------------------------------
# outputs


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; floats to `digits` significant digits, NaN as '-'."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_outputs(report: OutlierReport, out: Path) -> dict[str, Path]:
    """summary.csv, summary.md, layers.json and the figures under `out`, each written atomically."""
    from qdllm.analysis import outlier_plots
    from qdllm.atomic import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    summary = report.summary()
    paths = {
        "summary_csv": out / "summary.csv",
        "summary_md": out / "summary.md",
        "layers_json": out / "layers.json",
        "surfaces": out / "surfaces.png",
        "mask_ratio": out / "massive_vs_mask_ratio.png",
        "per_block": out / "max_median_per_block.png",
    }
    write_text_atomic(paths["summary_csv"], summary.to_csv(index=False))
    write_text_atomic(
        paths["summary_md"], summary_markdown(report, summary) + "\n" + per_block_markdown(report)
    )
    # compact: one record per (state, t, block, layer type), thousands for a 30-block model
    write_json_atomic(paths["layers_json"], {"meta": _meta(report), "layers": report.records}, indent=None)
    outlier_plots.surfaces(report, paths["surfaces"])
    outlier_plots.massive_vs_mask_ratio(summary, paths["mask_ratio"])
    outlier_plots.max_median_per_block(report.layers, paths["per_block"])
    return paths


def _meta(report: OutlierReport) -> dict:
    fractions = {str(rec["t"]): rec["mask_fraction"] for rec in report.records if rec["state"] == ORIGINAL}
    return {
        "model": report.model,
        "blocks": report.n_blocks,
        "plot_block": report.plot_block,
        "mask_fraction": fractions,
        "spec": dataclasses.asdict(report.spec),
    }


def summary_markdown(report: OutlierReport, summary: pd.DataFrame) -> str:
    """The summary table per state, under a header with the settings."""
    spec = report.spec
    parts = [
        f"# Activation outliers: {report.model}",
        "",
        f"{spec.samples} windows x {spec.seqlen} tokens, MCS gamma={spec.gamma} ({spec.schedule}), seed "
        f"{spec.seed}; massive: |x| > {spec.massive_threshold:g} x median |x| of the layer input; top-k "
        f"share with k={spec.topk}; {report.n_blocks} blocks; columns aggregate over blocks as "
        "`qdllm.analysis.outliers.summarise` says.",
        "",
    ]
    for state, table in summary.groupby("state", sort=False):
        parts += [f"## {state}", "", markdown_table(table.drop(columns=["state", "blocks"])), ""]
    return "\n".join(parts)


def per_block_markdown(report: OutlierReport) -> str:
    """max/median of |x| (all tokens) per block and layer type, at the smallest and largest t."""
    layers = report.layers
    ends = sorted({min(report.spec.ts), max(report.spec.ts)})
    layers = layers[(layers["subset"] == "all") & layers["t"].isin(ends)]
    table = layers.pivot_table(
        index="block", columns=["state", "t", "layer_type"], values="max_median", sort=False
    )
    table.columns = [f"{state} t={t:g} {kind}" for state, t, kind in table.columns]
    title = "## max/median of |x| per block (all tokens)"
    return "\n".join([title, "", markdown_table(table.reset_index()), ""])


# ---------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, OutlierSpec]:
    defaults = OutlierSpec()
    parser = argparse.ArgumentParser(
        prog="python -m qdllm.analysis.outliers",
        description="Activation-outlier statistics at block Linear inputs, clean and under MCS masking.",
    )
    parser.add_argument("--model", default="smol_dllm", help="a conf/model name (smol_dllm, tiny_llada, ...)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", default=None, help="model.device override (cpu, cuda)")
    parser.add_argument(
        "--t", dest="ts", type=float, nargs="+", default=list(defaults.ts), help="MCS mask ratios t"
    )
    for name in (
        "samples",
        "seqlen",
        "seed",
        "max_timesteps",
        "topk",
        "list_limit",
        "plot_sample",
        "plot_max_points",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--plot-block", type=int, default=None, help="block of the 3-D plots (default: auto)")
    parser.add_argument("--gamma", type=float, default=defaults.gamma)
    parser.add_argument("--massive-threshold", type=float, default=defaults.massive_threshold)
    parser.add_argument("--schedule", default=defaults.schedule, choices=SCHEDULES)
    parser.add_argument("--data-path", default=None, help="calibration text (JSONL field `text` or .txt)")
    parser.add_argument("--transform", default=None, help="a qdllm.transforms registry name (before/after)")
    args = parser.parse_args(argv)
    fields_ = {f.name for f in dataclasses.fields(OutlierSpec)}
    values = {k: v for k, v in vars(args).items() if k in fields_}
    values["ts"] = tuple(values["ts"])
    try:
        spec = OutlierSpec(**values).validated()
        if spec.transform is not None:
            names = transform_names()
            require(spec.transform in names, "--transform", spec.transform, f"use one of {names}")
    except ConfigError as exc:
        parser.error(str(exc))
    return args, spec


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args, spec = parse_args(argv)
    import qdllm
    from qdllm.data.calibration import DataSpec, calibration_windows, load_texts

    options = {"device": args.device} if args.device else {}
    dllm = qdllm.load(args.model, **options)
    data = DataSpec(
        path=spec.data_path, nsamples=spec.samples, seqlen=spec.seqlen, seed=spec.seed
    ).validated()
    windows = calibration_windows(load_texts(data), dllm.tokenizer, data)
    report = analyze(dllm, windows, spec)
    if spec.transform is not None:
        apply_transform(dllm, spec.transform, windows)
        after_spec = dataclasses.replace(spec, plot_block=report.plot_block)
        report = merge(report, analyze(dllm, windows, after_spec, state=f"transformed:{spec.transform}"))
    paths = write_outputs(report, args.out)
    print(summary_markdown(report, report.summary()))
    for path in paths.values():
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
