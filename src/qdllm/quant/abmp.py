"""ABMP: Adaptive Blockwise Mixed Precision (paper §3.4, Alg. 3, eq. 11).

Groups (128-column units) are ranked by their importance score; the top ones get order K+1, the
bottom ones K-1, the rest K. The moved weight counts are equal on both sides, so the average order
weighted by weight count is exactly K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qdllm.quant.groups import group_sizes, group_slices


def group_scores(z: torch.Tensor, group_size: int, reduce: str = "sum") -> torch.Tensor:
    """(G,) score of every column group of Z (R, C): s_g = sum of Z over the group (Alg. 3).

    ``reduce="mean"`` divides by the group's weight count; use it when groups of matrices with
    different row counts compete (block scope), so a group does not win by its size alone.
    """
    sums = torch.stack([z[:, sl].sum() for sl in group_slices(z.shape[1], group_size)])
    if reduce == "sum":
        return sums
    sizes = torch.tensor(group_sizes(*z.shape, group_size), dtype=sums.dtype, device=sums.device)
    return sums / sizes


def _prefix_within(cumulative: list[int], budget: int) -> tuple[int, int]:
    """Longest prefix whose cumulative size is <= budget: (count, size)."""
    count = 0
    while count < len(cumulative) and cumulative[count] <= budget:
        count += 1
    return count, (cumulative[count - 1] if count else 0)


def allocate_orders(
    scores: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]], ratio: float, base: int
) -> list[torch.Tensor]:
    """Order map for one or several matrices ranked together.

    Args:
        scores: per matrix, (G_m,) group scores.
        sizes: per matrix, the weight count (rows x width) of each group.
        ratio: share of weights moved up (and the same share down); paper default 0.05.
        base: the budget order K (2 in the paper).
    Returns:
        per matrix, (G_m,) int64 orders in {K-1, K, K+1} on CPU.

    With equal group sizes this is Alg. 3 exactly: k = floor(ratio * G) groups each way. With
    unequal sizes the largest top prefix and bottom prefix of equal total size within the budget
    floor(ratio * total) are moved, so the weighted average order stays exactly K.
    """
    flat_scores = torch.cat([s.detach().to("cpu", torch.float64).reshape(-1) for s in scores])
    flat_sizes = [int(x) for per in sizes for x in per]
    if len(flat_sizes) != flat_scores.numel():
        raise ValueError("allocate_orders: scores and sizes disagree in the number of groups")
    orders = torch.full((flat_scores.numel(),), base, dtype=torch.int64)
    ranked = torch.argsort(flat_scores, descending=True, stable=True).tolist()
    top_cum = _cumsum([flat_sizes[i] for i in ranked])
    bottom_cum = _cumsum([flat_sizes[i] for i in reversed(ranked)])
    budget = math.floor(round(ratio * sum(flat_sizes), 6))
    while True:
        n_up, up_size = _prefix_within(top_cum, budget)
        n_down, down_size = _prefix_within(bottom_cum, up_size)
        if down_size == up_size:
            break
        budget = down_size
    if n_up:
        orders[ranked[:n_up]] = base + 1
    if n_down:
        orders[list(reversed(ranked))[:n_down]] = base - 1
    out, start = [], 0
    for s in scores:
        out.append(orders[start : start + s.numel()].clone())
        start += s.numel()
    return out


def _cumsum(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out
