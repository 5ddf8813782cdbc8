"""`QuantizedLinear`: a Linear that stores packed low-bit tensors and computes what the fake-quantized
Linear computes. On CUDA it runs `qdllm.kernels` (fused low-bit kernels, no dequantized copy kept);
elsewhere, or with `kernel=False`, the reference path: unpack to the dequantized weight, then
F.linear. `cache=True` keeps the dequantized weight after first use (reference path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdllm.kernels import packed_linear
from qdllm.packing.linear import unpack_daq, unpack_uniform

KINDS = ("bcq", "uniform")


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        kind: str,
        group_size: int,
        dtype: torch.dtype,
        sym: bool = False,
        bias: torch.Tensor | None = None,
        cache: bool = False,
        shape: tuple[int, int] | None = None,
        kernel: bool = True,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"QuantizedLinear kind {kind!r}: use one of {KINDS}")
        self.kind, self.group_size, self.sym, self.dtype, self.cache = kind, group_size, sym, dtype, cache
        self.kernel = kernel
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        # `shape` (out, in) when the tensors are still empty placeholders (meta device)
        self.out_features, self.in_features = shape or tuple(int(x) for x in tensors["weight_shape"])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._dequantized: torch.Tensor | None = None

    def packed(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantize(self) -> torch.Tensor:
        """(out, in) weight in the model dtype, equal to the fake-quantized weight."""
        if self._dequantized is not None:
            return self._dequantized
        tensors = {k: v.cpu() for k, v in self.packed().items()} if self.kind == "uniform" else self.packed()
        if self.kind == "bcq":
            weight = unpack_daq(tensors, self.group_size)
        else:
            weight = unpack_uniform(tensors, self.sym, self.group_size)
        weight = weight.to(device=self.weight_shape.device, dtype=self.dtype)
        if self.cache:
            self._dequantized = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.kernel and not self.cache:
            return packed_linear(self, x)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, kind={self.kind}, group_size={self.group_size}"
        )
