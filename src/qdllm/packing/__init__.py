"""Packed low-bit storage: bit packing (`bits`) and one quantized Linear's tensors (`linear`)."""

from qdllm.packing.bits import pack_bits, pack_codes, unpack_bits, unpack_codes
from qdllm.packing.linear import PackedFormatError, pack_daq, pack_uniform, unpack_daq, unpack_uniform

__all__ = [
    "PackedFormatError",
    "pack_bits",
    "pack_codes",
    "pack_daq",
    "pack_uniform",
    "unpack_bits",
    "unpack_codes",
    "unpack_daq",
    "unpack_uniform",
]
