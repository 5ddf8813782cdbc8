"""Input second moments S = X^T X / N of Linears, accumulated in fp32 chunk by chunk (spec §4)."""

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
