"""Structured-config schema of `experiments/adapt_dllm.py`, registered in Hydra's ConfigStore.

The primary config `conf/adapt.yaml` lists `adapt_schema` first in its defaults, so its values and
every command-line override are type-checked at compose time: a mistyped key (`max_step=30`) or an
ill-typed value (`max_steps=abc`) fails there, naming the key, before any work. The schema holds
types only; every value, with its reason, lives in `conf/adapt.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class AdaptBaseConf:
    """The base causal LM: a GGUF file shipped in a PyPI package (`qdllm.models.adapted`)."""

    package: str = MISSING
    version: str = MISSING
    file: str = MISSING  # path inside the installed package
    gguf_path: str | None = MISSING  # a GGUF file elsewhere instead of the package's


@dataclass
class AdaptSpecialConf:
    """Tokens given the diffusion roles."""

    doc_token: str = MISSING  # BOS / EOS / pad, between training documents
    mask_token: str = MISSING  # a reserved token of the base vocabulary


@dataclass
class AdaptDataConf:
    """Training corpus: Gutenberg shards and JSONL files under `root`, tokenised once into `cache_dir`."""

    root: str = MISSING
    cache_dir: str = MISSING
    train_shards: list[str] = MISSING
    train_jsonl: list[str] = MISSING
    valid_shards: list[str] = MISSING


@dataclass
class AdaptLoRAConf:
    """LoRA on the named Linears of every block: W' = W + (alpha / rank) B A."""

    rank: int = MISSING
    alpha: float = MISSING
    targets: list[str] = MISSING
    save_dtype: str = MISSING  # torch dtype name of the saved factors


@dataclass
class AdaptOptimConf:
    """AdamW with warmup, a constant phase and a linear decay to `min_lr_ratio`."""

    lr: float = MISSING
    lr_norms: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    warmup_steps: int = MISSING
    decay_fraction: float = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class AdaptConf:
    """The whole adaptation run (`qdllm.adapt.train.adapt`)."""

    prepare_only: bool = MISSING  # only tokenise the corpus into data.cache_dir
    seed: int = MISSING
    device: str = MISSING
    bf16: bool = MISSING
    out_dir: str = MISSING
    base: AdaptBaseConf = field(default_factory=AdaptBaseConf)
    special: AdaptSpecialConf = field(default_factory=AdaptSpecialConf)
    data: AdaptDataConf = field(default_factory=AdaptDataConf)
    lora: AdaptLoRAConf = field(default_factory=AdaptLoRAConf)
    optim: AdaptOptimConf = field(default_factory=AdaptOptimConf)
    seq_len: int = MISSING
    batch_size: int = MISSING
    eps: float = MISSING
    max_steps: int = MISSING
    time_budget_s: float = MISSING
    eval_every: int = MISSING
    valid_batches: int = MISSING
    checkpoint_every: int = MISSING


def register_adapt_configs() -> None:
    """Store the schema as `adapt_schema` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="adapt_schema", node=AdaptConf)
