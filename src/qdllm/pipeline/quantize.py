"""Quantize every block of a `DiffusionLM` stage by stage on cached calibration states (paper §3.5).

For block b and each stage (qkv -> attn_out -> ff_in -> ff_out): accumulate S once per shared input
from the partially quantized block, quantize each Linear of the stage with `quantize_weight`, write
the result back (later stages see quantized upstream modules); then propagate the cached states
through the quantized block, overwriting them (one copy of the cache). After each block its
quantized weights and metrics are written atomically to `checkpoint_dir`; a restarted run reloads
the finished blocks, recomputes the cache through them and continues, giving identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qdllm.atomic import write_json_atomic
from qdllm.errors import require
from qdllm.models.base import DiffusionLM
from qdllm.models.fingerprint import weights_digest
from qdllm.packing.format import ModuleFormat
from qdllm.packing.linear import pack_result
from qdllm.pipeline.stats import asymmetric_moments, second_moments, stage_input_sample
from qdllm.quant import QuantSpec, quantize_weight
from qdllm.quant.abmp import allocate_orders, group_scores
from qdllm.quant.groups import group_sizes
from qdllm.quant.hessian import factorize
from qdllm.quant.importance import importance
from qdllm.quant.methods import QuantMethod, get_method

CACHE_DEVICES = ("model", "cpu", "disk")


@dataclass
class PipelineSpec:
    batch_size: int = 8  # calibration states per forward chunk
    cache_device: str = "model"  # model (the compute device) | cpu | disk (safetensors in cache_dir)
    cache_dir: str | None = None  # cache_device=disk: parent of its private folders (temp when None)
    exec_device: str | None = None  # e.g. cuda: blocks visit it one at a time, weights stay where loaded
    checkpoint_dir: str | None = None  # per-block checkpoints; resume when it holds finished blocks
    progress: bool = True
    allow_tf32: bool = False  # TF32 matmuls (fp32 accumulation) for S on CUDA
    pack: bool = False  # also keep every Linear's packed tensors (report.packed) for a packed checkpoint

    def validated(self) -> PipelineSpec:
        """Check every field; errors name the Hydra key (`pipeline.<field>`)."""
        require(self.batch_size >= 1, "pipeline.batch_size", self.batch_size, "must be >= 1")
        require(
            self.cache_device in CACHE_DEVICES,
            "pipeline.cache_device",
            self.cache_device,
            f"use one of {CACHE_DEVICES}",
        )
        return self


@dataclass
class PipelineReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    blocks_resumed: int = 0
    # full module name -> (format, packed tensors on CPU), with PipelineSpec.pack
    packed: dict[str, tuple[ModuleFormat, dict[str, torch.Tensor]]] = field(default_factory=dict)


class HiddenCache:
    """Hidden states (B, L, d) of every calibration chunk: one copy, on a device or on disk.

    On disk the chunks live in a private folder made inside `parent` (the system's temporary
    folder when None); `close` removes it. Use it as a context manager so the folder goes when
    the run ends, also when it fails: at paper settings one copy is tens of GiB.
    """

    def __init__(self, kind: str, device: torch.device, parent: str | None):
        self.kind, self.device, self.chunks = kind, device, []
        self.directory = None
        if kind == "disk":
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="qdllm_cache_", dir=parent))

    def __enter__(self) -> HiddenCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Drop every chunk; on disk, remove the private folder and its files."""
        self.chunks = []
        if self.directory is not None:
            shutil.rmtree(self.directory)
            self.directory = None

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.kind == "disk":
            return load_file(str(self.chunks[index]))["hidden"]
        return self.chunks[index]

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        if self.kind == "disk":
            path = self.directory / f"chunk_{index:06d}.safetensors"
            save_file({"hidden": value.detach().contiguous().cpu()}, str(path))
            value = path
        if index == len(self.chunks):
            self.chunks.append(value)
        else:
            self.chunks[index] = value

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def device_clock(device: torch.device) -> float:
    """Wall clock after the device finished queued work, so stage timings are attributed right."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _fingerprint(quant: QuantSpec, states: torch.Tensor, dllm: DiffusionLM, pack: bool) -> str:
    h = hashlib.sha256(json.dumps(asdict(quant), sort_keys=True).encode())
    h.update(f"{dllm.family}/pack={pack}".encode())
    h.update(weights_digest(dllm.model).encode())  # the same config on other weights must not resume
    h.update(states.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class _Run:
    """What the steps of one `quantize_model` call share."""

    dllm: DiffusionLM
    quant: QuantSpec
    method: QuantMethod
    spec: PipelineSpec
    home: torch.device  # where the model's weights live
    device: torch.device  # where blocks execute
    cache: HiddenCache  # inputs of the current block in the partially quantized model
    fp_cache: HiddenCache | None  # the same in the FP model, for methods that need the cross moment
    ckpt: Path | None
    report: PipelineReport
    timing: dict[str, float]

    @property
    def offload(self) -> bool:
        return self.device != self.home


@torch.no_grad()
def quantize_model(
    dllm: DiffusionLM, states: torch.Tensor, quant_cfg: Any, spec: PipelineSpec | None = None
) -> PipelineReport:
    """Fake-quantize `dllm` in place on calibration `states` (M, L) int64; returns metrics."""
    spec = (spec or PipelineSpec()).validated()
    quant = QuantSpec.from_any(quant_cfg)
    method = get_method(quant.method)
    report = PipelineReport()
    if not method.quantizes:
        return report
    home = dllm.device
    device = torch.device(spec.exec_device) if spec.exec_device else home
    move_shared_modules(dllm, home, device)
    timing: dict[str, float] = defaultdict(float)
    with contextlib.ExitStack() as caches:  # the caches are closed (disk: removed) however the run ends
        cache = caches.enter_context(new_cache(spec, device))
        embed_states(dllm, states, spec, cache, device, timing)
        fp_cache = None
        if method.needs_cross_moment:
            # GPTAQ fits each Linear to the FP model's output on FP inputs: a second cache carries the
            # FP trajectory through the unquantized blocks (the only method that needs two copies)
            fp_cache = caches.enter_context(HiddenCache(cache.kind, cache.device, spec.cache_dir))
            for i, chunk in enumerate(cache):
                fp_cache[i] = chunk.clone()
        ckpt = _open_checkpoint_dir(spec, quant, states, dllm)
        run = _Run(dllm, quant, method, spec, home, device, cache, fp_cache, ckpt, report, timing)
        bar = tqdm(range(len(dllm.blocks())), desc="quantize blocks", disable=not spec.progress)
        for b in bar:
            _process_block(run, b, bar)
    move_shared_modules(dllm, device, home)
    report.timing = dict(timing)
    return report


def move_shared_modules(dllm: DiffusionLM, source: torch.device, target: torch.device) -> None:
    """Embeddings, final norm and head follow the blocks to the execution device and back."""
    if source != target:
        for module in dllm.shared_modules():
            module.to(target)


def new_cache(spec: PipelineSpec, device: torch.device) -> HiddenCache:
    return HiddenCache(
        "disk" if spec.cache_device == "disk" else "memory",
        device if spec.cache_device == "model" else torch.device("cpu"),
        spec.cache_dir,
    )


def embed_states(
    dllm: DiffusionLM,
    states: torch.Tensor,
    spec: PipelineSpec,
    cache: HiddenCache,
    device: torch.device,
    timing: dict[str, float],
) -> None:
    """The embedded calibration states (M, L, d), chunk by chunk, into `cache`."""
    start = device_clock(device)
    for i, batch in enumerate(states.split(spec.batch_size)):
        cache[i] = dllm.embed(batch.to(device)).to(cache.device)
    timing["embed"] += device_clock(device) - start


def _open_checkpoint_dir(
    spec: PipelineSpec, quant: QuantSpec, states: torch.Tensor, dllm: DiffusionLM
) -> Path | None:
    """The per-block checkpoint directory, refused when it holds another run's blocks."""
    if not spec.checkpoint_dir:
        return None
    ckpt = Path(spec.checkpoint_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(quant, states, dllm, spec.pack)
    manifest = ckpt / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["fingerprint"] != fingerprint:
        raise RuntimeError(
            f"pipeline.checkpoint_dir={ckpt} holds a run with another config or calibration set; "
            "use a fresh directory"
        )
    write_json_atomic(manifest, {"fingerprint": fingerprint})
    return ckpt


def _process_block(run: _Run, b: int, bar) -> None:
    """Quantize block b (or reload it from its checkpoint), then carry the caches through it."""
    block = run.dllm.blocks()[b]
    if run.offload:
        block.to(run.device)
    fp_block = copy.deepcopy(block) if run.fp_cache is not None else None  # before any write-back
    if run.ckpt is not None and (run.ckpt / f"block_{b:04d}.json").exists():
        _resume_block(run, block, b)
    else:
        _quantize_block(run, block, fp_block, b, bar)
    _propagate(run, block, fp_block)
    if run.offload:
        block.to(run.home)


def _resume_block(run: _Run, block, b: int) -> None:
    _load_block(block, run.ckpt, b)
    run.report.packed.update(_load_packed(run.ckpt, b))
    run.report.layers.extend(json.loads((run.ckpt / f"block_{b:04d}.json").read_text()))
    run.report.blocks_resumed += 1


def _quantize_block(run: _Run, block, fp_block, b: int, bar) -> None:
    """Quantize the stages of one block in order; checkpoint the block when it is done."""
    quant = run.quant
    block_scope_abmp = run.method.supports_abmp and quant.abmp_ratio > 0 and quant.abmp_scope == "block"
    orders = (
        _block_orders(run.dllm, block, run.cache, quant, run.device, partial(run.dllm.block_forward, block))
        if block_scope_abmp
        else {}  # other methods keep one width for every group
    )
    rows: list[dict[str, Any]] = []
    packed: dict[str, tuple[ModuleFormat, dict[str, torch.Tensor]]] = {}
    for stage in run.dllm.stages:
        bar.set_postfix_str(stage.name)
        _quantize_stage(run, block, fp_block, stage, orders, b, rows, packed)
    if run.ckpt is not None:
        _save_block(block, run.dllm, run.ckpt, b, rows, packed)
    run.report.layers.extend(rows)
    run.report.packed.update(packed)


def _quantize_stage(
    run: _Run, block, fp_block, stage, orders: dict, b: int, rows: list, packed: dict
) -> None:
    """Statistics of the stage's shared input, then every Linear of the stage, written back."""
    modules = [block.get_submodule(n) for n in stage.linears]
    t0 = device_clock(run.device)
    s, cross, sample = _stage_statistics(run, block, fp_block, stage, modules[0])
    run.timing[f"stats/{stage.name}"] += device_clock(run.device) - t0
    names = run.dllm.module_names()
    for name, module in zip(stage.linears, modules, strict=True):
        t0 = device_clock(run.device)
        result = quantize_weight(
            module.weight,
            s,
            run.quant,
            orders=orders.get(name),
            cross_moment=cross,
            inputs=sample,
            return_state=run.spec.pack,
        )
        module.weight.copy_(result.weight)
        if run.spec.pack:
            fmt, tensors = pack_result(result, run.quant, tuple(module.weight.shape))
            packed[names[id(module)]] = (fmt, {k: v.cpu() for k, v in tensors.items()})
        run.timing[f"quant/{stage.name}"] += device_clock(run.device) - t0
        rows.append(_row(b, stage.name, name, module, result))


def _stage_statistics(run: _Run, block, fp_block, stage, first) -> tuple:
    """S (C, C) of the stage input in the partially quantized model; with an FP block also
    GPTAQ's cross moment D (C, C); for methods that need them, a raw input sample (n, C)."""
    dllm, device, tf32 = run.dllm, run.device, run.spec.allow_tf32
    run_block = partial(dllm.block_forward, block)
    cross, sample = None, None
    if fp_block is None:
        (s,) = second_moments(run_block, [first], run.cache, device, allow_tf32=tf32)
    else:
        s, cross = asymmetric_moments(
            run_block,
            partial(dllm.block_forward, fp_block),
            first,
            fp_block.get_submodule(stage.linears[0]),
            run.cache,
            run.fp_cache,
            device,
            allow_tf32=tf32,
        )
    if run.method.needs_inputs:
        sample = stage_input_sample(run_block, first, run.cache, device, run.method.input_rows(run.quant))
    return s, cross, sample


def _propagate(run: _Run, block, fp_block) -> None:
    """Overwrite the caches with the block's outputs: the quantized block, and the FP one."""
    t0 = device_clock(run.device)
    for i, chunk in enumerate(run.cache):
        run.cache[i] = run.dllm.block_forward(block, chunk.to(run.device)).to(run.cache.device)
    if fp_block is not None:
        for i, chunk in enumerate(run.fp_cache):
            run.fp_cache[i] = run.dllm.block_forward(fp_block, chunk.to(run.device)).to(run.fp_cache.device)
    run.timing["propagate"] += device_clock(run.device) - t0


def _block_orders(dllm, block, chunks, quant: QuantSpec, device, run_block) -> dict[str, torch.Tensor]:
    """ABMP with block scope: rank the groups of all Linears of the block together (FP statistics)."""
    firsts = [block.get_submodule(stage.linears[0]) for stage in dllm.stages]
    moments = second_moments(run_block, firsts, chunks, device, stop_early=False)
    names, scores, sizes = [], [], []
    for stage, s in zip(dllm.stages, moments, strict=True):
        factors = factorize(s, quant.damp, quant.damp_max_tries)
        for name in stage.linears:
            w = block.get_submodule(name).weight.to(torch.float32)
            gsize = quant.effective_group_size(w.shape[1])
            names.append(name)
            scores.append(group_scores(importance(w, factors, quant.z_mode), gsize, reduce="mean"))
            sizes.append(group_sizes(w.shape[0], w.shape[1], gsize))
    return dict(zip(names, allocate_orders(scores, sizes, quant.abmp_ratio, quant.order), strict=True))


def _row(block: int, stage: str, name: str, module, result) -> dict[str, Any]:
    hist = torch.bincount(result.orders).tolist()
    return {
        "block": block,
        "stage": stage,
        "name": name,
        "rows": module.weight.shape[0],
        "cols": module.weight.shape[1],
        "orders_hist": json.dumps({k: n for k, n in enumerate(hist) if n}),
        "orders": json.dumps(result.orders.tolist()),
        "group_size": result.group_size,
        "bits_per_weight": result.bits_per_weight,
        "weight_error": result.weight_error,
        "proxy_error": result.proxy_error,
        "outlier_fraction": result.outlier_fraction,
        "damp": result.damp,
        "dead_channels": result.dead_channels,
        "seconds": result.seconds,
    }


def _linear_names(dllm: DiffusionLM) -> list[str]:
    return [n for stage in dllm.stages for n in stage.linears]


def _save_block(block, dllm, ckpt: Path, b: int, rows: list[dict], packed: dict) -> None:
    tensors = {n: block.get_submodule(n).weight.detach().contiguous().cpu() for n in _linear_names(dllm)}
    tmp = ckpt / f"block_{b:04d}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, ckpt / f"block_{b:04d}.safetensors")
    if packed:
        flat = {f"{name}/{key}": t.contiguous() for name, (_, ts) in packed.items() for key, t in ts.items()}
        formats = {name: fmt.to_json() for name, (fmt, _) in packed.items()}
        tmp = ckpt / f"block_{b:04d}.packed.safetensors.tmp"
        save_file(flat, str(tmp), metadata={"formats": json.dumps(formats)})
        os.replace(tmp, ckpt / f"block_{b:04d}.packed.safetensors")
    write_json_atomic(ckpt / f"block_{b:04d}.json", rows)  # written last: marks the block finished


def _load_packed(ckpt: Path, b: int) -> dict[str, tuple[ModuleFormat, dict[str, torch.Tensor]]]:
    path = ckpt / f"block_{b:04d}.packed.safetensors"
    if not path.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        if "formats" not in metadata:
            raise RuntimeError(
                f"{path} was written by an older qdllm that did not record each module's packed format; "
                "re-run with a fresh pipeline.checkpoint_dir"
            )
        formats = json.loads(metadata["formats"])
        out: dict[str, tuple[ModuleFormat, dict[str, torch.Tensor]]] = {
            name: (ModuleFormat.from_json(name, raw), {}) for name, raw in formats.items()
        }
        for key in fh.keys():
            name, tensor = key.rsplit("/", 1)
            out[name][1][tensor] = fh.get_tensor(key)
    return out


def _load_block(block, ckpt: Path, b: int) -> None:
    for name, tensor in load_file(str(ckpt / f"block_{b:04d}.safetensors")).items():
        target = block.get_submodule(name).weight
        target.copy_(tensor.to(target.device, target.dtype))
