"""The small interface every diffusion-LM family implements for the pipeline, evaluation, packing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Anatomy:
    """Where an equivalence transform (smoothing, rotation) finds the modules it rewrites.

    Block-relative dotted names: `attn_norm` feeds `qkv` (q, k, v), whose attention output feeds
    `attn_out`; `ffn_norm` feeds `ffn_in` (gate, up), whose product feeds `ffn_out`. Every norm is an
    RMSNorm y = w * x / rms(x) with a `weight` (d,). `head_dim` columns per head, `n_heads` query
    and `n_kv_heads` key/value heads (GQA when they differ).
    """

    attn_norm: str
    qkv: tuple[str, str, str]
    attn_out: str
    ffn_norm: str
    ffn_in: tuple[str, str]
    ffn_out: str
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Stage:
    """Linears of one block that read the same input, quantized together (true-sequential order)."""

    name: str
    linears: tuple[str, ...]


class DiffusionLM:
    """A masked-diffusion LM: blocks, stages, bidirectional block calls and aligned logits.

    Subclasses set `family`, `stages`, `mask_token_id`, `shift_logits` and implement `blocks`,
    `embed`, `block_forward`, `head`.
    """

    family: str = ""
    stages: tuple[Stage, ...] = ()

    def __init__(self, model: nn.Module, tokenizer, mask_token_id: int, shift_logits: bool, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id)
        self.shift_logits = shift_logits
        self.name = name or self.family

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def anatomy(self) -> Anatomy:
        """The block layout equivalence transforms rewrite (same for every block)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its block anatomy")

    def embedding(self) -> nn.Embedding:
        """The token embedding (its rows are block 0's input, before any family scaling)."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        """The RMSNorm before the LM head."""
        raise NotImplementedError

    def lm_head_weight(self) -> nn.Parameter:
        """(V, d) weight of the LM head; the embedding's own weight when the two are tied."""
        raise NotImplementedError

    def shared_modules(self) -> list[nn.Module]:
        """Modules outside the blocks that `block_forward` uses (moved along when offloading)."""
        return []

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, d) block-0 input."""
        raise NotImplementedError

    def block_forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One block on (B, L, d) states, bidirectional attention, position ids 0..L-1."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (B, L, d) -> (B, L, V) raw logits."""
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, start: int = 0, length: int | None = None) -> torch.Tensor:
        """(B, length, V) logits of positions [start, start + length) (default: all), aligned so that
        position i scores token i (shifted families realigned; their position 0 repeats position 0's
        output). The LM head runs on the requested positions only, which is most of the cost of a
        forward over a short sequence with a large vocabulary."""
        hidden = self.embed(input_ids)
        for block in self.blocks():
            hidden = self.block_forward(block, hidden)
        length = input_ids.shape[1] - start if length is None else length
        if not self.shift_logits:
            return self.head(hidden[:, start : start + length])
        source = torch.arange(start, start + length, device=hidden.device).sub(1).clamp_min(0)
        return self.head(hidden[:, source])

    def module_names(self) -> dict[int, str]:
        """id(module) -> its dotted name in `self.model` (state-dict prefixes)."""
        return {id(m): name for name, m in self.model.named_modules()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
