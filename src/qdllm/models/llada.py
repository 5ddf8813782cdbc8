"""A clean LLaDA implementation, state-dict compatible with GSAI-ML/LLaDA-8B-* and LLaDA-1.5.

Parameter names follow the published checkpoints: `model.transformer.wte`,
`model.transformer.blocks.{i}.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj,
up_proj, ff_out}`, `model.transformer.ln_f`, `model.transformer.ff_out` (LM head). Attention is
always bidirectional; position i's logits score token i (no shift).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from qdllm.models.base import Anatomy, DiffusionLM, Stage

LLADA_MASK_ID = 126336


@dataclass
class LLaDAConfig:
    """The subset of LLaDA's config.json that defines the architecture."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    weight_tying: bool = False
    input_emb_norm: bool = False
    mask_token_id: int = LLADA_MASK_ID

    @classmethod
    def from_dict(cls, raw: dict) -> LLaDAConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        if raw.get("block_group_size", 1) != 1:
            raise ValueError("LLaDA config: block_group_size must be 1 for the block-wise pipeline")
        if raw.get("embedding_size") is None:
            cfg.embedding_size = cfg.vocab_size
        return cfg

    def to_dict(self) -> dict:
        return {"model_type": "llada", **asdict(self)}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split convention) on (B, H, L, hd), positions 0..L-1, in fp32."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, device=x.device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    xf = x.float()
    half = torch.cat([-xf[..., dim // 2 :], xf[..., : dim // 2]], dim=-1)
    return (xf * angles.cos() + half * angles.sin()).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm Llama-style block: bidirectional attention + SwiGLU (ff_proj is the gate)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = (
            cfg.n_heads,
            cfg.n_kv_heads,
            hd,
            cfg.rope_theta,
        )
        bias = cfg.include_bias
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=bias)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=bias)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, seq, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(b, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, self.theta), rotary(k, self.theta)
        att = F.scaled_dot_product_attention(
            q, k, v, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        h = x + self.attn_out(att.transpose(1, 2).reshape(b, seq, -1))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class _Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.embedding_size, cfg.d_model),
                "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
                "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            }
        )
        if not cfg.weight_tying:
            self.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class LLaDAModelLM(nn.Module):
    """LLaDA masked-diffusion LM; `state_dict()` keys match the published checkpoints."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = _Transformer(cfg)

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer["wte"](input_ids)
        return x * math.sqrt(self.config.d_model) if self.config.input_emb_norm else x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.transformer["ln_f"](hidden)
        if self.config.weight_tying:
            return F.linear(h, self.transformer["wte"].weight)
        return self.transformer["ff_out"](h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.transformer["blocks"]:
            h = block(h)
        return self.head(h)


class LLaDA(DiffusionLM):
    family = "llada"
    stages = (
        Stage("qkv", ("q_proj", "k_proj", "v_proj")),
        Stage("attn_out", ("attn_out",)),
        Stage("ff_in", ("ff_proj", "up_proj")),
        Stage("ff_out", ("ff_out",)),
    )

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]

    def anatomy(self) -> Anatomy:
        cfg = self.model.config
        return Anatomy(
            attn_norm="attn_norm",
            qkv=("q_proj", "k_proj", "v_proj"),
            attn_out="attn_out",
            ffn_norm="ff_norm",
            ffn_in=("ff_proj", "up_proj"),
            ffn_out="ff_out",
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.d_model // cfg.n_heads,
        )

    def embedding(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def final_norm(self) -> nn.Module:
        return self.model.transformer["ln_f"]

    def lm_head_weight(self) -> nn.Parameter:
        if self.model.config.weight_tying:
            return self.model.transformer["wte"].weight
        return self.model.transformer["ff_out"].weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def block_forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden)
