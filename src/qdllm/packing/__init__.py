"""Packed low-bit storage: bit packing (`bits`), one quantized Linear's tensors (`linear`) and the
format recorded for it (`format`)."""

from qdllm.packing.bits import pack_bits, pack_codes, unpack_bits, unpack_codes
from qdllm.packing.format import ModuleFormat, PackedFormatError
from qdllm.packing.linear import pack_daq, pack_uniform, unpack_daq, unpack_uniform

__all__ = [
    "ModuleFormat",
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
