"""transformers integration: `from_pretrained` loads a qdllm packed checkpoint whose architecture
transformers knows (Dream / AR-initialised dLLMs: Qwen2, Llama). Importing `qdllm` registers
`quant_method: qdllm`; the quantizer swaps the listed Linears for `QuantizedLinear`s with empty
(meta) packed buffers of the recorded shapes and dtypes before transformers loads the tensors, and
checks every module's recorded format against the loaded tensors afterwards.
LLaDA is not a transformers architecture without remote code: use `qdllm.load_quantized`."""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qdllm.packing.format import module_formats
from qdllm.packing.module import QuantizedLinear

QUANT_METHOD = "qdllm"


@register_quantization_config(QUANT_METHOD)
class QdllmQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` that `save_quantized` writes, kept as is."""

    def __init__(self, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@register_quantizer(QUANT_METHOD)
class QdllmHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads pre-quantized checkpoints only

    def validate_environment(self, *args, **kwargs) -> None:
        """Nothing beyond torch is needed: the reference path runs on any device."""

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        config = self.quantization_config
        if getattr(config, "input_transforms", None):
            # transformers would drop their tensors as unexpected keys and run the model unrotated
            raise ValueError(
                "this qdllm checkpoint carries online input rotations (QuaRot / DuQuant: "
                "quantization_config.input_transforms) that transformers cannot attach; load it with "
                "qdllm.load_quantized"
            )
        dtype = getattr(torch, config.dtype)
        for name, fmt in module_formats(config.to_dict()).items():
            linear = model.get_submodule(name)
            parts = {
                key: torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device="meta")
                for key, spec in config.tensors[name].items()
            }
            shape = (linear.out_features, linear.in_features)
            module = QuantizedLinear(parts, fmt, dtype, linear.bias, shape=shape)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self.quantization_config.modules:
            module = model.get_submodule(name)
            module.fmt.check(name, module.packed())
        return model

    def is_serializable(self, **kwargs) -> bool:
        return False  # write checkpoints with qdllm.packing.save_quantized

    @property
    def is_trainable(self) -> bool:
        return False
