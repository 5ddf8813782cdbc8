"""Column-group bookkeeping shared by every per-group quantizer."""

from __future__ import annotations


def group_slices(in_features: int, group_size: int) -> list[slice]:
    """Contiguous column groups [s, s + group_size); the last one may be ragged."""
    return [slice(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


def group_widths(in_features: int, group_size: int) -> list[int]:
    return [sl.stop - sl.start for sl in group_slices(in_features, group_size)]


def group_sizes(rows: int, in_features: int, group_size: int) -> list[int]:
    """Weight count (rows x width) of every column group."""
    return [rows * width for width in group_widths(in_features, group_size)]
