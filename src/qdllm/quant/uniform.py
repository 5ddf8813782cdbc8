"""Uniform min-max quantizer (per row, per column group) used by RTN and GPTQ.

Follows GPTQ's `Quantizer`: the range always contains 0; asymmetric uses an integer zero point in
[0, 2^b - 1]; symmetric fixes the zero point at 2^(b-1) (its value is implied, not stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UniformParams:
    """Per-row quantization grid of one column group.

    Attributes:
        scale: (R,) step size, already rounded to the storage dtype.
        zero: (R,) integer-valued zero point (fp32).
        maxq: 2^bits - 1.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (R,) or (R, n) in [0, maxq], fp32."""
        scale, zero = self._shape(x)
        return torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self._shape(codes)
        return scale * (codes - zero)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    def _shape(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 1:
            return self.scale, self.zero
        return self.scale.unsqueeze(-1), self.zero.unsqueeze(-1)


def find_params(
    x: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    range_scale: torch.Tensor | float = 1.0,
) -> UniformParams:
    """Min-max grid per row of x (R, n), range extended to contain 0 (GPTQ convention) and
    multiplied by `range_scale` (scalar or (R,); SliM-LLM's SQC searches it)."""
    maxq = 2**bits - 1
    x = x.to(torch.float32)
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros) * range_scale
    xmax = torch.maximum(x.max(1).values, zeros) * range_scale
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    tiny = torch.finfo(scale_dtype).tiny
    scale = ((xmax - xmin) / maxq).clamp_min(tiny).to(scale_dtype).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return UniformParams(scale, zero, maxq)
