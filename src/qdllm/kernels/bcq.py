"""Triton kernels for the binary-coded (DAQ) format, reading the stored sign stream in place.

Eq. 3 of the paper writes a group's weight as W_g = sum_k a_k c_k^T * B_k (+ mu 1^T with row
centring), so one group contributes y_g = sum_k a_k * (B_k (c_k * x_g)) (+ mu sum(x_g)): the column
scale folds into the activations, the row scale into the partial sums, and the inner product runs on
the tensor cores with B_k in {-1, +1} as bf16, exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qdllm.kernels.layout import BcqLayout, padded_group
from qdllm.kernels.tiles import output_buffer, store_output_tile


@triton.jit
def plane_words(signs_ptr, rows, row_mask, words_per_row, bit, WG: tl.constexpr):
    """(BN, WG) uint32: bits bit .. bit + 32 WG - 1 of the sign stream of each of `rows`, bit j of
    word w holding column 32 w + j; `bit` need not be word-aligned (a ragged last group's planes
    are not)."""
    shift = (bit & 31).to(tl.uint32)
    word = (bit >> 5) + tl.arange(0, WG)
    base = signs_ptr + rows[:, None].to(tl.int64) * words_per_row + word[None, :]
    lo = tl.load(base, mask=row_mask[:, None] & (word < words_per_row)[None, :], other=0)
    hi_mask = row_mask[:, None] & (word + 1 < words_per_row)[None, :] & (shift != 0)
    hi = tl.load(base + 1, mask=hi_mask, other=0)
    # a funnel shift; hi is 0 when shift is 0, where `32 - shift` would overflow the shift
    return (lo.to(tl.uint32, bitcast=True) >> shift) | (hi.to(tl.uint32, bitcast=True) << ((32 - shift) & 31))


@triton.jit
def plane_signs(signs_ptr, rows, row_mask, words_per_row, bit, BN: tl.constexpr, GSP: tl.constexpr):
    """(BN, GSP) bf16 +-1: bits bit .. bit + GSP - 1 of the sign stream of each of `rows`
    (bit 1 = +1)."""
    chunk = plane_words(signs_ptr, rows, row_mask, words_per_row, bit, GSP // 32)
    lane = tl.arange(0, 32).to(tl.uint32)
    sign = (chunk[:, :, None] << (31 - lane)[None, None, :]) & 0x80000000
    # sign bit 1 -> 0x3F800000 = +1.0f, 0 -> 0xBF800000 = -1.0f: two integer ops per weight bit
    ones = (sign ^ 0xBF800000).to(tl.float32, bitcast=True)
    return tl.reshape(ones, (BN, GSP)).to(tl.bfloat16)


@triton.jit
def _bcq_matmul_kernel(
    x_ptr,
    out_ptr,
    signs_ptr,
    row_scale_ptr,
    col_scale_ptr,
    mean_ptr,
    order_ptr,
    plane_ptr,
    bit_ptr,
    M,
    R,
    C,
    words_per_row,
    stride_xm,
    stride_om,
    groups_per_program,
    GS: tl.constexpr,
    GSP: tl.constexpr,
    BN: tl.constexpr,
    BM: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < R
    toks = tl.program_id(1) * BM + tl.arange(0, BM)
    tok_mask = toks < M
    cols = tl.arange(0, GSP)
    first = tl.program_id(2) * groups_per_program
    last = tl.minimum(first + groups_per_program, tl.cdiv(C, GS))
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for g in range(first, last):
        width = tl.minimum(GS, C - g * GS)
        col_mask = cols < width
        x_ptrs = x_ptr + toks[None, :].to(tl.int64) * stride_xm + (g * GS + cols)[:, None]
        xt = tl.load(x_ptrs, mask=col_mask[:, None] & tok_mask[None, :], other=0.0).to(tl.float32)
        order = tl.load(order_ptr + g)
        plane = tl.load(plane_ptr + g)
        bit = tl.load(bit_ptr + g)
        for k in range(order):
            signs = plane_signs(signs_ptr, rows, row_mask, words_per_row, bit + k * width, BN, GSP)
            c = tl.load(col_scale_ptr + bit + k * width + cols, mask=col_mask, other=0.0).to(tl.float32)
            partial = tl.dot(signs, (xt * c[:, None]).to(tl.bfloat16))
            a = tl.load(row_scale_ptr + (plane + k).to(tl.int64) * R + rows, mask=row_mask, other=0.0)
            acc += a.to(tl.float32)[:, None] * partial
        if HAS_MEAN:
            mu = tl.load(mean_ptr + g * R + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc += mu[:, None] * tl.sum(xt, axis=0)[None, :]
    store_output_tile(out_ptr, acc, rows, row_mask, toks, tok_mask, stride_om, ATOMIC)


@triton.jit
def _bcq_gemv_kernel(
    x_ptr, out_ptr, signs_ptr, row_scale_ptr, col_scale_ptr, mean_ptr, order_ptr, plane_ptr, bit_ptr,
    M, R, C, words_per_row, stride_xm, stride_om, groups_per_program,
    GS: tl.constexpr, GSP: tl.constexpr, BN: tl.constexpr, MT: tl.constexpr,
    HAS_MEAN: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """Eq. 3 on the CUDA cores for a few tokens: no +-1 operand is ever built. The weight's sign
    bit is moved into the sign bit of c_k x (one shift and one xor per weight and plane, shared by
    the tokens), and a_k multiplies in the accumulation; the sums over columns run once, at the end."""
    WG: tl.constexpr = GSP // 32
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < R
    toks = tl.arange(0, MT)
    tok_mask = toks < M
    lane = tl.arange(0, 32)
    cols = tl.arange(0, WG)[:, None] * 32 + lane[None, :]  # (WG, 32): column 32 w + j is bit j of word w
    to_sign_bit = (31 - lane).to(tl.uint32)
    first = tl.program_id(1) * groups_per_program
    last = tl.minimum(first + groups_per_program, tl.cdiv(C, GS))
    acc = tl.zeros((MT, BN, WG, 32), dtype=tl.float32)
    sums = tl.zeros((MT, BN), dtype=tl.float32)
    for g in range(first, last):
        width = tl.minimum(GS, C - g * GS)
        col_mask = cols < width
        x_ptrs = x_ptr + toks[:, None, None].to(tl.int64) * stride_xm + (g * GS + cols)[None, :, :]
        x = tl.load(x_ptrs, mask=tok_mask[:, None, None] & col_mask[None, :, :], other=0.0).to(tl.float32)
        order = tl.load(order_ptr + g)
        plane = tl.load(plane_ptr + g)
        bit = tl.load(bit_ptr + g)
        for k in range(order):
            words = plane_words(signs_ptr, rows, row_mask, words_per_row, bit + k * width, WG)
            sign = (words[:, :, None] << to_sign_bit[None, None, :]) & 0x80000000  # (BN, WG, 32)
            c = tl.load(col_scale_ptr + bit + k * width + cols, mask=col_mask, other=0.0).to(tl.float32)
            negated = (x * c[None, :, :]).to(tl.uint32, bitcast=True) ^ 0x80000000  # -c x
            signed = (negated[:, None, :, :] ^ sign[None, :, :, :]).to(tl.float32, bitcast=True)  # +-c x
            a = tl.load(row_scale_ptr + (plane + k).to(tl.int64) * R + rows, mask=row_mask, other=0.0)
            acc += signed * a.to(tl.float32)[None, :, None, None]
        if HAS_MEAN:
            mu = tl.load(mean_ptr + g * R + rows, mask=row_mask, other=0.0).to(tl.float32)
            sums += tl.sum(tl.sum(x, axis=2), axis=1)[:, None] * mu[None, :]
    y = tl.sum(tl.sum(acc, axis=3), axis=2) + sums  # (MT, BN)
    store_output_tile(out_ptr, tl.trans(y), rows, row_mask, toks, tok_mask, stride_om, ATOMIC)


@triton.jit
def _bcq_dequant_kernel(
    w_ptr,
    signs_ptr,
    row_scale_ptr,
    col_scale_ptr,
    mean_ptr,
    order_ptr,
    plane_ptr,
    bit_ptr,
    row0,
    n_rows,
    R,
    C,
    words_per_row,
    stride_w,
    GS: tl.constexpr,
    GSP: tl.constexpr,
    BN: tl.constexpr,
    HAS_MEAN: tl.constexpr,
):
    local = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = row0 + local
    row_mask = local < n_rows
    g = tl.program_id(1)
    cols = tl.arange(0, GSP)
    width = tl.minimum(GS, C - g * GS)
    col_mask = cols < width
    order = tl.load(order_ptr + g)
    plane = tl.load(plane_ptr + g)
    bit = tl.load(bit_ptr + g)
    w = tl.zeros((BN, GSP), dtype=tl.float32)
    for k in range(order):  # the reference's order of fp32 operations, so the result is bitwise equal
        signs = plane_signs(signs_ptr, rows, row_mask, words_per_row, bit + k * width, BN, GSP)
        c = tl.load(col_scale_ptr + bit + k * width + cols, mask=col_mask, other=0.0).to(tl.float32)
        a = tl.load(row_scale_ptr + (plane + k).to(tl.int64) * R + rows, mask=row_mask, other=0.0)
        w += (a.to(tl.float32)[:, None] * c[None, :]) * signs.to(tl.float32)
    if HAS_MEAN:
        w += tl.load(mean_ptr + g * R + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    w_ptrs = w_ptr + local[:, None].to(tl.int64) * stride_w + (g * GS + cols)[None, :]
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _mean_or_dummy(tensors: dict) -> tuple[torch.Tensor, bool]:
    mean = tensors.get("bcq_row_mean")
    return (tensors["bcq_row_scale"], False) if mean is None else (mean, True)


def _launch_over_groups(
    kernel,
    x: torch.Tensor,
    tensors: dict,
    shape: tuple[int, int],
    layout: BcqLayout,
    group_size: int,
    block_rows: int,
    groups_per_program: int,
    num_warps: int,
    token_grid: tuple[int, ...],
    **meta,
) -> torch.Tensor:
    """Launch a BCQ matmul kernel over (row blocks, *token_grid, group splits): the groups are split
    over ceil(G / groups_per_program) programs per tile, which then add into an fp32 output."""
    rows, cols = shape
    splits = -(-layout.order.numel() // groups_per_program)
    out, atomic = output_buffer(x, rows, splits)
    mean, has_mean = _mean_or_dummy(tensors)
    grid = (triton.cdiv(rows, block_rows), *token_grid, splits)
    kernel[grid](
        x, out, tensors["bcq_signs"], tensors["bcq_row_scale"], tensors["bcq_col_scale"], mean,
        layout.order, layout.plane, layout.bit, x.shape[0], rows, cols, tensors["bcq_signs"].shape[1],
        x.stride(0), out.stride(0), groups_per_program,
        GS=group_size, GSP=padded_group(group_size), BN=block_rows, HAS_MEAN=has_mean, ATOMIC=atomic,
        num_warps=num_warps, **meta,
    )  # fmt: skip
    return out.to(x.dtype) if atomic else out


def bcq_matmul(
    x: torch.Tensor,
    tensors: dict,
    shape: tuple[int, int],
    layout: BcqLayout,
    group_size: int,
    block_rows: int,
    block_tokens: int,
    groups_per_program: int,
    num_warps: int,
) -> torch.Tensor:
    """x (M, C) -> (M, R) = x W^T in x's dtype on the tensor cores, W never formed."""
    token_grid = (triton.cdiv(x.shape[0], block_tokens),)
    return _launch_over_groups(
        _bcq_matmul_kernel, x, tensors, shape, layout, group_size, block_rows, groups_per_program,
        num_warps, token_grid, BM=block_tokens,
    )  # fmt: skip


