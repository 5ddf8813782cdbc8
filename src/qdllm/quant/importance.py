"""Distilled element importance Z and the DOR outlier weighting (paper §3.3, eq. 5-6)."""

from __future__ import annotations

import torch

from qdllm.quant.groups import group_slices
from qdllm.quant.hessian import HessianFactors

_DIAG_FLOOR = 1e-12


def importance(weight: torch.Tensor, factors: HessianFactors | None, z_mode: str) -> torch.Tensor:
    """Element importance Z (R, C), fp32.

    z_mode:
        ``inv_diag_sq``  Z_ij = W_ij^2 / d_j^2, d = diag(H^-1) (paper literal, default);
        ``inv_diag``     Z_ij = W_ij^2 / d_j (OBS saliency);
        ``chol_diag_sq`` Z_ij = W_ij^2 / U_jj^2 (BiLLM / ARB-LLM lineage);
        ``magnitude``    Z_ij = W_ij^2 (data-free).
    """
    w2 = weight.to(torch.float32).square()
    if z_mode == "magnitude":
        return w2
    if factors is None:
        raise ValueError(f"z_mode={z_mode!r} needs the input second moment (hessian)")
    if z_mode == "inv_diag_sq":
        denom = factors.hinv_diag.clamp_min(_DIAG_FLOOR).square()
    elif z_mode == "inv_diag":
        denom = factors.hinv_diag.clamp_min(_DIAG_FLOOR)
    elif z_mode == "chol_diag_sq":
        denom = factors.upper_diag.clamp_min(_DIAG_FLOOR).square()
    else:
        raise ValueError(f"unknown z_mode {z_mode!r}")
    return w2 / denom


def outlier_mask(z: torch.Tensor, group_size: int, scope: str, k_sigma: float) -> torch.Tensor:
    """3-sigma outlier indicator Pi (R, C) bool: |Z - mean| > k_sigma * std (unbiased).

    scope ``group`` standardises Z within every (all rows x group_size columns) unit,
    ``matrix`` over the whole matrix.
    """
    if scope == "matrix":
        return (z - z.mean()).abs() > k_sigma * z.std()
    mask = torch.empty_like(z, dtype=torch.bool)
    for cols in group_slices(z.shape[1], group_size):
        unit = z[:, cols]
        mask[:, cols] = (unit - unit.mean()).abs() > k_sigma * unit.std()
    return mask


def loss_weights(mask: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-element loss weight Lambda^2 (R, C) fp32 with Lambda = 1 + (lam - 1) * Pi (eq. 6)."""
    return (1.0 + (lam - 1.0) * mask.to(torch.float32)).square()
