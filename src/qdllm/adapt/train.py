"""Adapt a causal LM into a masked-diffusion LM: LoRA + norms + mask embedding, masked-diffusion loss.

`adapt(cfg)` is driven by `conf/adapt.yaml` (every knob lives there). It resumes from
the last checkpoint in `cfg.out_dir/checkpoint`, writes the loss curve (CSV + PNG) as it goes and
finishes with an adapter directory that `qdllm.models.adapted` merges at load time.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qdllm.adapt.corpus import gutenberg_books, jsonl_texts, random_windows, tokenize_documents
from qdllm.adapt.lora import attach_lora
from qdllm.adapt.objective import diffusion_loss, masked_positions, sample_noise
from qdllm.atomic import write_json_atomic
from qdllm.errors import require
from qdllm.models.adapted import adapter_tensors, base_gguf_path, load_base_model, save_adapter, sha256_file
from qdllm.models.qwen_llama import QwenLlamaDLLM

log = logging.getLogger(__name__)


def base_tokenizer(gguf: Path, special: Any):
    """The base tokenizer with the diffusion roles: document token as BOS/EOS/pad, a reserved mask token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for role in ("bos_token", "eos_token", "pad_token"):
        setattr(tokenizer, role, special.doc_token)
    tokenizer.mask_token = special.mask_token
    require(
        tokenizer.mask_token_id != tokenizer.unk_token_id or special.mask_token == tokenizer.unk_token,
        "adapt.special.mask_token",
        special.mask_token,
        "must be a token of the base vocabulary",
    )
    return tokenizer


def prepare_tokens(cfg: Any, tokenizer) -> dict[str, Path]:
    """Tokenise the train and valid documents once into `cfg.data.cache_dir` (uint16 .npy)."""
    cache = Path(cfg.data.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data.root)
    doc = tokenizer.convert_tokens_to_ids(cfg.special.doc_token)
    out = {}
    for split, shards, jsonl in (
        ("train", cfg.data.train_shards, cfg.data.train_jsonl),
        ("valid", cfg.data.valid_shards, []),
    ):
        path = cache / f"{split}.npy"
        if not path.is_file():

            def docs(shards=shards, jsonl=jsonl):
                yield from gutenberg_books(root, list(shards))
                for file in jsonl:
                    yield from jsonl_texts(root / file)

            tokens = tokenize_documents(docs(), tokenizer, doc, f"tokenise {split}")
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, tokens)
            tmp.replace(path)
        out[split] = path
    return out