def bcq_gemv(
    x: torch.Tensor,
    tensors: dict,
    shape: tuple[int, int],
    layout: BcqLayout,
    group_size: int,
    block_rows: int,
    groups_per_program: int,
    num_warps: int,
) -> torch.Tensor:
    """x (M, C) -> (M, R) on the CUDA cores for a few tokens (all M in one program)."""
    return _launch_over_groups(
        _bcq_gemv_kernel, x, tensors, shape, layout, group_size, block_rows, groups_per_program,
        num_warps, (), MT=triton.next_power_of_2(x.shape[0]),
    )  # fmt: skip


def bcq_dequantize_rows(
    out: torch.Tensor,
    tensors: dict,
    shape: tuple[int, int],
    layout: BcqLayout,
    group_size: int,
    row0: int,
    block_rows: int,
) -> None:
    """Write rows row0 .. row0 + len(out) - 1 of W (eq. 3) into `out` (n, C), bitwise equal to
    `unpack_daq` in fp32 before the cast to out's dtype."""
    rows, cols = shape
    mean, has_mean = _mean_or_dummy(tensors)
    grid = (triton.cdiv(out.shape[0], block_rows), layout.order.numel())
    _bcq_dequant_kernel[grid](
        out, tensors["bcq_signs"], tensors["bcq_row_scale"], tensors["bcq_col_scale"], mean,
        layout.order, layout.plane, layout.bit, row0, out.shape[0], rows, cols,
        tensors["bcq_signs"].shape[1], out.stride(0),
        GS=group_size, GSP=padded_group(group_size), BN=block_rows, HAS_MEAN=has_mean,
    )  # fmt: skip
