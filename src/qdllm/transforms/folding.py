"""Exact in-place weight rewrites shared by the equivalence transforms (fp64 arithmetic)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ROW_CHUNK = 8192  # rows per fp64 chunk when rewriting (V, d) embeddings / heads: bounds transient memory


class TransformError(ValueError):
    """A model or spec that an equivalence transform cannot handle; the message names the fix."""


@torch.no_grad()
def transform_rows(weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """weight[i] <- fn(weight[i]) for every row (the last dim is transformed; a 1-D bias is one row),
    computed in fp64 chunks and written back in the weight's dtype."""
    flat = weight.data.reshape(-1, weight.shape[-1]) if weight.dim() > 1 else weight.data[None]
    for start in range(0, flat.shape[0], ROW_CHUNK):
        rows = flat[start : start + ROW_CHUNK]
        rows.copy_(fn(rows.to(torch.float64)).to(weight.dtype))


@torch.no_grad()
def transform_columns(weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """W <- fn(W^T)^T: every column transformed (for W (out, in): the output side)."""
    w = weight.data.to(torch.float64)
    weight.data.copy_(fn(w.T.contiguous()).T.to(weight.dtype))


@torch.no_grad()
def fold_rms_norm(norm: nn.Module, weights: list[torch.Tensor], what: str) -> None:
    """RMSNorm gain g folded into the Linears reading the norm: W <- W diag(g) for each, then g <- 1."""
    gain = getattr(norm, "weight", None)
    if gain is None or getattr(norm, "bias", None) is not None:
        raise TransformError(
            f"{what}: {type(norm).__name__} is not an RMSNorm with a weight and no bias; rotations "
            "fold only RMSNorm (a LayerNorm's mean subtraction does not commute with them)"
        )
    g = gain.detach().to(torch.float64)
    for w in weights:
        transform_rows(w, lambda rows: rows * g.to(rows.device))
    gain.fill_(1.0)
