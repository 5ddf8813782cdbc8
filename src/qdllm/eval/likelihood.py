"""Monte Carlo log-likelihood of a continuation under a masked diffusion LM (evaluation.md §2-3).

The masked-diffusion ELBO  log p(y | c) >= E_t[ -(1/t) sum_{i masked} CE_i(y_t) ]  is estimated
with `mc_num` masked copies of the continuation y (the context c is never masked), in rounds of
`mc_batch` rows with the masking level stratified across the rows of a round:

* ``llada`` (exact counts, LLaDA `get_log_likelihood.py`): per round k ~ U{1..Lt}; row r masks
  exactly x_r = ((round(k + r Lt / b) - 1) mod Lt) + 1 random target positions; weight Lt / x_r.
* ``dream`` (Bernoulli, QDLM `dream_base`): per round u ~ U(0,1); row r has t_r = (u + r / b) mod 1,
  p_r = (1 - eps) t_r + eps; every target token is masked with probability p_r; weight 1 / p_r.
  BOS is prepended to the context and EOS appended after the continuation (never masked).

Both row marginals are the ELBO's masking distribution, so the estimate is unbiased for the ELBO.
All randomness comes from one `torch.Generator` seeded by the caller (`request_seed` derives it from
the request's text), so two models scored with the same seed see identical masks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from qdllm.errors import require
from qdllm.models.base import DiffusionLM

ESTIMATORS = ("llada", "dream")


@dataclass(frozen=True)
class MCSpec:
    estimator: str = "llada"  # llada (exact counts) | dream (Bernoulli, BOS/EOS)
    mc_num: int = 128
    mc_batch: int = 32
    cfg: float = 0.0  # unsupervised classifier-free guidance: prompt fully masked in a second copy
    eps: float = 1e-3  # dream: smallest masking probability

    def validated(self) -> MCSpec:
        require(self.estimator in ESTIMATORS, "eval.estimator", self.estimator, f"use one of {ESTIMATORS}")
        require(self.mc_num >= 1, "eval.mc_num", self.mc_num, "must be >= 1")
        require(self.mc_batch >= 1, "eval.mc_batch", self.mc_batch, "must be >= 1")
        require(self.cfg >= 0, "eval.cfg", self.cfg, "must be >= 0 (0 disables guidance)")
        require(0 < self.eps < 1, "eval.eps", self.eps, "must lie in (0, 1)")
        return self


def family_estimator(family: str) -> str:
    """LLaDA's exact-count estimator for LLaDA; the Dream recipe for Dream and AR-initialised dLLMs."""
    return "llada" if family == "llada" else "dream"


def request_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed from the global seed and the request's text (common random numbers)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def llada_masks(target_len: int, mc_num: int, mc_batch: int, gen: torch.Generator):
    """(mc_num, Lt) bool masks with stratified exact counts and their (mc_num,) weights Lt / x_r."""
    rows = torch.arange(mc_num) % mc_batch
    k = torch.randint(1, target_len + 1, (math.ceil(mc_num / mc_batch),), generator=gen)
    k = k.repeat_interleave(mc_batch)[:mc_num].double()
    counts = (torch.round(k + rows * target_len / mc_batch).long() - 1) % target_len + 1
    ranks = torch.rand(mc_num, target_len, generator=gen).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None], target_len / counts.double()


def dream_masks(target_len: int, mc_num: int, mc_batch: int, eps: float, gen: torch.Generator):
    """(mc_num, Lt) Bernoulli masks with stratified levels p_r and their (mc_num,) weights 1 / p_r."""
    rows = torch.arange(mc_num) % mc_batch
    u = torch.rand(math.ceil(mc_num / mc_batch), generator=gen, dtype=torch.float64)
    t = (u.repeat_interleave(mc_batch)[:mc_num] + rows / mc_batch) % 1.0
    p = (1 - eps) * t + eps
    masks = torch.rand(mc_num, target_len, generator=gen, dtype=torch.float64) < p[:, None]
    return masks, 1.0 / p


def sequence(dllm: DiffusionLM, context: list[int], target: list[int], estimator: str):
    """(ids, first target position): Dream style adds BOS before and EOS after when the tokenizer has them."""
    if estimator == "dream":
        bos, eos = dllm.tokenizer.bos_token_id, dllm.tokenizer.eos_token_id
        context = ([bos] if bos is not None else []) + context
        return context + target + ([eos] if eos is not None else []), len(context)
    return context + target, len(context)


@torch.no_grad()
def mc_loglikelihood(
    dllm: DiffusionLM, context: list[int], target: list[int], spec: MCSpec, seed: int
) -> float:
    """Estimate of log p(target | context) (a lower bound, the negative ELBO) in nats."""
    if not target:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    ids, start = sequence(dllm, context, target, spec.estimator)
    n = len(target)
    if spec.estimator == "llada" and n == 1:  # the only mask hides the one target: exact in one forward
        spec = replace(spec, mc_num=1)
    if spec.estimator == "llada":
        masks, weights = llada_masks(n, spec.mc_num, spec.mc_batch, gen)
    else:
        masks, weights = dream_masks(n, spec.mc_num, spec.mc_batch, spec.eps, gen)
    clean = torch.tensor(ids, dtype=torch.int64)
    total = 0.0
    for rows, w in zip(masks.split(spec.mc_batch), weights.split(spec.mc_batch)):
        noisy = clean.repeat(rows.shape[0], 1)
        noisy[:, start : start + n] = torch.where(rows, dllm.mask_token_id, noisy[:, start : start + n])
        logits = guided_logits(dllm, noisy, start, spec.cfg, (start, n))
        ce = (
            F.cross_entropy(
                logits.float().transpose(1, 2),
                clean[start : start + n].expand(rows.shape[0], -1).to(logits.device),
                reduction="none",
            )
            .double()
            .cpu()
        )
        total += ((ce * rows).sum(1) * w).sum().item()
    return -total / spec.mc_num


def guided_logits(
    dllm: DiffusionLM,
    noisy: torch.Tensor,
    prompt_len: int,
    cfg: float,
    span: tuple[int, int | None] = (0, None),
) -> torch.Tensor:
    """Aligned logits of positions span = (start, length); with cfg > 0, un + (cfg + 1)(cond - un)
    where `un` sees the prompt masked (unsupervised classifier-free guidance)."""
    noisy = noisy.to(dllm.device)
    if cfg == 0:
        return dllm.logits(noisy, *span)
    unconditional = noisy.clone()
    unconditional[:, :prompt_len] = dllm.mask_token_id
    both = dllm.logits(torch.cat([noisy, unconditional]), *span).float()
    cond, un = both.chunk(2)
    return un + (cfg + 1) * (cond - un)
