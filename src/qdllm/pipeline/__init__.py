"""Stage-wise, true-sequential layer quantization of a whole diffusion LM."""

from qdllm.pipeline.quantize import PipelineReport, PipelineSpec, quantize_model
from qdllm.pipeline.stats import second_moments

__all__ = ["PipelineReport", "PipelineSpec", "quantize_model", "second_moments"]
