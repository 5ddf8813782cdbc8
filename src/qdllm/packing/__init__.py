"""Packed low-bit storage: bit packing (`bits`) and one quantized Linear's tensors (`linear`)."""

from qdllm.packing.bits import pack_bits, unpack_bits
from qdllm.packing.linear import PackedFormatError, pack_daq, pack_uniform, unpack_daq, unpack_uniform

__all__ = [
    "PackedFormatError",
    "pack_bits",
    "pack_daq",
    "pack_uniform",
    "unpack_bits",
    "unpack_daq",
    "unpack_uniform",
]
