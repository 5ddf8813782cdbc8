"""Pure tensor functions that quantize one Linear weight W (out x in) given its input second moment S.

Entry point: `quantize_weight(weight, hessian, cfg)`; the methods live in `qdllm.quant.methods`.
"""

from qdllm.quant.api import QuantResult, quantize_weight
from qdllm.quant.errors import QuantConfigError, QuantInputError
from qdllm.quant.methods import daq_orders, get_method
from qdllm.quant.spec import QuantSpec

__all__ = [
    "QuantConfigError",
    "QuantInputError",
    "QuantResult",
    "QuantSpec",
    "daq_orders",
    "get_method",
    "quantize_weight",
]
