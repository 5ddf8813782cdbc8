"""qdllm: extreme low-bit post-training quantization of diffusion language models."""

__version__ = "0.1.0"
