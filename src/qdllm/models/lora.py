"""Folding a low-rank adapter (LoRA) into its Linear: W' = W + (alpha / r) B A.

The merge is model-side math (adapted checkpoints are merged at load time); `qdllm.adapt` trains
the factors and depends on this module, never the other way round.
"""

from __future__ import annotations

import torch


def merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """(out, in) W + scale * B A for A (r, in) and B (out, r), computed in fp32 and returned in W's dtype."""
    delta = lora_b.float() @ lora_a.float()
    return (weight.float() + scale * delta).to(weight.dtype)
