"""qdllm: extreme low-bit post-training quantization of diffusion language models.

    import qdllm
    dllm = qdllm.load("smol_dllm")
    result = qdllm.quantize(dllm, method="daq", bits=2, nsamples=16, seqlen=128)
    qdllm.save_packed(dllm, result, "smol-daq-w2")
    model = qdllm.load_quantized("smol-daq-w2")

`import qdllm` also registers the packed format with transformers (`quant_method: qdllm`), so
`AutoModelForCausalLM.from_pretrained(<packed dir>)` works for architectures transformers knows.
"""

__version__ = "0.1.0"

from qdllm.packing import hf as _transformers_registration  # noqa: E402, F401
from qdllm.packing.checkpoint import load_quantized  # noqa: E402

__all__ = ["QuantizationResult", "load", "load_quantized", "quantize", "save_packed"]
_API = ("QuantizationResult", "load", "quantize", "save_packed")


def __getattr__(name: str):
    # the quantization front door pulls in Hydra and the calibration stack; loading a packed
    # checkpoint (inference hosts) must not need them
    if name in _API:
        from qdllm import api

        return getattr(api, name)
    raise AttributeError(f"module 'qdllm' has no attribute {name!r}")
