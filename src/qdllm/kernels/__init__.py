"""Packed-Linear matmuls on the GPU (Triton): a CUDA-core kernel for a handful of tokens, fused
tensor-core kernels for a few dozen, just-in-time
dequantization into a shared buffer + cuBLAS for many (`dispatch`). The Triton modules (`bcq`,
`uniform`) are imported only when a kernel runs, so the package imports without Triton."""

from qdllm.kernels.dispatch import (
    FUSED_MAX_TOKENS,
    GEMV_MAX_TOKENS,
    FusedConfig,
    GemvConfig,
    PackedMatmul,
    packed_linear,
)

__all__ = [
    "FUSED_MAX_TOKENS",
    "GEMV_MAX_TOKENS",
    "FusedConfig",
    "GemvConfig",
    "PackedMatmul",
    "packed_linear",
]
