"""qdllm: extreme low-bit post-training quantization of diffusion language models.

`import qdllm` also registers the packed format with transformers (`quant_method: qdllm`), so
`AutoModelForCausalLM.from_pretrained(<packed dir>)` works for architectures transformers knows.
"""

__version__ = "0.1.0"

from qdllm.packing import hf as _transformers_registration  # noqa: E402, F401
from qdllm.packing.checkpoint import load_quantized  # noqa: E402

__all__ = ["load_quantized"]
