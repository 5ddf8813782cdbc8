"""Dream (Qwen2 layout) and AR-initialised dLLMs (any Llama / Qwen2 model) with transformers' modules.

Both run with bidirectional attention (every attention module's `is_causal` is False and no mask
is passed) and shifted logits: position i's prediction is read from output i-1 (the Dream recipe).
Dream's published weights use Qwen2's parameter names, so they load into `Qwen2ForCausalLM`
without remote code.
"""

from __future__ import annotations

import torch
from torch import nn

from qdllm.models.base import Anatomy, DiffusionLM, Stage

DREAM_MASK_ID = 151666


def make_bidirectional(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.self_attn.is_causal = False


class QwenLlamaDLLM(DiffusionLM):
    """Shared implementation for Qwen2 / Llama decoder stacks used as masked-diffusion LMs."""

    family = "ar_dllm"
    stages = (
        Stage("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Stage("attn_out", ("self_attn.o_proj",)),
        Stage("ff_in", ("mlp.gate_proj", "mlp.up_proj")),
        Stage("ff_out", ("mlp.down_proj",)),
    )

    def __init__(self, model: nn.Module, tokenizer, mask_token_id: int, name: str = ""):
        super().__init__(model, tokenizer, mask_token_id, shift_logits=True, name=name)
        make_bidirectional(model)

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def shared_modules(self) -> list[nn.Module]:
        return [self.model.model.rotary_emb]

    def anatomy(self) -> Anatomy:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        return Anatomy(
            attn_norm="input_layernorm",
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            attn_out="self_attn.o_proj",
            ffn_norm="post_attention_layernorm",
            ffn_in=("mlp.gate_proj", "mlp.up_proj"),
            ffn_out="mlp.down_proj",
            n_heads=heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        )

    def embedding(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def lm_head_weight(self) -> nn.Parameter:
        return self.model.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def block_forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rope = self.model.model.rotary_emb(hidden, positions)
        out = block(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))


class Dream(QwenLlamaDLLM):
    family = "dream"
