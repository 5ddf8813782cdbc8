"""The transform step of the pipeline: rewrite the FP model (`qdllm.transforms`) before any weight
is quantized, with the calibration states at hand.

Order in a job: calibration states -> `transform_model` -> `quantize_model` -> activation hooks ->
evaluation. A resumed job applies the transform again to the freshly loaded FP model (it is
deterministic given the states and `quant.transform`), then reloads its finished blocks; the block
checkpoints are keyed on the transformed weights, so another transform never resumes them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from qdllm.models.base import DiffusionLM
from qdllm.pipeline.quantize import PipelineSpec, device_clock, embed_states, move_shared_modules, new_cache
from qdllm.transforms import TransformSpec, get_transform


@torch.no_grad()
def activation_absmax(
    dllm: DiffusionLM, states: torch.Tensor, spec: PipelineSpec | None = None
) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every quantized Linear's input over all calibration tokens, FP model.

    Args:
        states: (M, L) int64 calibration states (MCS states: masked inputs as the denoiser sees them).
        spec: batch size, cache and execution devices, as for `quantize_model`.

    Returns:
        full Linear name -> (C,) fp32 max over every token of every state, on the model's device.
        Linears of one stage read the same input and share one tensor.
    """
    spec = (spec or PipelineSpec()).validated()
    home = dllm.device
    device = torch.device(spec.exec_device) if spec.exec_device else home
    names = dllm.module_names()
    absmax: dict[str, torch.Tensor] = {}
    timing: dict[str, float] = {"embed": 0.0}
    move_shared_modules(dllm, home, device)
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(new_cache(spec, device))
        embed_states(dllm, states, spec, cache, device, timing)
        for block in dllm.blocks():
            if device != home:
                block.to(device)
            maxima, handles = [], []
            for stage in dllm.stages:
                first = block.get_submodule(stage.linears[0])
                maxima.append(torch.zeros(first.in_features, device=device, dtype=torch.float32))
                handles.append(first.register_forward_pre_hook(_track_absmax(maxima[-1])))
            try:
                for i, chunk in enumerate(cache):
                    cache[i] = dllm.block_forward(block, chunk.to(device)).to(cache.device)
            finally:
                for handle in handles:
                    handle.remove()
            if device != home:
                block.to(home)
            for stage, peak in zip(dllm.stages, maxima, strict=True):
                for name in stage.linears:
                    absmax[names[id(block.get_submodule(name))]] = peak.to(home)
    move_shared_modules(dllm, device, home)
    return absmax


def _track_absmax(peak: torch.Tensor):
    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
        torch.maximum(peak, x.abs().amax(dim=0), out=peak)

    return hook


def transform_model(
    dllm: DiffusionLM, states: torch.Tensor | None, transform: TransformSpec, spec: PipelineSpec | None = None
) -> dict[str, Any]:
    """Apply `transform` to the FP `dllm` in place; returns its report ({} for `none`), with the
    seconds it took. `states` (M, L) are needed by transforms that read activation maxima."""
    transform = transform.validated()
    if not transform.enabled:
        return {}
    entry = get_transform(transform.name)
    start = device_clock(dllm.device)
    if entry.needs_act_absmax:
        if states is None:
            raise ValueError(f"quant.transform.name={transform.name!r} needs calibration states")
        report = entry.apply(dllm, transform, activation_absmax(dllm, states, spec))
    else:
        report = entry.apply(dllm, transform)
    return {"name": transform.name, **(report or {}), "seconds": device_clock(dllm.device) - start}
