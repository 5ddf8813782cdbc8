"""Per-group offsets into the packed format-1 tensors (`qdllm.packing.linear`), computed once per
layer and device so the kernels can read the stored bit streams in place (no repacking, no copy).

BCQ: group g owns planes plane[g] .. plane[g] + order[g] - 1; its plane k starts at bit
bit[g] + k w_g of every row's sign stream and at the same index of `bcq_col_scale`.
Uniform: group g's codes have `code_bits[g]` bits (1 for a binarised group); column c's code starts
at bit `col_bit[c]` of its row's stream; an asymmetric group's zero points start at bit
`zero_bit[g]` of `uq_zero` (row r at zero_bit[g] + r b_g); `mean_index[g]` is the row of `uq_mean` of a
binarised group (-1 otherwise). The fused kernels walk the columns in `perm` order, in which every
run of group_size columns is one group (act-order checkpoints store the codes in the original
column order, so `perm` sorts the columns by group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdllm.packing.linear import PackedFormatError


def padded_group(group_size: int) -> int:
    """Power-of-two tile width >= group_size and >= 32 (one sign word) that a group is read in."""
    return max(32, 1 << (group_size - 1).bit_length())


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


@dataclass
class BcqLayout:
    """(G,) int32 each: order, first plane, first bit of the sign stream."""

    order: torch.Tensor
    plane: torch.Tensor
    bit: torch.Tensor


def bcq_layout(tensors: dict, group_size: int, device: torch.device) -> BcqLayout:
    rows, cols = (int(x) for x in tensors["weight_shape"])
    order = tensors["bcq_k"].to(torch.int64).cpu()
    groups = -(-cols // group_size)
    if order.numel() != groups:
        raise PackedFormatError(
            f"bcq_k has {order.numel()} groups but weight_shape {rows}x{cols} with group_size "
            f"{group_size} has {groups}: load the checkpoint with its own group_size"
        )
    widths = torch.full((groups,), group_size, dtype=torch.int64)
    widths[-1] = cols - group_size * (groups - 1)
    as_int32 = {"dtype": torch.int32, "device": device}
    return BcqLayout(
        order=order.to(**as_int32),
        plane=_exclusive_cumsum(order).to(**as_int32),
        bit=_exclusive_cumsum(order * widths).to(**as_int32),
    )


@dataclass
class UniformLayout:
    """(G,) int32: code_bits, zero_bit, mean_index; (C,) int32: col_bit and perm (None when the
    groups are already contiguous, i.e. no act-order)."""

    code_bits: torch.Tensor
    zero_bit: torch.Tensor
    mean_index: torch.Tensor
    col_bit: torch.Tensor
    perm: torch.Tensor | None
    same_bits: int | None  # the code width of every group, None when the widths mix


def uniform_layout(tensors: dict, group_size: int, device: torch.device) -> UniformLayout:
    rows, cols = (int(x) for x in tensors["weight_shape"])
    kinds = tensors["uq_bits"].to(torch.int64).cpu()
    groups = -(-cols // group_size)
    if kinds.numel() != groups:
        raise PackedFormatError(
            f"uq_bits has {kinds.numel()} groups but weight_shape {rows}x{cols} with group_size "
            f"{group_size} has {groups}: load the checkpoint with its own group_size"
        )
    code_bits = kinds.clamp(min=1)
    g_idx = tensors.get("uq_g_idx")
    g_idx = torch.arange(cols) // group_size if g_idx is None else g_idx.to(torch.int64).cpu()
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(cols) // group_size):
        raise PackedFormatError(
            "uq_g_idx: the fused kernels need every group to hold group_size columns (the last one "
            "the rest), as GPTQ's act-order writes them; run this layer with QuantizedLinear.kernel=False"
        )
    binary = kinds == 0
    uniform_bits = torch.where(binary, 0, kinds)
    as_int32 = {"dtype": torch.int32, "device": device}
    contiguous = torch.equal(perm, torch.arange(cols))
    same = code_bits.unique()
    return UniformLayout(
        code_bits=code_bits.to(**as_int32),
        zero_bit=(_exclusive_cumsum(uniform_bits) * rows).to(**as_int32),
        mean_index=torch.where(binary, torch.cumsum(binary, 0) - 1, -1).to(**as_int32),
        col_bit=_exclusive_cumsum(code_bits[g_idx]).to(**as_int32),
        perm=None if contiguous else perm.to(**as_int32),
        same_bits=int(same[0]) if same.numel() == 1 else None,
    )
