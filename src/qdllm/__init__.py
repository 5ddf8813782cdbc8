"""qdllm: extreme low-bit post-training quantization of diffusion language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `qdllm.load_quantized(path)` without importing torch and transformers at `import qdllm`
    if name == "load_quantized":
        from qdllm.packing.checkpoint import load_quantized

        return load_quantized
    raise AttributeError(f"module 'qdllm' has no attribute {name!r}")
