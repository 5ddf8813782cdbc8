"""Bit packing into int32 words: little-endian bit order along the last dimension (bit i of word
w holds element 32 w + i), the layout of the qdllm packed format. b-bit codes are packed as a bit
stream (element e occupies bits e b .. e b + b - 1), so any b in 1..8 is exact: ceil(n b / 32)
words for n codes."""

from __future__ import annotations

import torch

WORD = 32


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., ceil(n / 32)) int32."""
    n = bits.shape[-1]
    words = -(-n // WORD)
    padded = torch.zeros(*bits.shape[:-1], words * WORD, dtype=torch.int64, device=bits.device)
    padded[..., :n] = bits.to(torch.int64)
    shifts = torch.arange(WORD, device=bits.device, dtype=torch.int64)
    unsigned = (padded.view(*bits.shape[:-1], words, WORD) << shifts).sum(-1)
    return (unsigned - (unsigned >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """(..., ceil(n / 32)) int32 -> (..., n) bool."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(WORD, device=words.device, dtype=torch.int64)
    bits = (unsigned.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :n].bool()
