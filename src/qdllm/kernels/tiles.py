"""Triton pieces shared by the BCQ and uniform matmul kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def store_output_tile(out_ptr, acc, rows, row_mask, toks, tok_mask, stride_om, ATOMIC: tl.constexpr):
    """Write the (BN rows, BM tokens) fp32 partial sums `acc` into out (M, R) at [toks, rows]:
    added atomically when several programs split the groups of one tile (split-K), stored otherwise."""
    out_ptrs = out_ptr + toks[None, :].to(tl.int64) * stride_om + rows[:, None]
    out_mask = row_mask[:, None] & tok_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def output_buffer(x: torch.Tensor, rows: int, splits: int) -> tuple[torch.Tensor, bool]:
    """(M, R) output for x (M, C) of a matmul whose groups are split over `splits` programs per tile:
    zeroed fp32 that they add into (atomic) when splits > 1, else uninitialised in x's dtype."""
    if splits > 1:
        return torch.zeros(x.shape[0], rows, dtype=torch.float32, device=x.device), True
    return torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device), False
