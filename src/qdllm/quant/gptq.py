"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) and GPTAQ (Li et al. 2025, arXiv 2504.02692).

GPTQ: for each column j (in act-order or natural order): q_j = quant(w_j), err_j = (w_j - q_j) /
U_jj, w_{j+1:} -= err_j U[j, j+1:] inside the block; after the block, the remaining columns receive
Err U[B, e:]. U is the upper Cholesky factor of H^-1, H = S = X~^T X~ / N on the inputs X~ the layer
sees in the partially quantized model.

GPTAQ ("asymmetric calibration") fits Q X~ to the FP output W X of the FP model's inputs X: with
D = (X - X~)^T X~ / N and P = alpha triu_strict(D U^T) U (alpha = 0.25 in the reference), the
column update becomes w_{j:} -= err_j U[j, j:] - w_j P[j, j:] and the block update
W[:, e:] -= Err U[B, e:] - W_B P[B, e:], W_B the block's columns as they were quantized.
D = 0 (identical inputs) gives GPTQ exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qdllm.quant.groups import group_slices
from qdllm.quant.hessian import factorize
from qdllm.quant.uniform import UniformParams, find_params


@dataclass
class GPTQOutput:
    """Attributes:
    weight: (R, C) fp32 dequantized weight in the original column order.
    params: per group, the uniform grid (scales (R,), zeros (R,)).
    g_idx: (C,) int64 group index of every original column.
    damp: absolute damping used.
    """

    weight: torch.Tensor
    params: list[Any]  # UniformParams, or what `fit_group` returned
    g_idx: torch.Tensor
    damp: float


def gptq_quantize(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    bits: int,
    sym: bool,
    group_size: int,
    block_size: int,
    act_order: bool,
    static_groups: bool,
    damp: float,
    damp_max_tries: int,
    scale_dtype: torch.dtype,
    cross_moment: torch.Tensor | None = None,
    alpha: float = 0.25,
    fit_group: Callable[[torch.Tensor, int], Any] | None = None,
) -> GPTQOutput:
    """Quantize W (R, C) fp32 (dead columns already zeroed) with input second moment S (C, C);
    with `cross_moment` D (C, C) = (X - X~)^T X~ / N this is GPTAQ.

    Group grids are fitted on the current (compensated) columns when a group starts, as in the
    reference with group_size == block_size; `static_groups` fits them on the original W first.
    `fit_group(window (R, g), first column)` replaces the min-max fit (SliM-LLM's mixed bits and
    SQC); it returns any object with `fake_quantize(column)`.
    """
    w = weight.to(torch.float32).clone()
    s = second_moment.to(torch.float32)
    n_cols = w.shape[1]
    perm = None
    cross = None if cross_moment is None else cross_moment.to(torch.float32)
    if act_order:
        perm = torch.argsort(torch.diagonal(s), descending=True, stable=True)
        w = w[:, perm]
        s = s[perm][:, perm]
        cross = None if cross is None else cross[perm][:, perm]
    factors = factorize(s, damp, damp_max_tries)
    upper = factors.upper
    asym = None if cross is None else alpha * torch.triu(cross @ upper.T, diagonal=1) @ upper

    static: list[UniformParams] = []
    if static_groups:
        original = weight.to(torch.float32)
        static = [
            find_params(original[:, sl], bits, sym, scale_dtype) for sl in group_slices(n_cols, group_size)
        ]

    q = torch.empty_like(w)
    g_idx = torch.empty(n_cols, dtype=torch.int64)
    params: list[Any] = list(static)
    current: UniformParams | None = None
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        quantized_from = torch.zeros_like(w1)  # each column as it was when quantized (GPTAQ's W_B)
        for i in range(b1 - b0):
            j = b0 + i
            col_orig = int(perm[j]) if perm is not None else j
            if static_groups:
                group = col_orig // group_size
                current = static[group]
            elif j % group_size == 0:
                window = torch.cat([w1[:, i:], w[:, b1:]], dim=1)[:, :group_size]
                current = fit_group(window, j) if fit_group else find_params(window, bits, sym, scale_dtype)
                params.append(current)
                group = len(params) - 1
            else:
                group = len(params) - 1
            g_idx[col_orig] = group
            col = w1[:, i]
            qcol = current.fake_quantize(col)
            q[:, j] = qcol
            err = (col - qcol) / upper[j, j]
            update = err.unsqueeze(1) * upper[j, j:b1].unsqueeze(0)
            if asym is not None:
                update -= col.unsqueeze(1) * asym[j, j:b1].unsqueeze(0)
            quantized_from[:, i] = col
            w1[:, i:] -= update
            err1[:, i] = err
        w[:, b1:] -= err1 @ upper[b0:b1, b1:]
        if asym is not None:
            w[:, b1:] += quantized_from @ asym[b0:b1, b1:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return GPTQOutput(q, params, g_idx, factors.damp)
