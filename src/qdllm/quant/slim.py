"""SliM-LLM (Huang et al. 2024, arXiv 2405.14917): group-wise mixed precision for GPTQ.

* SBA, salience-determined bit allocation: group salience = sum over the group of w^2 / U_jj^2
  (U the upper Cholesky factor of H^-1); the k least salient 128-column groups get b-1 bits and
  the k most salient b+1, so the average is exactly b. k in [1, G/2) is chosen per Linear by the
  smallest mean KL divergence between softmax(x W^T) and softmax(x Q_k^T) over calibration
  inputs x, Q_k the round-to-nearest weight with that allocation.
* SQC, salience-weighted quantizer calibration: per group and row, the asymmetric min-max range is
  scaled by p in [0.9, 1.1] (101 candidates) to minimise sum_e lambda_e |w_e - q(w_e)|^2.4, where
  elements whose salience z-score exceeds 2 carry lambda_salience (1 by default) and the rest 1.
* 1-bit groups are binarised: row mean + row scale * sign(w - mean), scale = mean |w - mean|.
Then GPTQ runs over the columns with these per-group quantizers (`gptq_quantize(fit_group=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdllm.quant.groups import group_slices
from qdllm.quant.uniform import UniformParams, find_params

SQC_GRID = torch.linspace(0.9, 1.1, 101)
SQC_NORM = 2.4
SALIENT_Z = 2.0


@dataclass
class BinaryParams:
    """1-bit group: per-row mean (R,) and scale (R,), rounded to the storage dtype."""

    mean: torch.Tensor
    scale: torch.Tensor

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean if x.dim() == 1 else self.mean.unsqueeze(-1)
        scale = self.scale if x.dim() == 1 else self.scale.unsqueeze(-1)
        return mean + scale * torch.where(x >= mean, 1.0, -1.0)


def binarize_params(x: torch.Tensor, scale_dtype: torch.dtype) -> BinaryParams:
    mean = x.mean(1)
    scale = (x - mean.unsqueeze(1)).abs().mean(1)
    return BinaryParams(mean.to(scale_dtype).float(), scale.to(scale_dtype).float())


def element_salience(w: torch.Tensor, upper_diag: torch.Tensor) -> torch.Tensor:
    """(R, C) w^2 / U_jj^2."""
    return w.pow(2) / upper_diag.pow(2).unsqueeze(0)


def group_salience(w: torch.Tensor, upper_diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) summed element salience of each column group."""
    sal = element_salience(w, upper_diag)
    return torch.stack([sal[:, sl].sum() for sl in group_slices(w.shape[1], group_size)])


def allocate_bits(salience: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """(G,) int64: the k least salient groups get bits-1, the k most salient bits+1."""
    order = torch.argsort(salience, stable=True)
    alloc = torch.full_like(order, bits)
    if k:
        alloc[order[:k]] = bits - 1
        alloc[order[-k:]] = bits + 1
    return alloc


def sqc_params(
    x: torch.Tensor,
    bits: int,
    weights: torch.Tensor,
    scale_dtype: torch.dtype,
    grid: torch.Tensor = SQC_GRID,
    norm: float = SQC_NORM,
) -> UniformParams:
    """Asymmetric grid of x (R, g) whose range factor p (per row) minimises
    sum_e weights_e |x_e - q(x_e)|^norm over `grid`."""
    losses = torch.stack(
        [
            (
                weights
                * (x - find_params(x, bits, False, scale_dtype, float(p)).fake_quantize(x)).abs().pow(norm)
            ).sum(1)
            for p in grid
        ]
    )
    best = grid.to(x.device)[losses.argmin(0)]
    return find_params(x, bits, False, scale_dtype, best)


def salience_weights(window_salience: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda for elements whose salience z-score (within the group) exceeds 2, else 1."""
    z = (window_salience - window_salience.mean()) / window_salience.std().clamp_min(1e-30)
    return torch.where(z > SALIENT_Z, lam, 1.0)


def fit(x: torch.Tensor, bits: int, window_salience: torch.Tensor, lam: float, scale_dtype: torch.dtype):
    """The group quantizer of SliM-LLM for `bits` (binarisation at 1 bit, SQC otherwise)."""
    if bits == 1:
        return binarize_params(x, scale_dtype)
    return sqc_params(x, bits, salience_weights(window_salience, lam), scale_dtype)


def rtn_mixed(
    w: torch.Tensor, alloc: torch.Tensor, group_size: int, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Round-to-nearest weight with per-group bits (min-max; binarised 1-bit groups)."""
    q = torch.empty_like(w)
    for sl, b in zip(group_slices(w.shape[1], group_size), alloc.tolist(), strict=True):
        params = (
            binarize_params(w[:, sl], scale_dtype) if b == 1 else find_params(w[:, sl], b, False, scale_dtype)
        )
        q[:, sl] = params.fake_quantize(w[:, sl])
    return q


def output_kl(w: torch.Tensor, q: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(x W^T) || softmax(x Q^T)), x (n, C) fp32."""
    target = F.log_softmax(inputs @ w.T, dim=-1)
    approx = F.log_softmax(inputs @ q.T, dim=-1)
    return float(F.kl_div(approx, target, log_target=True, reduction="batchmean"))


def choose_k(
    w: torch.Tensor,
    salience: torch.Tensor,
    bits: int,
    group_size: int,
    inputs: torch.Tensor,
    scale_dtype: torch.dtype,
) -> int:
    """k in [1, G/2) with the smallest output KL of the RTN weight (0 when G < 3)."""
    n_groups = salience.numel()
    candidates = range(1, (n_groups + 1) // 2)
    if not candidates:
        return 0
    scores = [
        output_kl(w, rtn_mixed(w, allocate_bits(salience, k, bits), group_size, scale_dtype), inputs)
        for k in candidates
    ]
    return candidates[min(range(len(scores)), key=scores.__getitem__)]
