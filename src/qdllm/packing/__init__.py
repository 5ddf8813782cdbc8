"""Packed low-bit storage: bit packing (`bits`), one quantized Linear's tensors (`linear`) and the
format recorded for it (`format`)."""

from qdllm.packing.bits import pack_bits, unpack_bits
from qdllm.packing.format import ModuleFormat, PackedFormatError
from qdllm.packing.linear import pack_daq, pack_uniform, unpack_daq, unpack_uniform

__all__ = [
    "ModuleFormat",
    "PackedFormatError",
    "pack_bits",
    "pack_daq",
    "pack_uniform",
    "unpack_bits",
    "unpack_daq",
    "unpack_uniform",
]
