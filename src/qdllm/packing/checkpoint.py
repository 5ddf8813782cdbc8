"""Packed checkpoints: a directory that loads without re-quantizing.

Layout: `config.json` (the model's config + `quantization_config`), sharded
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` (quantized Linears as packed
tensors `<module>.bcq_*` / `<module>.uq_*`, every other tensor as saved by the model), the
tokenizer, and a model card `README.md`. `quantization_config.modules` records every packed module's
`ModuleFormat` (kind, group size, scale dtype, sym), which the loaders read and check against the
tensors. `load_quantized` builds the model on the meta device, puts a `QuantizedLinear` where the
config lists a packed module and assigns every tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qdllm.models.base import DiffusionLM
from qdllm.models.registry import DTYPES, build_skeleton, wrap_model
from qdllm.packing.format import (
    FORMAT_VERSION,
    INPUT_SCALE_KEY,
    ModuleFormat,
    PackedFormatError,
    module_formats,
)
from qdllm.packing.module import QuantizedLinear
from qdllm.quant.methods import get_method
from qdllm.quant.spec import QuantSpec
from qdllm.transforms.online import (
    CHILD_NAME,
    attach_input_transform,
    input_transform_of,
    transform_from_record,
    transform_record,
)

QUANT_METHOD = "qdllm"
SHARD_BYTES = 2 * 2**30
PACKED_KEYS = {
    "bcq": ("bcq_k", "bcq_signs", "bcq_row_scale", "bcq_col_scale", "weight_shape"),
    "uniform": ("uq_bits", "uq_codes", "uq_scale", "weight_shape"),
}
OPTIONAL_KEYS = {"bcq": ("bcq_row_mean",), "uniform": ("uq_zero", "uq_mean", "uq_g_idx", INPUT_SCALE_KEY)}
SCALE_LEAVES = ("bcq_row_scale", "bcq_col_scale", "bcq_row_mean", "uq_scale", "uq_zero", INPUT_SCALE_KEY)


def provenance(quant: QuantSpec, bits_per_weight: float, calibration: dict[str, Any]) -> dict[str, Any]:
    """The method settings a packed checkpoint records in `quantization_config` beside the module
    formats; the ABMP ratio as applied (0 for methods without ABMP), as `results.json` records it."""
    from qdllm import __version__

    return {
        "method": quant.method,
        "group_size": quant.group_size,
        "sym": quant.sym,
        "bits": quant.bits,
        "order": quant.order,
        "abmp_ratio": quant.abmp_ratio if get_method(quant.method).supports_abmp else 0.0,
        "abmp_scope": quant.abmp_scope,
        "avg_bits_per_weight": bits_per_weight,
        "calibration": calibration,
        "qdllm_version": __version__,
    }


def save_quantized(
    dllm: DiffusionLM,
    packed: dict[str, tuple[ModuleFormat, dict[str, torch.Tensor]]],
    path: str | Path,
    quantization: dict[str, Any],
    card: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Write the packed checkpoint into `path` (atomically: a finished directory or none).

    `packed`: module name -> (format, tensors) from the pipeline (`PipelineSpec.pack`);
    `quantization`: method provenance for `quantization_config` (the loaders read each module's
    own format, not these). Returns bytes per tensor kind (`size_breakdown`).
    """
    path = Path(path)
    state = dllm.model.state_dict()
    replaced = {f"{name}.weight" for name in packed}
    missing = replaced - set(state)
    if missing:
        raise PackedFormatError(f"packed modules {sorted(missing)} are not Linears of the model")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if key in replaced:
            continue
        value = value.detach().cpu()
        tensors[key] = value.clone() if value.data_ptr() in seen else value.contiguous()  # tied weights
        seen.add(value.data_ptr())
    for name, (_, parts) in packed.items():
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in parts.items()})
    online = _online_transforms(dllm, tensors)

    for name, (fmt, parts) in packed.items():
        fmt.check(name, parts)
    config = _model_config(dllm)
    config["quantization_config"] = _quantization_config(dllm, packed, state, replaced, quantization)
    if online:
        config["quantization_config"]["input_transforms"] = online
    sizes = size_breakdown(tensors, packed)
    staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=path.parent if path.parent.exists() else None))
    try:
        index = _write_shards(tensors, staging)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        dllm.tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(dllm, config["quantization_config"], sizes, card or {}))
        _move_into_place(staging, path)
    finally:  # after a failure the half-written directory would only hold disk space
        shutil.rmtree(staging, ignore_errors=True)
    return sizes


