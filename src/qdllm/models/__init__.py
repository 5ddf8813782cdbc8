"""Diffusion-LM families behind one interface (`DiffusionLM`): LLaDA, Dream, AR-initialised dLLMs."""

from qdllm.models.base import DiffusionLM, Stage
from qdllm.models.registry import ModelLoadError, ModelSpec, load_dllm, save_dllm

__all__ = ["DiffusionLM", "ModelLoadError", "ModelSpec", "Stage", "load_dllm", "save_dllm"]
