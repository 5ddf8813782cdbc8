"""Packed-Linear matmuls on the GPU (Triton): fused low-bit kernels for few tokens, just-in-time
dequantization into a shared buffer + cuBLAS for many (`dispatch`). The Triton modules (`bcq`,
`uniform`) are imported only when a kernel runs, so the package imports without Triton."""

from qdllm.kernels.dispatch import FUSED_MAX_TOKENS, FusedConfig, PackedMatmul, packed_linear

__all__ = ["FUSED_MAX_TOKENS", "FusedConfig", "PackedMatmul", "packed_linear"]