def _online_transforms(dllm: DiffusionLM, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Records of the online input transforms (QuaRot, DuQuant) left on the model's modules: module
    name -> record, their tensors added to `tensors` as `<module>.input_transform.<key>` (copies: one
    rotation may serve many modules, and safetensors stores no shared tensors)."""
    records = {}
    for name, module in dllm.model.named_modules():
        transform = input_transform_of(module)
        if transform is None:
            continue
        records[name], parts = transform_record(transform)
        tensors.update({f"{name}.{CHILD_NAME}.{key}": t.detach().cpu().clone() for key, t in parts.items()})
    return records


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`; a previous `path` is deleted only once the new one is in place."""
    if not path.exists():
        os.replace(staging, path)
        return
    previous = Path(tempfile.mkdtemp(prefix=".previous_", dir=path.parent))
    os.replace(path, previous)  # onto the empty directory just made
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(previous, path)
        raise
    shutil.rmtree(previous)


def _quantization_config(
    dllm: DiffusionLM, packed: dict, state: dict[str, torch.Tensor], replaced: set[str], quantization: dict
) -> dict[str, Any]:
    """`quantization_config`: the packed format (read by the loaders) and the caller's provenance."""
    layout = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": {name: fmt.to_json() for name, (fmt, _) in packed.items()},
        # shapes and dtypes of every packed tensor: transformers allocates them before loading
        "tensors": {
            name: {
                key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for key, t in parts.items()
            }
            for name, (_, parts) in packed.items()
        },
        "modules_to_not_convert": sorted({k.rsplit(".", 1)[0] for k in state if k not in replaced}),
        "dtype": str(dllm.dtype).removeprefix("torch."),
    }
    clash = sorted(set(quantization) & set(layout))
    if clash:
        raise PackedFormatError(
            f"quantization provenance keys {clash} would overwrite the packed format's own; rename them"
        )
    return {**layout, **quantization}


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path) -> dict[str, Any]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            shard,
            str(directory / name),
            metadata={"format": "pt", "qdllm_format_version": str(FORMAT_VERSION)},
        )
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def _model_config(dllm: DiffusionLM) -> dict[str, Any]:
    config = dllm.model.config.to_dict()
    config.update(mask_token_id=dllm.mask_token_id, qdllm_family=dllm.family)
    return config


def size_breakdown(tensors: dict[str, torch.Tensor], packed: dict) -> dict[str, int]:
    """Bytes by kind: sign / code bits, scales, order and bit maps, and the unquantized tensors."""
    out = {"signs_or_codes": 0, "scales_and_zeros": 0, "maps": 0, "unquantized": 0}
    packed_prefixes = tuple(f"{name}." for name in packed)
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        leaf = key.rsplit(".", 1)[-1]
        if not key.startswith(packed_prefixes) or leaf == "bias":
            out["unquantized"] += nbytes
        elif leaf in ("bcq_signs", "uq_codes"):
            out["signs_or_codes"] += nbytes
        elif leaf in SCALE_LEAVES:
            out["scales_and_zeros"] += nbytes
        else:
            out["maps"] += nbytes
    out["total"] = sum(out.values())
    return out


