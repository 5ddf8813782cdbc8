"""Triton kernels for the uniform formats (RTN, GPTQ, GPTAQ, SliM-LLM), reading the stored code stream
in place.

A group's weight is W = s (Q - z) (uniform, zero point z; symmetric z = 2^b / 2) or
W = mu + s (2 Q - 1) (SliM-LLM's binarised groups), i.e. W = s' Q + t with per-row s' and t, so a
group contributes y_g = s' * (Q x_g) + t * sum(x_g) and the integer codes Q (exact in bf16) go to the
tensor cores unscaled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qdllm.kernels.layout import UniformLayout, padded_group
from qdllm.kernels.tiles import output_buffer, store_output_tile


@triton.jit
def read_codes(word_ptrs, shift, mask, code_bits):
    """uint32 codes of `code_bits` bits starting `shift` (uint32) bits into the words at `word_ptrs`
    (any shape; a code may straddle two words, as a 3-bit one does)."""
    lo = tl.load(word_ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(word_ptrs + 1, mask=mask & (shift + code_bits > 32), other=0).to(tl.uint32, bitcast=True)
    # a funnel shift; hi is 0 when shift is 0, where `32 - shift` would overflow the shift
    chunk = (lo >> shift) | (hi << ((32 - shift) & 31))
    return chunk & ((tl.full((), 1, tl.uint32) << code_bits) - 1)


@triton.jit
def gather_codes(codes_ptr, rows, row_mask, words_per_row, bit, col_mask, code_bits):
    """(BN, BK) uint32 codes starting at bit `bit` (BK,) of each of `rows`' streams."""
    word_ptrs = codes_ptr + rows[:, None].to(tl.int64) * words_per_row + (bit >> 5)[None, :]
    shift = (bit & 31).to(tl.uint32)[None, :]
    return read_codes(word_ptrs, shift, row_mask[:, None] & col_mask[None, :], code_bits)


@triton.jit
def unpack_word_codes(
    codes_ptr, rows, row_mask, words_per_row, bit, BN: tl.constexpr, GSP: tl.constexpr, B: tl.constexpr
):
    """(BN, GSP) uint32 codes when every code has B bits, B divides 32 and `bit` is word-aligned:
    each loaded word holds 32 / B whole codes."""
    PER: tl.constexpr = 32 // B
    WG: tl.constexpr = GSP // PER
    word = (bit >> 5) + tl.arange(0, WG)
    ptrs = codes_ptr + rows[:, None].to(tl.int64) * words_per_row + word[None, :]
    words = tl.load(ptrs, mask=row_mask[:, None] & (word < words_per_row)[None, :], other=0)
    lane = (tl.arange(0, PER) * B).to(tl.uint32)
    codes = (words.to(tl.uint32, bitcast=True)[:, :, None] >> lane[None, None, :]) & ((1 << B) - 1)
    return tl.reshape(codes, (BN, GSP))


@triton.jit
def group_codes(
    codes_ptr,
    col_bit_ptr,
    rows,
    row_mask,
    words_per_row,
    orig,
    col_mask,
    g,
    code_bits,
    GS: tl.constexpr,
    BN: tl.constexpr,
    GSP: tl.constexpr,
    WORD_BITS: tl.constexpr,
):
    """(BN, GSP) uint32 codes of group g's columns `orig` (original indices, (GSP,))."""
    if WORD_BITS:
        codes = unpack_word_codes(
            codes_ptr, rows, row_mask, words_per_row, g * GS * WORD_BITS, BN, GSP, WORD_BITS
        )
    else:
        bit = tl.load(col_bit_ptr + orig, mask=col_mask, other=0)
        codes = gather_codes(codes_ptr, rows, row_mask, words_per_row, bit, col_mask, code_bits)
    return codes


