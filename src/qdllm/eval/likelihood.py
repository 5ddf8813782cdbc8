"""Monte Carlo log-likelihood of a continuation under a masked diffusion LM (docs/EVALUATION.md).

The masked-diffusion ELBO  log p(y | c) >= E_t[ -(1/t) sum_{i masked} CE_i(y_t) ]  is estimated
with `mc_num` masked copies of the continuation y (the context c is never masked), in rounds of
`mc_batch` rows with the masking level stratified across the rows of a round:

* ``llada`` (exact counts, LLaDA `get_log_likelihood.py`): per round k ~ U{1..Lt}; row r masks
  exactly x_r = ((round(k + r Lt / b) - 1) mod Lt) + 1 random target positions; weight Lt / x_r.
* ``dream`` (Bernoulli, QDLM `dream_base`): per round u ~ U(0,1); row r has t_r = (u + r / b) mod 1,
  p_r = (1 - eps) t_r + eps; every target token is masked with probability p_r; weight 1 / p_r.
  BOS is prepended to the context and EOS appended after the continuation (never masked).

Both row marginals are the ELBO's masking distribution, so the estimate is unbiased for the ELBO.

* ``chain`` (front-to-back chain rule, Fast-dLLM's ``ar_ftb``): not a Monte Carlo
  estimate but the exact log-probability of one decoding order,
  log p(y | c) = sum_i log p(y_i | c, y_<i, [M] at positions >= i), in Lt rows (row i masks the
  targets i..Lt-1 and scores target i alone); BOS/EOS as for ``dream``; `mc_num` is not used.
  It has no Monte Carlo noise, so small models' multiple-choice rankings are not drowned by it.
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

ESTIMATORS = ("llada", "dream", "chain")


@dataclass(frozen=True)
class MCSpec:
    estimator: str = "llada"  # llada (exact counts) | dream (Bernoulli, BOS/EOS) | chain (left to right)
    mc_num: int = 128
    mc_batch: int = 32
    cfg: float = 0.0  # unsupervised classifier-free guidance: prompt fully masked in a second copy
    eps: float = 1e-3  # dream: smallest masking probability
    batch_tokens: int = 16384  # copies of equal-length requests share forwards of up to this many tokens

    def validated(self) -> MCSpec:
        require(self.estimator in ESTIMATORS, "eval.estimator", self.estimator, f"use one of {ESTIMATORS}")
        require(self.mc_num >= 1, "eval.mc_num", self.mc_num, "must be >= 1")
        require(self.mc_batch >= 1, "eval.mc_batch", self.mc_batch, "must be >= 1")
        require(self.cfg >= 0, "eval.cfg", self.cfg, "must be >= 0 (0 disables guidance)")
        require(0 < self.eps < 1, "eval.eps", self.eps, "must lie in (0, 1)")
        require(
            self.batch_tokens >= 0,
            "eval.batch_tokens",
            self.batch_tokens,
            "must be >= 0 (0: one request per forward)",
        )
        return self


def family_estimator(family: str) -> str:
    """LLaDA's exact-count estimator for LLaDA; the Dream recipe for Dream and AR-initialised dLLMs."""
    return "llada" if family == "llada" else "dream"


def resolve_estimator(configured: str, family: str) -> str:
    """`eval.estimator` as run: the configured estimator, or the family's for ``auto``."""
    return family_estimator(family) if configured == "auto" else configured


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


def chain_masks(target_len: int):
    """(Lt, Lt) masks (row i hides targets i..Lt-1), (Lt, Lt) scored positions (row i: target i) and
    (Lt,) weights Lt, so that the mean over rows of the weighted scored CE is the chain's sum."""
    positions = torch.arange(target_len)
    masks = positions[None, :] >= positions[:, None]
    scored = positions[None, :] == positions[:, None]
    return masks, scored, torch.full((target_len,), float(target_len), dtype=torch.float64)


def sequence(dllm: DiffusionLM, context: list[int], target: list[int], estimator: str):
    """(ids, first target position): Dream style (and chain) adds BOS before and EOS after when the
    tokenizer has them."""
    if estimator in ("dream", "chain"):
        bos, eos = dllm.tokenizer.bos_token_id, dllm.tokenizer.eos_token_id
        context = ([bos] if bos is not None else []) + context
        return context + target + ([eos] if eos is not None else []), len(context)
    return context + target, len(context)


@dataclass
class _Rows:
    """One request's masked copies: clean ids (L,), target span [start, start + n), masks, the
    positions whose CE counts (the masked ones, except for ``chain``), weights."""

    clean: torch.Tensor
    start: int
    n: int
    masks: torch.Tensor  # (rows, n) bool
    scored: torch.Tensor  # (rows, n) bool
    weights: torch.Tensor  # (rows,) float64