def model_card(dllm: DiffusionLM, quantization: dict, sizes: dict[str, int], card: dict[str, Any]) -> str:
    base = card.get("base_model", dllm.name)
    gb = {k: v / 1e9 for k, v in sizes.items()}
    bits = quantization.get("avg_bits_per_weight")
    lines = [
        "---",
        f"base_model: {base}",
        "base_model_relation: quantized",
        "library_name: qdllm",
        "tags: [quantized, 2-bit, diffusion-llm, qdllm]",
        "---",
        "",
        f"# {dllm.name} — {quantization.get('method', 'quantized')} (qdllm packed format v{FORMAT_VERSION})",
        "",
        f"Quantized with qdllm from `{base}` ({dllm.family} family).",
        "",
        f"* method: `{quantization.get('method')}`; group size {quantization.get('group_size')}; "
        f"effective bits per weight (quantized Linears, scales included): {bits}",
        f"* size on disk: {gb['total']:.4f} GB (signs/codes {gb['signs_or_codes']:.4f}, "
        f"scales {gb['scales_and_zeros']:.4f}, unquantized tensors {gb['unquantized']:.4f})",
        f"* calibration: {card.get('calibration', 'see quantization_config')}",
        "",
        "## Evaluation",
        "",
        "| task | metric | value |",
        "|---|---|---|",
        *[
            f"| {task} | {metric} | {value:.4g} |"
            for task, metrics in (card.get("eval") or {}).items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float))
        ],
        "",
        "## Loading",
        "",
        "```python",
        "import qdllm",
        'dllm = qdllm.load_quantized("<this directory>")',
        "```",
        "",
        f"Resolved quantization config: `{json.dumps(card.get('config', quantization))[:2000]}`",
        "",
    ]
    return "\n".join(lines)


def _materialize_rotary(model: torch.nn.Module, device: str) -> None:
    """Non-persistent buffers (rotary inverse frequencies of transformers models) are not in the
    checkpoint and stay on the meta device: rebuild their modules from the model config."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                with torch.device(device):
                    fresh = type(module)(config=model.config)
            except TypeError as exc:
                raise PackedFormatError(f"cannot rebuild the non-persistent buffers of {name}") from exc
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)


def load_quantized(path: str | Path, device: str = "cpu", cache: bool = False) -> DiffusionLM:
    """A packed checkpoint as a `DiffusionLM` whose quantized Linears are `QuantizedLinear`s."""
    from transformers import AutoTokenizer

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PackedFormatError(f"{path} has no config.json; not a qdllm checkpoint")
    raw = json.loads(config_file.read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise PackedFormatError(f"{config_file}: quantization_config.quant_method is not {QUANT_METHOD!r}")
    formats = module_formats(qc)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    model = build_skeleton(raw["qdllm_family"], raw)
    dtype = DTYPES[qc["dtype"]]
    for name, fmt in formats.items():
        linear, kind = model.get_submodule(name), fmt.kind
        parts = {key: tensors.pop(f"{name}.{key}") for key in PACKED_KEYS[kind] if f"{name}.{key}" in tensors}
        missing = set(PACKED_KEYS[kind]) - set(parts)
        if missing:
            raise PackedFormatError(f"{path}: module {name} ({kind}) lacks packed tensors {sorted(missing)}")
        parts.update(
            {key: tensors.pop(f"{name}.{key}") for key in OPTIONAL_KEYS[kind] if f"{name}.{key}" in tensors}
        )
        shape = tuple(int(x) for x in parts["weight_shape"])
        if shape != (linear.out_features, linear.in_features):
            raise PackedFormatError(
                f"{path}: module {name} stores a {shape[0]}x{shape[1]} weight but the config builds "
                f"{linear.out_features}x{linear.in_features}"
            )
        fmt.check(name, parts)
        bias = tensors.pop(f"{name}.bias", None)
        quantized = QuantizedLinear(parts, fmt, dtype, bias, cache)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    for name, record in (qc.get("input_transforms") or {}).items():
        prefix = f"{name}.{CHILD_NAME}."
        parts = {key[len(prefix) :]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
        try:
            transform = transform_from_record(record, parts)
        except (KeyError, ValueError) as exc:
            raise PackedFormatError(f"{path}: input transform of {name}: {exc}") from exc
        attach_input_transform(model.get_submodule(name), transform)
    expected = set(model.state_dict())
    packed_keys = {
        k
        for k in expected
        if k.split(".")[-1] in {*sum(PACKED_KEYS.values(), ()), *sum(OPTIONAL_KEYS.values(), ())}
    }
    packed_keys |= {f"{name}.bias" for name in qc["modules"]}
    missing = sorted(expected - packed_keys - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise PackedFormatError(
            f"{path}: tensors disagree with config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    _materialize_rotary(model, device)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return wrap_model(
        raw["qdllm_family"], model, tokenizer, raw["mask_token_id"], raw.get("name_or_path", path.name)
    )
