"""Build or load a `DiffusionLM` from the `model` config node (family, source, dtype)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qdllm.models.adapted import is_adapter_dir, load_adapted_model
from qdllm.models.base import DiffusionLM
from qdllm.models.llada import LLADA_MASK_ID, LLaDA, LLaDAConfig, LLaDAModelLM
from qdllm.models.qwen_llama import DREAM_MASK_ID, Dream, QwenLlamaDLLM
from qdllm.models.shards import read_shards
from qdllm.models.tokenizer import byte_level_tokenizer
from qdllm.quant.spec import DEFAULT_ABMP_RATIO

FAMILIES = ("llada", "dream", "ar_dllm")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model config cannot be turned into a model; the message names the field and the fix."""


@dataclass
class TinySpec:
    """Random-init dimensions for offline tests and demos."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192


@dataclass
class RecipeSpec:
    """Per-model defaults of the other config groups (`calib.nsamples: ${model.recipe.calib_nsamples}`).

    Paper settings for the 7-8B models: 128 x 4096 C4 tokens from the hub, groups of 128 columns,
    ABMP 5 % (LLaDA) or 10 % (Dream, paper Table 2b). Tiny models use a laptop-sized set from the
    local C4 excerpt and groups of 8 columns, so that each Linear has enough groups for ABMP to move.
    """

    calib_nsamples: int = 128
    calib_seqlen: int = 4096
    calib_source: str = "hf"
    abmp_ratio: float = DEFAULT_ABMP_RATIO
    abmp_scope: str = "matrix"
    group_size: int = 128


@dataclass
class ModelSpec:
    name: str = "tiny_llada"
    family: str = "llada"
    source: str = "tiny"  # tiny | a local directory | a Hugging Face hub id
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    mask_token_id: int | None = None  # default: tokenizer / family constant
    base_path: str | None = None  # adapter directories: the base GGUF file, if not the installed package
    seed: int = 0
    tiny: TinySpec = field(default_factory=TinySpec)
    recipe: RecipeSpec = field(default_factory=RecipeSpec)

    @classmethod
    def from_any(cls, cfg: Any) -> ModelSpec:
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        raw = dict(cfg)
        tiny = TinySpec(**raw.pop("tiny", {}) or {})
        recipe = RecipeSpec(**raw.pop("recipe", {}) or {})
        spec = cls(**raw, tiny=tiny, recipe=recipe)
        if spec.family not in FAMILIES:
            raise ModelLoadError(f"model.family={spec.family!r}: unknown model family; use one of {FAMILIES}")
        if spec.dtype not in DTYPES:
            raise ModelLoadError(f"model.dtype={spec.dtype!r}: use one of {list(DTYPES)}")
        return spec


def load_dllm(cfg: Any) -> DiffusionLM:
    spec = ModelSpec.from_any(cfg)
    if spec.source == "tiny":
        dllm = _tiny(spec)
    else:
        dllm = _pretrained(spec)
    dllm.model.to(device=spec.device, dtype=DTYPES[spec.dtype]).eval()
    dllm.model.requires_grad_(False)
    return dllm


def _wrap(family: str, model, tokenizer, mask_id: int, name: str) -> DiffusionLM:
    if family == "llada":
        return LLaDA(model, tokenizer, mask_id, shift_logits=False, name=name)
    cls = Dream if family == "dream" else QwenLlamaDLLM
    return cls(model, tokenizer, mask_id, name=name)


def _tiny(spec: ModelSpec) -> DiffusionLM:
    tokenizer = byte_level_tokenizer()
    vocab = len(tokenizer)
    mask_id = spec.mask_token_id if spec.mask_token_id is not None else tokenizer.mask_token_id
    torch.manual_seed(spec.seed)
    # built on the target device: a tiny model with 8B shapes initialises in seconds on a GPU
    # (the random weights depend on the device's generator, so a seed is reproducible per device)
    with torch.device(spec.device):
        model = _tiny_module(spec, vocab, mask_id)
    return _wrap(spec.family, model, tokenizer, mask_id, spec.name)


def _tiny_module(spec: ModelSpec, vocab: int, mask_id: int) -> torch.nn.Module:
    t = spec.tiny
    if spec.family == "llada":
        cfg = LLaDAConfig(
            d_model=t.hidden,
            n_heads=t.heads,
            n_kv_heads=t.heads,
            n_layers=t.layers,
            mlp_hidden_size=t.intermediate,
            vocab_size=vocab,
            embedding_size=vocab,
            max_sequence_length=4096,
            mask_token_id=mask_id,
        )
        model = LLaDAModelLM(cfg)
        _init_like_hf(model)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        kwargs = dict(
            vocab_size=vocab,
            hidden_size=t.hidden,
            intermediate_size=t.intermediate,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            num_key_value_heads=t.kv_heads,
            tie_word_embeddings=False,
        )
        if spec.family == "dream":
            model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        else:
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model


def _init_like_hf(model: torch.nn.Module, std: float = 0.02) -> None:
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)


def _resolve(spec: ModelSpec) -> Path:
    path = Path(os.path.expanduser(spec.source))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                spec.source,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"],
            )
        )
    except Exception as exc:
        raise ModelLoadError(
            f"model.source={spec.source!r} is neither a local directory nor a reachable Hugging Face "
            f"hub id ({type(exc).__name__}: {exc}); download it first or point model.source at a directory"
        ) from exc


def _tokenizer(path: Path, spec: ModelSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)


def _adapted(spec: ModelSpec, path: Path) -> DiffusionLM:
    model, tokenizer, config = load_adapted_model(path, spec.base_path)
    if config["family"] != spec.family:
        raise ModelLoadError(
            f"model.family={spec.family!r}: the adapter at {path} is a {config['family']!r} model; "
            f"set model.family={config['family']}"
        )
    mask_id = spec.mask_token_id if spec.mask_token_id is not None else config["mask_token_id"]
    return _wrap(spec.family, model.to(DTYPES[spec.dtype]), tokenizer, mask_id, spec.name)


def _pretrained(spec: ModelSpec) -> DiffusionLM:
    path = _resolve(spec)
    if is_adapter_dir(path):
        return _adapted(spec, path)
    raw = json.loads((path / "config.json").read_text())
    tokenizer = _tokenizer(path, spec)
    dtype = DTYPES[spec.dtype]
    if spec.family == "llada":
        cfg = LLaDAConfig.from_dict(raw)
        with torch.device("meta"):
            model = LLaDAModelLM(cfg)
        state = _read_safetensors(path)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        default_mask = raw.get("mask_token_id", LLADA_MASK_ID)
    else:
        from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

        if spec.family == "dream":
            keys = set(Qwen2Config().to_dict())
            qcfg = Qwen2Config(
                **{
                    k: v
                    for k, v in raw.items()
                    if k in keys and k not in ("model_type", "architectures", "auto_map")
                }
            )
            model = Qwen2ForCausalLM.from_pretrained(path, config=qcfg, dtype=dtype)
            default_mask = raw.get("mask_token_id", DREAM_MASK_ID)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=spec.trust_remote_code
            )
            default_mask = raw.get("mask_token_id", getattr(tokenizer, "mask_token_id", None))
    mask_id = (
        spec.mask_token_id if spec.mask_token_id is not None else getattr(tokenizer, "mask_token_id", None)
    )
    mask_id = mask_id if mask_id is not None else default_mask
    if mask_id is None:
        raise ModelLoadError(f"model.mask_token_id: {spec.source} has no mask token; set model.mask_token_id")
    return _wrap(spec.family, model, tokenizer, mask_id, spec.name)


def build_skeleton(family: str, raw: dict[str, Any]) -> torch.nn.Module:
    """The model of `family` described by a saved config.json, on the meta device (no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        if family == "llada":
            return LLaDAModelLM(LLaDAConfig.from_dict(raw))
        config_cls, model_cls = (
            (Qwen2Config, Qwen2ForCausalLM) if family == "dream" else (LlamaConfig, LlamaForCausalLM)
        )
        keys = set(config_cls().to_dict())
        config = config_cls(
            **{
                k: v
                for k, v in raw.items()
                if k in keys and k not in ("model_type", "architectures", "auto_map")
            }
        )
        return model_cls(config)


def wrap_model(family: str, model, tokenizer, mask_id: int, name: str) -> DiffusionLM:
    """The family's `DiffusionLM` adapter around a loaded model."""
    return _wrap(family, model, tokenizer, mask_id, name)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    state = read_shards(path, "*.safetensors")
    if not state:
        raise ModelLoadError(f"no *.safetensors in {path}; qdllm never loads pickled checkpoints")
    return state


def save_dllm(dllm: DiffusionLM, path: str | Path) -> Path:
    """Save weights (safetensors), config.json and the tokenizer so `load_dllm` can read them back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in dllm.model.state_dict().items()}
    if dllm.family == "llada":
        save_file(state, str(path / "model.safetensors"))
        config = dllm.model.config.to_dict()
    else:
        dllm.model.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
    config.update(mask_token_id=dllm.mask_token_id, qdllm_family=dllm.family)
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path / "config.json")
    dllm.tokenizer.save_pretrained(path)
    return path
