"""ELBO perplexity of a masked diffusion LM on held-out text.

For a window x of L tokens (the first `visible` tokens are never masked, e.g. 1 for shifted
families whose position 0 has no prediction), draw k masked positions uniformly among the
L' = L - visible maskable ones, k stratified over the MC batch. With t = k / L' the masked-diffusion
bound -log p(x) <= E_t[(1/t) sum_masked -log p(x_i | x_t)] (LLaDA eq. 3) becomes, per token,
E_k[(1/k) sum_masked CE_i]: the mean cross-entropy of the masked tokens. Perplexity = exp of its
average over windows; a model with uniform logits scores exactly the vocabulary size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from qdllm.errors import ConfigError
from qdllm.models.base import DiffusionLM


def ppl_windows(
    path: str | Path, field: str, tokenizer, seqlen: int, max_windows: int | None
) -> torch.Tensor:
    """(n, seqlen) int64 consecutive windows of the rows of a JSONL file joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.ppl.path={str(path)!r} does not exist; point it at a JSONL file")
    with path.open() as fh:
        rows = [json.loads(line)[field] for line in fh if line.strip()]
    ids = tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(
            f"eval.ppl.seqlen={seqlen}: {path} has only {len(ids)} tokens; lower eval.ppl.seqlen"
        )
    return torch.tensor(ids[: n * seqlen], dtype=torch.int64).view(n, seqlen)


def stratified_masks(length: int, visible: int, mc_num: int, gen: torch.Generator) -> torch.Tensor:
    """(mc_num, length) bool masks: sample j masks k_j = ceil((j + u_j) / mc_num * L') random
    positions among the last L' = length - visible (u_j ~ U[0, 1)), so k covers 1..L' evenly."""
    maskable = length - visible
    u = torch.rand(mc_num, generator=gen)
    counts = ((torch.arange(mc_num) + u) / mc_num * maskable).ceil().clamp(1, maskable).long()
    ranks = torch.rand(mc_num, maskable, generator=gen).argsort(dim=1).argsort(dim=1)
    masks = torch.zeros(mc_num, length, dtype=torch.bool)
    masks[:, visible:] = ranks < counts[:, None]
    return masks


@torch.no_grad()
def elbo_perplexity(
    dllm: DiffusionLM, windows: torch.Tensor, mc_num: int, seed: int, batch_size: int
) -> dict[str, float]:
    """ELBO perplexity of `windows` (n, L) int64; returns ppl, nll (nats/token) and its stderr.

    Masks depend only on `seed`, so two models (FP and quantized) are scored on identical masks.
    """
    if mc_num < 1:
        raise ConfigError(f"eval.ppl.mc_num={mc_num}: must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    visible = 1 if dllm.shift_logits else 0
    per_window = []
    for window in windows:
        masks = stratified_masks(window.numel(), visible, mc_num, gen)
        total = 0.0
        for chunk in masks.split(batch_size):
            clean = window.expand(chunk.shape[0], -1)
            noisy = torch.where(chunk, dllm.mask_token_id, clean).to(dllm.device)
            logits = dllm.logits(noisy).float()
            ce = F.cross_entropy(logits.transpose(1, 2), clean.to(dllm.device), reduction="none").cpu()
            total += ((ce * chunk).sum(1) / chunk.sum(1)).double().sum().item()
        per_window.append(total / mc_num)
    nll = torch.tensor(per_window, dtype=torch.float64)
    stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    mean = nll.mean().item()
    return {"ppl": math.exp(mean), "nll": mean, "nll_stderr": stderr, "windows": len(nll)}
