"""Low-rank adapters (LoRA) on frozen Linears, for training; saved adapters are merged into the
weights at load time (`qdllm.models.lora.merged_weight`).

W' = W + (alpha / r) B A, with A (r, in) and B (out, r). B starts at zero, so an attached adapter
leaves the model unchanged until it is trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen `base` Linear plus a trainable rank-`rank` update; y = base(x) + scale * B(A(x))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming-uniform bound of a fan-in `in` layer
        a.uniform_(-bound, bound, generator=generator)
        device = base.weight.device
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(
            F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)
        )


def attach_lora(
    blocks: nn.ModuleList, targets: list[str], rank: int, alpha: float, seed: int
) -> dict[str, LoRALinear]:
    """Replace `targets` (names inside each block, e.g. "self_attn.q_proj") with `LoRALinear`s.

    Returns {"<block index>.<target>": adapter} in a fixed order, so adapter keys and their random
    initialisation depend only on `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, LoRALinear] = {}
    for index, block in enumerate(blocks):
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise TypeError(
                    f"adapt.lora.targets: {name!r} in block {index} is {type(base).__name__}, not Linear"
                )
            base.requires_grad_(False)
            adapter = LoRALinear(base, rank, alpha, generator)
            setattr(parent, child, adapter)
            adapters[f"{index}.{name}"] = adapter
    return adapters
