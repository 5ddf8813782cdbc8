"""GPTQ/OBC-style error compensation across column groups (not in the paper; docs/DESIGN.md).

After a group B = [s, e) is quantized to Q_B, the not yet quantized columns absorb its error:

    diag:  W[:, e:] -= ((W_B - Q_B) diag(U_BB)^-1) U[B, e:]   (BiLLM / ARB-LLM lineage)
    exact: W[:, e:] -= ((W_B - Q_B) U_BB^-1) U[B, e:]         (optimal for a jointly quantized B)

with U the upper Cholesky factor of H^-1. ``off`` quantizes every group of the original W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BlockQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


def propagate_error(delta: torch.Tensor, upper: torch.Tensor, cols: slice, mode: str) -> torch.Tensor:
    """Update for the columns after `cols`: (R, C - e) tensor to subtract from them.

    Args:
        delta: (R, g) W_B - Q_B of the group just quantized.
        upper: (C, C) upper Cholesky factor of H^-1.
    """
    ubb = upper[cols, cols]
    if mode == "diag":
        scaled = delta / torch.diagonal(ubb)
    elif mode == "exact":
        scaled = torch.linalg.solve_triangular(ubb, delta, upper=True, left=False)
    else:
        raise ValueError(f"unknown compensation mode {mode!r}")
    return scaled @ upper[cols, cols.stop :]


def quantize_sequential(
    weight: torch.Tensor,
    slices: list[slice],
    quantize_block: BlockQuantizer,
    upper: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Quantize the groups of `weight` (R, C) in column order with compensation `mode`.

    Args:
        quantize_block: (working slice (R, g), group index) -> dequantized (R, g).
        upper: (C, C) upper Cholesky factor of H^-1 (unused when mode is ``off``).
    Returns:
        (R, C) fp32 dequantized weight.
    """
    work = weight.to(torch.float32).clone()
    out = torch.empty_like(work)
    for index, cols in enumerate(slices):
        block = work[:, cols]
        q = quantize_block(block, index)
        out[:, cols] = q
        if mode != "off" and cols.stop < work.shape[1]:
            work[:, cols.stop :] -= propagate_error(block - q, upper, cols, mode)
    return out
