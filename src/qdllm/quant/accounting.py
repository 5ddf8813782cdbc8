"""Storage cost of a quantized Linear, in bits, counting every stored number.

The packed format (signs or codes as bits, scales in `scale_bits`, one uint8 order or bit width per
group) stores exactly what is counted here, so effective bits per weight = total / (R * C).
"""

from __future__ import annotations

from collections.abc import Sequence

GROUP_META_BITS = 8  # one uint8 order / bit width per column group


def daq_bits(
    rows: int, widths: Sequence[int], orders: Sequence[int], scale_bits: int, row_center: bool
) -> int:
    """Sign planes K*R*g, row scales K*R and column scales K*g per group, optional row mean R."""
    total = 0
    for g, k in zip(widths, orders, strict=True):
        total += k * rows * g + k * (rows + g) * scale_bits + GROUP_META_BITS
        if row_center:
            total += rows * scale_bits
    return total


def uniform_bits(rows: int, widths: Sequence[int], bits: Sequence[int], sym: bool, scale_bits: int) -> int:
    """Codes b*R*g, one scale per row and group, and (asymmetric) a b-bit zero point per row."""
    total = 0
    for g, b in zip(widths, bits, strict=True):
        total += b * rows * g + rows * scale_bits + GROUP_META_BITS
        if not sym:
            total += rows * b
    return total


def input_scale_bits(cols: int, scale_bits: int) -> int:
    """One stored scale per input channel (AWQ's s, the Linear divides its input by it)."""
    return cols * scale_bits


def slim_bits(rows: int, widths: Sequence[int], bits: Sequence[int], scale_bits: int) -> int:
    """SliM-LLM: asymmetric uniform groups as `uniform_bits`; a 1-bit group stores its signs, a
    row mean and a row scale."""
    total = 0
    for g, b in zip(widths, bits, strict=True):
        if b == 1:
            total += rows * g + 2 * rows * scale_bits + GROUP_META_BITS
        else:
            total += uniform_bits(rows, [g], [b], False, scale_bits)
    return total