def _request_rows(dllm: DiffusionLM, context: list[int], target: list[int], spec: MCSpec, seed: int) -> _Rows:
    gen = torch.Generator().manual_seed(seed)
    ids, start = sequence(dllm, context, target, spec.estimator)
    n = len(target)
    if spec.estimator == "llada" and n == 1:  # the only mask hides the one target: exact in one forward
        spec = replace(spec, mc_num=1)
    if spec.estimator == "chain":
        masks, scored, weights = chain_masks(n)
    elif spec.estimator == "llada":
        masks, weights = llada_masks(n, spec.mc_num, spec.mc_batch, gen)
        scored = masks
    else:
        masks, weights = dream_masks(n, spec.mc_num, spec.mc_batch, spec.eps, gen)
        scored = masks
    return _Rows(torch.tensor(ids, dtype=torch.int64), start, n, masks, scored, weights)


@torch.no_grad()
def mc_loglikelihood(
    dllm: DiffusionLM, context: list[int], target: list[int], spec: MCSpec, seed: int
) -> float:
    """Estimate of log p(target | context) (a lower bound, the negative ELBO) in nats."""
    return mc_loglikelihoods(dllm, [(context, target, seed)], spec)[0]


@torch.no_grad()
def mc_loglikelihoods(
    dllm: DiffusionLM, requests: list[tuple[list[int], list[int], int]], spec: MCSpec
) -> list[float]:
    """`mc_loglikelihood` of many (context, target, seed) requests with the same masks as one by one.

    Masked copies of requests whose sequences have the same length share forwards of up to
    max(mc_batch, batch_tokens // length) rows (no padding, so bidirectional attention sees exactly
    the request's tokens); the LM head runs on the union of the rows' target spans. With CFG each
    request runs alone (its guidance copy masks its own prompt).
    """
    rows = [_request_rows(dllm, c, t, spec, s) if t else None for c, t, s in requests]
    totals = [0.0] * len(requests)
    by_length: dict[int, list[int]] = {}
    for index, r in enumerate(rows):
        if r is not None:
            by_length.setdefault(len(r.clean), []).append(index)
    for length, members in by_length.items():
        per_forward = spec.mc_batch if spec.cfg else max(spec.mc_batch, spec.batch_tokens // length)
        pieces = [(i, k) for i in members for k in range(0, len(rows[i].masks), spec.mc_batch)]
        chunk: list[tuple[int, int]] = []
        count = 0
        for i, k in pieces:
            size = min(spec.mc_batch, len(rows[i].masks) - k)
            if chunk and (count + size > per_forward or spec.cfg):
                _score_chunk(dllm, rows, chunk, spec, totals)
                chunk, count = [], 0
            chunk.append((i, k))
            count += size
        if chunk:
            _score_chunk(dllm, rows, chunk, spec, totals)
    return [-totals[i] / len(r.masks) if r is not None else 0.0 for i, r in enumerate(rows)]


def _score_chunk(
    dllm: DiffusionLM, rows: list, chunk: list[tuple[int, int]], spec: MCSpec, totals: list
) -> None:
    """One forward over the masked copies rows[i].masks[k : k + mc_batch] of each (i, k) in `chunk`;
    adds each request's sum of weighted masked cross-entropies to totals[i]."""
    lo = min(rows[i].start for i, _ in chunk)
    hi = max(rows[i].start + rows[i].n for i, _ in chunk)
    noisy, spans = [], []
    for i, k in chunk:
        r = rows[i]
        m = r.masks[k : k + spec.mc_batch]
        copy = r.clean.repeat(m.shape[0], 1)
        copy[:, r.start : r.start + r.n] = torch.where(
            m, dllm.mask_token_id, copy[:, r.start : r.start + r.n]
        )
        noisy.append(copy)
        spans.append((i, k, m))
    batch = torch.cat(noisy)
    prompt_len = rows[chunk[0][0]].start
    logits = guided_logits(dllm, batch, prompt_len, spec.cfg, (lo, hi - lo))
    offset = 0
    for i, k, m in spans:
        r = rows[i]
        scored = r.scored[k : k + spec.mc_batch]
        part = logits[offset : offset + m.shape[0], r.start - lo : r.start - lo + r.n]
        offset += m.shape[0]
        ce = (
            F.cross_entropy(
                part.float().transpose(1, 2),
                r.clean[r.start : r.start + r.n].expand(m.shape[0], -1).to(part.device),
                reduction="none",
            )
            .double()
            .cpu()
        )
        totals[i] += ((ce * scored).sum(1) * r.weights[k : k + spec.mc_batch]).sum().item()


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