@triton.jit
def row_offsets(
    scale_ptr, zero_ptr, mean_ptr, rows, row_mask, g, R, code_bits, zero_bit, mean_index, SYM: tl.constexpr
):
    """(BN,) fp32 scale s and offset of group g: the zero point z of a uniform group, the mean mu of
    a binarised one (mean_index >= 0)."""
    scale = tl.load(scale_ptr + g * R + rows, mask=row_mask, other=0.0).to(tl.float32)
    binary = mean_index >= 0
    mean = tl.load(mean_ptr + mean_index * R + rows, mask=row_mask & binary, other=0.0).to(tl.float32)
    if SYM:
        zero = (tl.full((), 1, tl.int32) << code_bits).to(tl.float32) / 2
    else:
        bit = zero_bit + rows * code_bits
        shift = (bit & 31).to(tl.uint32)
        zero = read_codes(zero_ptr + (bit >> 5), shift, row_mask & (mean_index < 0), code_bits).to(tl.float32)
    return scale, tl.where(binary, mean, zero), binary


@triton.jit
def _uniform_matmul_kernel(
    x_ptr, out_ptr, codes_ptr, scale_ptr, zero_ptr, mean_ptr,
    code_bits_ptr, zero_bit_ptr, mean_index_ptr, col_bit_ptr, perm_ptr,
    M, R, C, words_per_row, stride_xm, stride_om, groups_per_program,
    GS: tl.constexpr, GSP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, SYM: tl.constexpr,
    PERMUTED: tl.constexpr, WORD_BITS: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < R
    toks = tl.program_id(1) * BM + tl.arange(0, BM)
    tok_mask = toks < M
    cols = tl.arange(0, GSP)
    first = tl.program_id(2) * groups_per_program
    last = tl.minimum(first + groups_per_program, tl.cdiv(C, GS))
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for g in range(first, last):
        col_mask = cols < tl.minimum(GS, C - g * GS)
        orig = g * GS + cols
        if PERMUTED:
            orig = tl.load(perm_ptr + orig, mask=col_mask, other=0)
        x_ptrs = x_ptr + toks[None, :].to(tl.int64) * stride_xm + orig[:, None]
        xt = tl.load(x_ptrs, mask=col_mask[:, None] & tok_mask[None, :], other=0.0)
        code_bits = tl.load(code_bits_ptr + g)
        codes = group_codes(
            codes_ptr, col_bit_ptr, rows, row_mask, words_per_row, orig, col_mask, g, code_bits,
            GS, BN, GSP, WORD_BITS,
        )  # fmt: skip
        qx = tl.dot(codes.to(tl.float32).to(tl.bfloat16), xt.to(tl.bfloat16))
        scale, offset, binary = row_offsets(
            scale_ptr, zero_ptr, mean_ptr, rows, row_mask, g, R, code_bits,
            tl.load(zero_bit_ptr + g), tl.load(mean_index_ptr + g), SYM,
        )  # fmt: skip
        # s (Q - z) = s Q - s z;  mu + s (2 Q - 1) = 2 s Q + (mu - s)
        slope = tl.where(binary, 2 * scale, scale)
        intercept = tl.where(binary, offset - scale, -scale * offset)
        xsum = tl.sum(xt.to(tl.float32), axis=0)
        acc += slope[:, None] * qx + intercept[:, None] * xsum[None, :]
    store_output_tile(out_ptr, acc, rows, row_mask, toks, tok_mask, stride_om, ATOMIC)


@triton.jit
def _uniform_dequant_kernel(
    w_ptr, codes_ptr, scale_ptr, zero_ptr, mean_ptr,
    code_bits_ptr, zero_bit_ptr, mean_index_ptr, col_bit_ptr, perm_ptr,
    row0, n_rows, R, C, words_per_row, stride_w,
    GS: tl.constexpr, GSP: tl.constexpr, BN: tl.constexpr, SYM: tl.constexpr,
    PERMUTED: tl.constexpr, WORD_BITS: tl.constexpr,
):  # fmt: skip
    local = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = row0 + local
    row_mask = local < n_rows
    g = tl.program_id(1)
    cols = tl.arange(0, GSP)
    col_mask = cols < tl.minimum(GS, C - g * GS)
    orig = g * GS + cols
    if PERMUTED:
        orig = tl.load(perm_ptr + orig, mask=col_mask, other=0)
    code_bits = tl.load(code_bits_ptr + g)
    codes = group_codes(
        codes_ptr, col_bit_ptr, rows, row_mask, words_per_row, orig, col_mask, g, code_bits,
        GS, BN, GSP, WORD_BITS,
    )  # fmt: skip
    codes = codes.to(tl.float32)
    scale, offset, binary = row_offsets(
        scale_ptr, zero_ptr, mean_ptr, rows, row_mask, g, R, code_bits,
        tl.load(zero_bit_ptr + g), tl.load(mean_index_ptr + g), SYM,
    )  # fmt: skip
    # the reference's fp32 expressions, so the result is bitwise equal
    uniform = scale[:, None] * (codes - offset[:, None])
    binarised = offset[:, None] + scale[:, None] * (2 * codes - 1)
    w = tl.where(binary, binarised, uniform)
    w_ptrs = w_ptr + local[:, None].to(tl.int64) * stride_w + orig[None, :]
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def word_bits(layout: UniformLayout, group_size: int) -> int:
    """Code width for the word-unpacking path (0: gather every code): every group the same width,
    dividing 32, with word-aligned groups, in the stored column order."""
    bits = layout.same_bits
    aligned = bits is not None and 32 % bits == 0 and group_size * bits % 32 == 0
    return bits if aligned and layout.perm is None else 0


def _operands(tensors: dict, layout: UniformLayout) -> tuple:
    codes = tensors["uq_codes"]
    return (
        codes,
        tensors["uq_scale"],
        tensors.get("uq_zero", codes),  # unread when symmetric or all groups binarised
        tensors.get("uq_mean", tensors["uq_scale"]),  # unread without binarised groups
        layout.code_bits,
        layout.zero_bit,
        layout.mean_index,
        layout.col_bit,
        layout.col_bit if layout.perm is None else layout.perm,
    )


def uniform_matmul(
    x: torch.Tensor,
    tensors: dict,
    shape: tuple[int, int],
    layout: UniformLayout,
    group_size: int,
    sym: bool,
    block_rows: int,
    block_tokens: int,
    groups_per_program: int,
    num_warps: int,
) -> torch.Tensor:
    """x (M, C) -> (M, R) = x W^T in x's dtype, W never formed (splitting as `bcq_matmul`)."""
    rows, cols = shape
    tokens = x.shape[0]
    splits = -(-layout.code_bits.numel() // groups_per_program)
    out, atomic = output_buffer(x, rows, splits)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(tokens, block_tokens), splits)
    _uniform_matmul_kernel[grid](
        x, out, *_operands(tensors, layout), tokens, rows, cols, tensors["uq_codes"].shape[1],
        x.stride(0), out.stride(0), groups_per_program,
        GS=group_size, GSP=padded_group(group_size), BN=block_rows, BM=block_tokens, SYM=sym,
        PERMUTED=layout.perm is not None, WORD_BITS=word_bits(layout, group_size), ATOMIC=atomic,
        num_warps=num_warps,
    )  # fmt: skip
    return out.to(x.dtype) if atomic else out


def uniform_dequantize_rows(
    out: torch.Tensor,
    tensors: dict,
    shape: tuple[int, int],
    layout: UniformLayout,
    group_size: int,
    sym: bool,
    row0: int,
    block_rows: int,
) -> None:
    """Write rows row0 .. row0 + len(out) - 1 of W into `out` (n, C), bitwise equal to
    `unpack_uniform` in fp32 before the cast to out's dtype."""
    rows, cols = shape
    grid = (triton.cdiv(out.shape[0], block_rows), layout.code_bits.numel())
    _uniform_dequant_kernel[grid](
        out, *_operands(tensors, layout), row0, out.shape[0], rows, cols, tensors["uq_codes"].shape[1],
        out.stride(0),
        GS=group_size, GSP=padded_group(group_size), BN=block_rows, SYM=sym,
        PERMUTED=layout.perm is not None, WORD_BITS=word_bits(layout, group_size),
    )  # fmt: skip
