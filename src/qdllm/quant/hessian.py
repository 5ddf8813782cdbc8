"""Hessian utilities: damping, dead input channels, H^-1 and its upper Cholesky factor.

The layer-wise proxy loss of a Linear with input second moment S (C x C) is
Tr((W - Q) S (W - Q)^T); GPTQ/OBS work with H = S + eps*I (S: paper eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIN_INV_DIAG = 1e-12


class HessianError(RuntimeError):
    """S could not be made positive definite within the damping budget."""


@dataclass
class HessianFactors:
    """Factors of the damped second moment (all fp32, on S's device).

    Attributes:
        hinv: (C, C) H^-1 = (S + eps I)^-1 after dead-channel repair.
        upper: (C, C) U with H^-1 = U^T U (upper Cholesky factor of H^-1, as in GPTQ).
        dead: (C,) bool, input channels with S_jj == 0 (never excited).
        damp: the absolute damping eps that succeeded.
        tries: number of Cholesky attempts (1 = first damping worked).
    """

    hinv: torch.Tensor
    upper: torch.Tensor
    dead: torch.Tensor
    damp: float
    tries: int

    @property
    def hinv_diag(self) -> torch.Tensor:
        return torch.diagonal(self.hinv)

    @property
    def upper_diag(self) -> torch.Tensor:
        return torch.diagonal(self.upper)


def repair_dead_channels(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrise S in fp32 and set S_jj = 1 on dead channels (GPTQ convention).

    Args:
        second_moment: (C, C) uncentred input second moment.
    Returns:
        (S', dead) with S' (C, C) fp32 and dead (C,) bool. Callers zero W[:, dead].
    """
    s = second_moment.to(torch.float32)
    s = 0.5 * (s + s.T)
    dead = torch.diagonal(s) == 0
    if bool(dead.any()):
        s = s.clone()
        idx = torch.nonzero(dead).squeeze(1)
        s[idx, idx] = 1.0
    return s, dead


def factorize(second_moment: torch.Tensor, damp_ratio: float = 0.01, max_tries: int = 8) -> HessianFactors:
    """Damp S relative to its mean diagonal and factor H^-1, escalating damping x10 on failure.

    eps = damp_ratio * mean(diag S); a try fails when the Cholesky of S + eps I fails, or when any
    diagonal of H^-1 is non-finite or <= 1e-12.
    """
    s, dead = repair_dead_channels(second_moment)
    n = s.shape[0]
    eye = torch.eye(n, dtype=s.dtype, device=s.device)
    damp = damp_ratio * float(torch.diagonal(s).mean())
    if not damp > 0:
        raise HessianError("second moment has a non-positive mean diagonal; is S all zeros?")
    for attempt in range(1, max_tries + 1):
        lower, info = torch.linalg.cholesky_ex(s + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            diag = torch.diagonal(hinv)
            if bool(torch.isfinite(diag).all()) and float(diag.min()) > _MIN_INV_DIAG:
                upper, info_u = torch.linalg.cholesky_ex(hinv, upper=True)
                if int(info_u) == 0 and bool(torch.isfinite(upper).all()):
                    return HessianFactors(hinv, upper, dead, damp, attempt)
        damp *= 10.0
    raise HessianError(
        f"S + eps*I is not positive definite after {max_tries} damping escalations "
        f"(last eps={damp / 10:.3e}); check the calibration statistics for NaN/Inf or raise "
        "quant.damp_max_tries"
    )
