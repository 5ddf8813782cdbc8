"""`QuantizedLinear`: a Linear that stores packed low-bit tensors and computes what the fake-quantized
Linear computes. On CUDA it runs `qdllm.kernels` (fused low-bit kernels, no dequantized copy kept);
elsewhere, or with `kernel=False`, the reference path: unpack to the dequantized weight, then
F.linear. `cache=True` keeps the dequantized weight after first use (reference path).

A uniform module with an input scale s (AWQ, `fmt.input_scale`) computes (x diag(s)^-1) Q^T, Q the
stored codes' weight: the kernels get x / s; the reference path folds 1/s into the dequantized columns
(Q diag(s)^-1, the fake-quantized weight bit for bit, so the logits equal the fake-quantized model's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdllm.kernels import packed_linear
from qdllm.packing.format import INPUT_SCALE_KEY, ModuleFormat
from qdllm.packing.linear import unpack_daq, unpack_uniform


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        fmt: ModuleFormat,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
        cache: bool = False,
        shape: tuple[int, int] | None = None,
        kernel: bool = True,
    ):
        """`fmt`: the module's recorded format (kind, group size, scale dtype, sym)."""
        super().__init__()
        self.fmt, self.dtype, self.cache, self.kernel = fmt, dtype, cache, kernel
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
        fmt = self.fmt
        tensors = {k: v.cpu() for k, v in self.packed().items()} if fmt.kind == "uniform" else self.packed()
        if fmt.kind == "bcq":
            weight = unpack_daq(tensors, fmt.group_size)
        else:
            weight = unpack_uniform(tensors, fmt.sym, fmt.group_size)
            if fmt.input_scale:
                weight = weight / tensors[INPUT_SCALE_KEY].float()
        weight = weight.to(device=self.weight_shape.device, dtype=self.dtype)
        if self.cache:
            self._dequantized = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.kernel and not self.cache:
            if self.fmt.input_scale:  # the kernels multiply by the stored Q(W diag(s)) itself
                x = (x.float() / getattr(self, INPUT_SCALE_KEY).float()).to(x.dtype)
            return packed_linear(self, x)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, kind={self.fmt.kind}, "
            f"group_size={self.fmt.group_size}"
        )
