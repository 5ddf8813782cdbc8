"""Diffusion samplers for `generate_until` (docs/EVALUATION.md).

* LLaDA low-confidence remasking (`llada_generate`): the answer canvas is cut into blocks decoded
  left to right; a block's `steps / n_blocks` steps each commit the most confident masked positions
  of that block (floor(m / s) per step, one more in the first m mod s steps).
* Dream entropy sampler (`dream_generate`): timesteps linspace(1, eps, steps + 1); step i commits
  int(n_masked (1 - s / t)) positions (all remaining at the last step), lowest entropy first.

Temperature 0 is greedy; otherwise Gumbel-max sampling in float64 from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdllm.errors import require
from qdllm.eval.likelihood import guided_logits, request_seed
from qdllm.models.base import DiffusionLM

DREAM_ALGS = ("entropy", "maskgit_plus", "topk_margin")


@dataclass(frozen=True)
class GenSpec:
    gen_length: int = 256
    steps: int = 256
    block_length: int = 32  # llada
    temperature: float = 0.0
    cfg: float = 0.0  # llada
    remasking: str = "low_confidence"  # llada: low_confidence | random
    alg: str = "entropy"  # dream: entropy | maskgit_plus | topk_margin
    eps: float = 1e-3  # dream

    def validated(self) -> GenSpec:
        require(self.gen_length >= 1, "eval.gen.gen_length", self.gen_length, "must be >= 1")
        require(
            self.gen_length % self.block_length == 0,
            "eval.gen.block_length",
            self.block_length,
            f"must divide eval.gen.gen_length={self.gen_length}",
        )
        blocks = self.gen_length // self.block_length
        require(
            self.steps >= blocks and self.steps % blocks == 0,
            "eval.gen.steps",
            self.steps,
            f"must be a multiple of the {blocks} blocks (gen_length / block_length)",
        )
        require(
            self.remasking in ("low_confidence", "random"),
            "eval.gen.remasking",
            self.remasking,
            "use low_confidence or random",
        )
        require(self.alg in DREAM_ALGS, "eval.gen.alg", self.alg, f"use one of {DREAM_ALGS}")
        return self


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    uniform = torch.rand(logits.shape, generator=gen, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def commit_schedule(masked: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps for `masked` positions (LLaDA's even split)."""
    return [masked // steps + (1 if i < masked % steps else 0) for i in range(steps)]


@torch.no_grad()
def llada_generate(dllm: DiffusionLM, prompt: list[int], spec: GenSpec, gen: torch.Generator) -> list[int]:
    """Answer token ids (gen_length of them, every mask filled) for `prompt`."""
    spec = spec.validated()
    start = len(prompt)
    x = torch.tensor([prompt + [dllm.mask_token_id] * spec.gen_length], device=dllm.device)
    blocks = spec.gen_length // spec.block_length
    for b in range(blocks):
        end = start + (b + 1) * spec.block_length
        for n_commit in commit_schedule(spec.block_length, spec.steps // blocks):
            masked = x[0] == dllm.mask_token_id
            logits = guided_logits(dllm, x, start, spec.cfg)[0].float()
            x0 = _pick(logits, spec.temperature, gen)
            if spec.remasking == "random":
                confidence = torch.rand(x.shape[1], generator=gen).to(logits.device)
            else:
                confidence = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
            confidence[end:] = -torch.inf
            confidence[~masked] = -torch.inf
            chosen = confidence.topk(n_commit).indices
            x[0, chosen] = x0[chosen]
    return x[0, start:].tolist()


@torch.no_grad()
def dream_generate(dllm: DiffusionLM, prompt: list[int], spec: GenSpec, gen: torch.Generator) -> list[int]:
    """Answer token ids (gen_length of them, every mask filled) for `prompt`."""
    spec = spec.validated()
    start = len(prompt)
    x = torch.tensor([prompt + [dllm.mask_token_id] * spec.gen_length], device=dllm.device)
    timesteps = torch.linspace(1, spec.eps, spec.steps + 1, dtype=torch.float64)
    for i in range(spec.steps):
        masked = (x[0] == dllm.mask_token_id).nonzero()[:, 0]
        if masked.numel() == 0:
            break
        logits = dllm.logits(x)[0, masked].float()
        x0 = _pick(logits, spec.temperature, gen)
        probs = torch.softmax(logits, -1)
        if spec.alg == "entropy":
            confidence = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # negative entropy
        elif spec.alg == "maskgit_plus":
            confidence = probs.gather(-1, x0[:, None])[:, 0]
        else:
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
        t, s = timesteps[i].item(), timesteps[i + 1].item()
        n_commit = masked.numel() if i == spec.steps - 1 else int(masked.numel() * (1 - s / t))
        chosen = confidence.topk(n_commit).indices
        x[0, masked[chosen]] = x0[chosen]
    return x[0, start:].tolist()


def complete(dllm: DiffusionLM, prompt: list[int], spec: GenSpec, seed: int) -> str:
    """The decoded answer (special tokens dropped) to `prompt` ids, sampled from a generator seeded
    with `seed` (callers derive it from the request: common random numbers across models)."""
    answer = generate(dllm, prompt, spec, torch.Generator().manual_seed(seed))
    return dllm.tokenizer.decode(answer, skip_special_tokens=True)


def answer(dllm: DiffusionLM, prompt: str, spec: GenSpec, seed: int) -> str:
    """`complete` for a text prompt, seeded from the global `seed` and the prompt itself."""
    ids = dllm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return complete(dllm, ids, spec, request_seed(seed, prompt))


def generate(dllm: DiffusionLM, prompt: list[int], spec: GenSpec, gen: torch.Generator) -> list[int]:
    """The family's sampler: LLaDA's low-confidence remasking, Dream's (and AR-initialised
    dLLMs') entropy-ordered sampler."""
    sample = llada_generate if dllm.family == "llada" else dream_generate
    return sample(dllm, prompt, spec, gen)
