"""Pure tensor functions that quantize one Linear weight W (out x in) given its input second moment S.

Entry point: `quantize_weight(weight, hessian, cfg)`.
"""

from qdllm.quant.api import QuantInputError, QuantResult, daq_orders, quantize_weight
from qdllm.quant.spec import QuantConfigError, QuantSpec

__all__ = [
    "QuantConfigError",
    "QuantInputError",
    "QuantResult",
    "QuantSpec",
    "daq_orders",
    "quantize_weight",
]
