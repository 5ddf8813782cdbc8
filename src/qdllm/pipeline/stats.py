"""Input second moments S = X^T X / N of Linears, accumulated in fp32 chunk by chunk (paper eq. 4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class _StageInputsCaptured(Exception):
    """Raised by the last hook to stop a block forward once every needed input was seen."""


@torch.no_grad()
def second_moments(
    run_block: Callable[[torch.Tensor], torch.Tensor],
    modules: Sequence[nn.Module],
    chunks: Sequence[torch.Tensor],
    device: torch.device,
    stop_early: bool = True,
    allow_tf32: bool = False,
) -> list[torch.Tensor]:
    """S (C_m, C_m) fp32 of each module's input over all chunks, normalised per token.

    Args:
        run_block: calls the block on one chunk of hidden states (B, L, d).
        modules: Linears whose inputs are measured (one per shared input is enough).
        chunks: hidden states of every calibration state, in chunks, on any device.
        stop_early: abort each forward once every module has seen its input (saves the rest of
            the block's compute; only valid when `modules` are used exactly once per forward).
        allow_tf32: accumulate X^T X with TF32 matmuls (fp32 accumulation) on CUDA.
    """
    sums = [torch.zeros(m.in_features, m.in_features, device=device, dtype=torch.float32) for m in modules]
    counts = [0] * len(modules)
    seen: set[int] = set()

    def make_hook(index: int):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            sums[index].addmm_(x.T, x)
            counts[index] += x.shape[0]
            seen.add(index)
            if stop_early and len(seen) == len(modules):
                raise _StageInputsCaptured

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules)]
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        for chunk in chunks:
            seen.clear()
            try:
                run_block(chunk.to(device))
            except _StageInputsCaptured:
                pass
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
        for h in handles:
            h.remove()
    return [s / max(n, 1) for s, n in zip(sums, counts, strict=True)]


def stage_input(
    run_block: Callable, module: nn.Module, chunk: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(tokens, C) fp32 input of `module` when `run_block` runs on `chunk` (the forward stops there)."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float32))
        raise _StageInputsCaptured

    handle = module.register_forward_pre_hook(hook)
    try:
        run_block(chunk.to(device))
    except _StageInputsCaptured:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def asymmetric_moments(
    run_quantized: Callable[[torch.Tensor], torch.Tensor],
    run_fp: Callable[[torch.Tensor], torch.Tensor],
    module_quantized: nn.Module,
    module_fp: nn.Module,
    chunks_quantized: Sequence[torch.Tensor],
    chunks_fp: Sequence[torch.Tensor],
    device: torch.device,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTAQ's statistics of one shared input, chunk by chunk in fp32:
    S = X~^T X~ / N (X~: the input in the partially quantized model, on the quantized trajectory)
    and D = (X - X~)^T X~ / N (X: the same Linear's input in the FP model, on the FP trajectory).
    Both (C, C); chunk i of the two caches holds the same calibration states."""
    size = module_quantized.in_features
    s = torch.zeros(size, size, device=device, dtype=torch.float32)
    d = torch.zeros_like(s)
    tokens = 0
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        for chunk_q, chunk_fp in zip(chunks_quantized, chunks_fp, strict=True):
            x_q = stage_input(run_quantized, module_quantized, chunk_q, device)
            x_fp = stage_input(run_fp, module_fp, chunk_fp, device)
            s.addmm_(x_q.T, x_q)
            d.addmm_((x_fp - x_q).T, x_q)
            tokens += x_q.shape[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return s / max(tokens, 1), d / max(tokens, 1)


@torch.no_grad()
def stage_input_sample(
    run_block: Callable, module: nn.Module, chunks: Sequence[torch.Tensor], device: torch.device, tokens: int
) -> torch.Tensor:
    """(<= tokens, C) fp32: the first `tokens` input rows of `module` over the chunks (SliM-LLM, AWQ)."""
    rows, seen = [], 0
    for chunk in chunks:
        rows.append(stage_input(run_block, module, chunk, device))
        seen += rows[-1].shape[0]
        if seen >= tokens:
            break
    return torch.cat(rows)[:tokens]
