"""AWQ (Lin et al., MLSys 2024, arXiv 2306.00978): activation-aware weight quantization.

A Linear y = x W^T (W: (R, C)) is unchanged when the input channels are rescaled,
y = (x diag(s)^-1) (W diag(s))^T, s > 0 (C,). AWQ quantizes W diag(s) instead of W, so the columns
met by large activations get a finer grid (paper §3.2, eq. 4-5):

    s = mean_n |x_n|^alpha / sqrt(max * min),   alpha* = argmin_alpha L(s),
    L(s) = ||X W^T - (X diag(s)^-1) Q(W diag(s))^T||_F^2 / N = Tr(dW S dW^T),

with dW = W - Q(W diag(s)) diag(s)^-1 and S = X^T X / N, so the objective counts every calibration
row of the Linear at a cost independent of N. alpha runs over {0, 1/n, ..., (n-1)/n}; alpha = 0 is
s = 1, plain round-to-nearest. Q is the asymmetric (or symmetric) min-max grid of every row of every
column group (`qdllm.quant.uniform`). Then AWQ's clipping search: per row and group, the weights of
W diag(s) are clamped to +-r max|w| for r in {1, 1 - 1/m, ..., 1 - (k-1)/m} (k = floor(max_shrink m))
before the min-max grid is fitted; the r with the least error of that group's partial output,
(w - q) S'_gg (w - q)^T with S' = diag(s)^-1 S diag(s)^-1 the moment of the scaled inputs, is kept.

The stored weight is the clipped Q(W diag(s)) with s as an input scale of the Linear (the packed
format divides the input by s); the effective weight is W_hat = Q(W diag(s)) diag(s)^-1 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdllm.quant.groups import group_slices
from qdllm.quant.uniform import UniformParams, find_params

# AWQ's floor on mean|x|^alpha before normalising (keeps s of silent channels finite and positive)
SCALE_FLOOR = 1e-4


@dataclass
class AWQResult:
    """AWQ of one Linear.

    Attributes:
        weight: (R, C) fp32 effective weight Q(W diag(s)) diag(s)^-1.
        scaled_weight: (R, C) fp32 Q(W diag(s)), what the packed codes store.
        input_scale: (C,) fp32 s, already rounded to the storage dtype.
        params: one `UniformParams` per column group, fitted to the clipped scaled weight.
        alpha: the chosen exponent.
        alpha_errors: (n_alpha,) L(s) of every alpha of the grid (before clipping).
        clip: (R, G) the chosen clip ratio of every row and group.
    """

    weight: torch.Tensor
    scaled_weight: torch.Tensor
    input_scale: torch.Tensor
    params: list[UniformParams]
    alpha: float
    alpha_errors: torch.Tensor
    clip: torch.Tensor


def activation_scale(inputs: torch.Tensor) -> torch.Tensor:
    """(C,) fp32 mean |x| per input channel of the calibration inputs (n, C)."""
    return inputs.to(torch.float32).abs().mean(0)


def alpha_grid(n: int) -> torch.Tensor:
    """(n,) the exponents 0, 1/n, ..., (n-1)/n (AWQ's grid of 20)."""
    return torch.arange(n, dtype=torch.float64) / n


def clip_ratios(grid: int, max_shrink: float) -> torch.Tensor:
    """(k,) clip ratios 1 - i/grid for i < floor(max_shrink grid) (AWQ: 20 and 0.5 -> 1.0 .. 0.55);
    always at least the ratio 1 (no clipping)."""
    steps = max(1, int(max_shrink * grid + 1e-9))  # the epsilon keeps 0.35 * 20 = 6.99999... at 7
    return 1.0 - torch.arange(steps, dtype=torch.float64) / grid


def channel_scales(act: torch.Tensor, alpha: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """(C,) fp32 s = max(act^alpha, 1e-4) / sqrt(max s * min s), rounded to `scale_dtype` (the
    stored value, so the fake-quantized weight equals what the packed format reconstructs)."""
    s = act.to(torch.float32).pow(alpha).clamp_min(SCALE_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    info = torch.finfo(scale_dtype)
    return s.clamp(info.tiny, info.max).to(scale_dtype).to(torch.float32)


def group_rtn(
    w: torch.Tensor,
    group_size: int,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    clip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[UniformParams]]:
    """Min-max RTN of every row of every column group of w (R, C), groups of `group_size` columns
    (the last may be ragged); with `clip` (R, G) each group's rows are first clamped to
    +-clip max|w| (AWQ's clipping). Returns Q (R, C) and one grid per group.

    The groups of equal width are fitted in one batch: the grid of a row of a group depends on
    that row alone, so batching changes no value."""
    rows, cols = w.shape
    full = cols // group_size * group_size
    pieces = [w[:, :full].reshape(rows, -1, group_size)] if full else []
    if full < cols:
        pieces.append(w[:, full:].unsqueeze(1))
    q_pieces, params, first = [], [], 0
    for piece in pieces:  # (R, n, width)
        n, width = piece.shape[1:]
        if clip is not None:
            bound = piece.abs().amax(-1, keepdim=True) * clip[:, first : first + n, None]
            piece = torch.maximum(torch.minimum(piece, bound), -bound)
        flat = piece.transpose(0, 1).reshape(n * rows, width)  # group-major rows
        grid = find_params(flat, bits, sym, scale_dtype)
        q_pieces.append(grid.fake_quantize(flat).view(n, rows, width).transpose(0, 1).reshape(rows, -1))
        scale, zero = grid.scale.view(n, rows), grid.zero.view(n, rows)
        params.extend(UniformParams(scale[g], zero[g], grid.maxq) for g in range(n))
        first += n
    return torch.cat(q_pieces, 1), params


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Tr(dW S dW^T) = ||X dW^T||^2 / N for dW (R, C), S (C, C): the Linear's output error."""
    return ((delta @ hessian) * delta).sum()


def search_scale(
    w: torch.Tensor,
    act: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    n_alpha: int,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """AWQ's grid search (paper eq. 5) on the output of this Linear.

    Args:
        w: (R, C) fp32 weight; act: (C,) mean |x|; hessian: (C, C) S = X^T X / N.
    Returns:
        s (C,) of the best alpha (the first of equal errors), that alpha, and (n_alpha,) L(s) of
        every alpha.
    """
    errors = []
    for alpha in alpha_grid(n_alpha).tolist():
        s = channel_scales(act, alpha, scale_dtype)
        q, _ = group_rtn(w * s, group_size, bits, sym, scale_dtype)
        errors.append(output_error(w - q / s, hessian))
    errors = torch.stack(errors)
    best = int(torch.argmin(errors))
    alpha = float(alpha_grid(n_alpha)[best])
    return channel_scales(act, alpha, scale_dtype), alpha, errors


def search_clip(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    ratios: torch.Tensor,
) -> torch.Tensor:
    """AWQ's clipping search: per row and group, the ratio of `ratios` (k,) whose clamped min-max
    grid gives the least partial-output error (w - q) S_gg (w - q)^T (the first of equal errors).

    Args:
        w: (R, C) fp32 weight (AWQ: already scaled); hessian: (C, C) second moment of its inputs.
    Returns:
        (R, G) fp32 chosen ratios.
    """
    rows = w.shape[0]
    k = ratios.shape[0]
    slices = group_slices(w.shape[1], group_size)
    ratios32 = ratios.to(device=w.device, dtype=torch.float32)
    chosen = torch.empty(rows, len(slices), dtype=torch.float32, device=w.device)
    for g, cols in enumerate(slices):
        block = w[:, cols]
        bound = block.abs().amax(1) * ratios32[:, None]  # (k, R)
        bound = bound.unsqueeze(-1)
        clamped = torch.maximum(torch.minimum(block.expand(k, -1, -1), bound), -bound)  # (k, R, g)
        flat = clamped.reshape(k * rows, -1)
        q = find_params(flat, bits, sym, scale_dtype).fake_quantize(flat).view_as(clamped)
        delta = block - q
        err = ((delta @ hessian[cols, cols]) * delta).sum(-1)  # (k, R)
        chosen[:, g] = ratios32[torch.argmin(err, 0)]
    return chosen


def awq_quantize(
    w: torch.Tensor,
    inputs: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    n_alpha: int,
    ratios: torch.Tensor,
) -> AWQResult:
    """AWQ of one Linear: scale search, clipping search on W diag(s), final clipped RTN.

    Args:
        w: (R, C) fp32 weight; inputs: (n, C) calibration inputs (for mean |x|); hessian: (C, C)
            S = X^T X / N over all calibration rows; group_size: columns per group (the last
            group may be ragged).
        n_alpha: size of the alpha grid; ratios: (k,) clip ratios (`clip_ratios`).
    """
    act = activation_scale(inputs)
    s, alpha, errors = search_scale(w, act, hessian, group_size, bits, sym, scale_dtype, n_alpha)
    scaled = w * s
    scaled_hessian = hessian / (s[:, None] * s[None, :])  # moment of the scaled inputs x / s
    clip = search_clip(scaled, scaled_hessian, group_size, bits, sym, scale_dtype, ratios)
    q, params = group_rtn(scaled, group_size, bits, sym, scale_dtype, clip)
    return AWQResult(q / s, q, s, params, alpha, errors, clip)