def _trainable(model, adapters) -> tuple[list[torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    lora = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    for p in norms.values():
        p.requires_grad_(True)
    return lora, norms


def _lr_factor(step: int, total: int, warmup: int, decay_fraction: float, floor: float) -> float:
    """Warmup, constant, then linear decay to `floor` over the last `decay_fraction` of the steps."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - floor) * (step - decay_start) / max(1, total - decay_start)


def step_loss(
    dllm: QwenLlamaDLLM, weight: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, t: torch.Tensor
):
    """Masked-diffusion loss of one batch; `weight` is the (V, d) tied embedding with the mask row."""
    noisy = ids.masked_fill(mask, dllm.mask_token_id)
    hidden = F.embedding(noisy, weight)
    for block in dllm.blocks():
        hidden = dllm.block_forward(block, hidden)
    rows, cols = masked_positions(mask)
    logits = dllm.model.model.norm(hidden[rows, cols - 1]) @ weight.T  # shifted: i is read from i - 1
    return diffusion_loss(logits, ids[rows, cols], t[rows], ids[:, 1:].numel())


def _save_checkpoint(
    path: Path, params: dict[str, torch.Tensor], optimizer, step: int, gen_state, seconds: float
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(path / "params.tmp"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "step": step, "generator": gen_state, "seconds": seconds},
        path / "state.tmp",
    )
    (path / "params.tmp").replace(path / "params.safetensors")
    (path / "state.tmp").replace(path / "state.pt")


@dataclass
class _Training:
    """The model, its trained tensors and their optimizer in one `adapt` run."""

    dllm: QwenLlamaDLLM
    adapters: dict[str, Any]  # Linear name -> LoRA adapter
    norms: dict[str, torch.nn.Parameter]
    mask_vec: torch.nn.Parameter  # (d,) embedding of the mask token
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # per parameter group, before the schedule
    named: dict[str, torch.nn.Parameter]  # every trained tensor by checkpoint key
    device: torch.device

    def mixed_weight(self) -> torch.Tensor:
        """(V, d) tied embedding with the trained mask row."""
        embedding = self.dllm.model.get_input_embeddings().weight
        index = torch.tensor([self.dllm.mask_token_id], device=self.device)
        return embedding.index_put((index,), self.mask_vec[None].to(embedding.dtype))


def adapt(cfg: Any) -> Path:
    """Train the adapter; return the adapter directory (or `cfg.out_dir` when the time budget
    ran out first: rerun to resume)."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gguf = base_gguf_path(cfg.base, cfg.base.gguf_path)
    tokenizer = base_tokenizer(gguf, cfg.special)
    token_files = prepare_tokens(cfg, tokenizer)
    tokens = {split: np.load(path, mmap_mode="r") for split, path in token_files.items()}
    training = _setup_training(cfg, gguf, tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, earlier_seconds = _resume(out / "checkpoint", training, gen)
    curve_path = out / "loss_curve.csv"
    curve = list(csv.DictReader(curve_path.open())) if start and curve_path.is_file() else []
    curve = [r for r in curve if int(r["step"]) <= start]
    seconds = _train(cfg, training, tokens, gen, start, earlier_seconds, curve, out)
    if seconds is None:
        return out
    _write_curve(curve_path, curve)
    _plot_curve(curve, out / "loss_curve.png")
    summary = _training_summary(cfg, curve, start, seconds)
    adapter_dir = _save_trained_adapter(cfg, training, gguf, tokenizer, summary, out / "adapter")
    write_json_atomic(out / "summary.json", summary)
    return adapter_dir


def _setup_training(cfg: Any, gguf: Path, tokenizer) -> _Training:
    """The frozen base model with LoRA adapters, trainable norms and mask embedding, and AdamW."""
    device = torch.device(cfg.device)
    model = load_base_model(gguf).to(device)
    model.requires_grad_(False)
    dllm = QwenLlamaDLLM(model, tokenizer, tokenizer.mask_token_id, name="adapt")
    adapters = attach_lora(dllm.blocks(), list(cfg.lora.targets), cfg.lora.rank, cfg.lora.alpha, cfg.seed)
    lora, norms = _trainable(model, adapters)
    embedding = model.get_input_embeddings().weight
    mask_vec = torch.nn.Parameter(embedding[tokenizer.mask_token_id].detach().clone())
    optimizer = torch.optim.AdamW(
        [
            {"params": lora, "lr": cfg.optim.lr},
            {"params": [*norms.values(), mask_vec], "lr": cfg.optim.lr_norms},
        ],
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    named = {f"lora.{k}.{p}": getattr(a, f"lora_{p}") for k, a in adapters.items() for p in ("a", "b")}
    named.update({f"norm.{k}": v for k, v in norms.items()})
    named["mask_embedding"] = mask_vec
    return _Training(dllm, adapters, norms, mask_vec, optimizer, base_lrs, named, device)


def _resume(ckpt: Path, training: _Training, gen: torch.Generator) -> tuple[int, float]:
    """Load the last checkpoint into `training` and `gen`; (step, training seconds so far)."""
    if not (ckpt / "state.pt").is_file():
        return 0, 0.0
    saved = load_file(str(ckpt / "params.safetensors"))
    with torch.no_grad():
        for k, p in training.named.items():
            p.copy_(saved[k])
    state = torch.load(ckpt / "state.pt", weights_only=True)
    training.optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    log.info("resumed from step %d", state["step"])
    return state["step"], state.get("seconds", 0.0)


def _train(
    cfg: Any,
    training: _Training,
    tokens: dict[str, np.ndarray],
    gen: torch.Generator,
    start: int,
    earlier_seconds: float,
    curve: list[dict],
    out: Path,
) -> float | None:
    """Steps `start`..`cfg.max_steps`, appending to `curve` and checkpointing on the way; the
    training seconds summed over resumed runs, or None when the time budget stopped it first."""
    began = time.perf_counter()
    bar = tqdm(range(start, cfg.max_steps), desc="adapt", initial=start, total=cfg.max_steps)
    for step in bar:
        row = _train_step(cfg, training, tokens["train"], gen, step)
        last = step + 1 == cfg.max_steps
        if (step + 1) % cfg.eval_every == 0 or last:
            row["valid_loss"] = _valid_loss(cfg, training, tokens["valid"])
            bar.set_postfix(loss=f"{row['loss']:.3f}", valid=f"{row['valid_loss']:.3f}")
        curve.append(row)
        out_of_time = time.perf_counter() - began > cfg.time_budget_s
        if (step + 1) % cfg.checkpoint_every == 0 or last or out_of_time:
            seconds = earlier_seconds + time.perf_counter() - began
            _save_checkpoint(
                out / "checkpoint", training.named, training.optimizer, step + 1, gen.get_state(), seconds
            )
            _write_curve(out / "loss_curve.csv", curve)
        if out_of_time and not last:
            log.warning(
                "adapt.time_budget_s=%s reached at step %d; rerun to resume", cfg.time_budget_s, step + 1
            )
            return None
    return earlier_seconds + time.perf_counter() - began


def _train_step(cfg: Any, training: _Training, train_tokens, gen: torch.Generator, step: int) -> dict:
    """One optimizer step on a fresh batch at the scheduled learning rate; its loss-curve row."""
    optimizer, device = training.optimizer, training.device
    factor = _lr_factor(
        step, cfg.max_steps, cfg.optim.warmup_steps, cfg.optim.decay_fraction, cfg.optim.min_lr_ratio
    )
    for group, lr in zip(optimizer.param_groups, training.base_lrs):
        group["lr"] = lr * factor
    ids = random_windows(train_tokens, cfg.batch_size, cfg.seq_len, training.dllm.tokenizer.bos_token_id, gen)
    mask, t = sample_noise(ids.shape[0], ids.shape[1], cfg.eps, gen)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        loss = step_loss(
            training.dllm, training.mixed_weight(), ids.to(device), mask.to(device), t.to(device)
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(training.named.values()), cfg.optim.grad_clip)
    optimizer.step()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"adapt: loss is {loss.item()} at step {step}; lower adapt.optim.lr")
    return {
        "step": step + 1,
        "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
        "loss": loss.item(),
        "grad_norm": float(grad_norm),
        "lr": optimizer.param_groups[0]["lr"],
        "valid_loss": "",
    }


def _valid_loss(cfg: Any, training: _Training, valid_tokens) -> float:
    """Mean loss over `cfg.valid_batches` batches; the same batches and masks every time."""
    vgen = torch.Generator().manual_seed(cfg.seed + 1)
    device, doc = training.device, training.dllm.tokenizer.bos_token_id
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for _ in range(cfg.valid_batches):
            ids = random_windows(valid_tokens, cfg.batch_size, cfg.seq_len, doc, vgen)
            mask, t = sample_noise(ids.shape[0], ids.shape[1], cfg.eps, vgen)
            loss = step_loss(
                training.dllm, training.mixed_weight(), ids.to(device), mask.to(device), t.to(device)
            )
            total += loss.item()
    return total / cfg.valid_batches


def _save_trained_adapter(
    cfg: Any, training: _Training, gguf: Path, tokenizer, summary: dict[str, Any], adapter_dir: Path
) -> Path:
    lora_pairs = {k: (a.lora_a, a.lora_b) for k, a in training.adapters.items()}
    tensors = adapter_tensors(
        lora_pairs, training.norms, training.mask_vec, getattr(torch, cfg.lora.save_dtype)
    )
    save_adapter(
        adapter_dir,
        tensors,
        {
            "family": "ar_dllm",
            "base": {**dict(cfg.base), "gguf_path": None, "sha256": sha256_file(gguf)},
            "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)},
            "mask_token_id": tokenizer.mask_token_id,
            "doc_token_id": tokenizer.bos_token_id,
            "training": summary,
        },
        tokenizer,
    )
    return adapter_dir


def _training_summary(cfg: Any, curve: list[dict], resumed_from: int, seconds: float) -> dict[str, Any]:
    valid = [r for r in curve if r["valid_loss"] != ""]
    return {
        "steps": cfg.max_steps,
        "tokens": cfg.max_steps * cfg.batch_size * cfg.seq_len,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "train_seconds": round(seconds, 1),  # summed over resumed runs
        "resumed_from_step": resumed_from,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "final_train_loss": float(curve[-1]["loss"]) if curve else None,
        "first_valid_loss": float(valid[0]["valid_loss"]) if valid else None,
        "final_valid_loss": float(valid[-1]["valid_loss"]) if valid else None,
    }


def _write_curve(path: Path, curve: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "tokens", "loss", "grad_norm", "lr", "valid_loss"])
        writer.writeheader()
        writer.writerows(curve)
    tmp.replace(path)


def _plot_curve(curve: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; %s not drawn", path)
        return
    steps = [int(r["step"]) for r in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [float(r["loss"]) for r in curve], lw=0.6, alpha=0.6, label="train (batch)")
    valid = [(int(r["step"]), float(r["valid_loss"])) for r in curve if r["valid_loss"] != ""]
    if valid:
        ax.plot(*zip(*valid), "o-", ms=3, label="valid (fixed masks)")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss (nats / token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
