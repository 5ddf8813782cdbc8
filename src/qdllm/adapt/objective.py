"""The masked-diffusion training objective with shifted logits (Dream recipe).

For a clean sequence x (position 0 is a document token that is never masked), draw t ~ U(eps, 1]
per row and mask every other position independently with probability t. The loss is

    L = (1 / (B (L - 1))) * sum_rows sum_{i masked} CE(p(. | x_t)[i], x_i) / t_row,

an upper bound of the negative log-likelihood per token (the masked-diffusion ELBO). With shifted
logits the prediction for position i is read from the output at position i - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(
    batch: int, length: int, eps: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool mask (column 0 never masked) and (B,) masking levels t in (eps, 1]."""
    t = eps + (1 - eps) * (1 - torch.rand(batch, generator=generator, dtype=torch.float64))
    mask = torch.rand(batch, length, generator=generator, dtype=torch.float64) < t[:, None]
    mask[:, 0] = False
    return mask, t.float()


def masked_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every masked position, row-major: ((N,), (N,))."""
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


def diffusion_loss(
    logits: torch.Tensor, targets: torch.Tensor, t_of_target: torch.Tensor, n_positions: int
) -> torch.Tensor:
    """The objective above from the masked positions' logits.

    Args:
        logits: (N, V) predictions for the N masked positions (any float dtype; CE in fp32).
        targets: (N,) clean tokens at those positions.
        t_of_target: (N,) masking level of each target's row.
        n_positions: B (L - 1), the number of maskable positions in the batch.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce / t_of_target).sum() / n_positions
