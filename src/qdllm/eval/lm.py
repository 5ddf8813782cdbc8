"""lm-eval `LM` for diffusion LMs: Monte Carlo likelihoods and diffusion sampling.

From Python: ``lm_eval.simple_evaluate(model=DiffusionEvalLM(dllm, ...), tasks=[...])``. From
lm-eval's command line: ``python -m qdllm.eval run --model qdllm --model_args
family=llada,source=GSAI-ML/LLaDA-8B-Base,dtype=bfloat16,device=cuda --tasks piqa`` (the module
registers the model name ``qdllm`` and hands over to lm-eval's CLI).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from qdllm.eval.likelihood import MCSpec, family_estimator, mc_loglikelihood, mc_loglikelihoods, request_seed
from qdllm.eval.sampler import GenSpec, complete
from qdllm.models.base import DiffusionLM
from qdllm.models.registry import ModelSpec, load_dllm

REQUESTS_PER_CALL = 256  # requests scored together (progress granularity)
MODEL_FIELDS = {f for f in ModelSpec.__dataclass_fields__ if f not in ("tiny", "recipe")}


@register_model("qdllm")
class DiffusionEvalLM(TemplateLM):
    """Wraps one (FP or fake-quantized) `DiffusionLM`.

    Args:
        dllm: the model, already on its device.
        mc: Monte Carlo likelihood settings; `estimator` follows the family unless given
            (llada -> exact counts, dream / ar_dllm -> Bernoulli with BOS/EOS).
        gen: sampler settings for `generate_until` (`gen_length` is capped by `max_gen_toks`).
        seed: global seed of the per-request generators (common random numbers).
        max_length: contexts are truncated from the left to fit `max_length` with the target.
    """

    def __init__(
        self,
        dllm: DiffusionLM,
        mc: MCSpec | None = None,
        gen: GenSpec | None = None,
        seed: int = 1234,
        max_length: int = 4096,
    ):
        super().__init__()
        self.dllm = dllm
        self.tokenizer = dllm.tokenizer
        self.mc = (mc or MCSpec(estimator=family_estimator(dllm.family))).validated()
        self.gen = (gen or GenSpec()).validated()
        self.seed = seed
        self.max_length = max_length
        self.requests_done = 0

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> DiffusionEvalLM:
        """`family=llada,source=...,dtype=bfloat16,device=cuda,mc_num=128,mc_batch=32,seed=1234`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> DiffusionEvalLM:
        """Model fields (`ModelSpec`, e.g. `device=cuda`), MC fields (`MCSpec`), sampler fields
        (`GenSpec`), `seed`, `max_length`. lm-eval's own `--device` / `--batch_size` are not used:
        the device is a model field and the MC batch is `mc_batch`."""
        args: dict[str, Any] = dict(arg_dict)
        model = {k: args.pop(k) for k in list(args) if k in MODEL_FIELDS}
        mc = {k: args.pop(k) for k in list(args) if k in MCSpec.__dataclass_fields__}
        gen = {k: args.pop(k) for k in list(args) if k in GenSpec.__dataclass_fields__}
        dllm = load_dllm(model)
        return cls(dllm, MCSpec(**{"estimator": family_estimator(dllm.family), **mc}), GenSpec(**gen), **args)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self.dllm.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        items = []
        for (context, continuation), context_ids, target_ids in requests:
            target_ids = target_ids[-self.max_length :]
            context_ids = (
                context_ids[-(self.max_length - len(target_ids)) :]
                if self.max_length > len(target_ids)
                else []
            )
            items.append((context_ids, target_ids, request_seed(self.seed, context, continuation)))
        # equal lengths next to each other, so their masked copies share forwards
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
        scores: list[float] = [0.0] * len(items)
        for begin in tqdm(
            range(0, len(order), REQUESTS_PER_CALL),
            desc="MC log-likelihood",
            disable=disable_tqdm,
            unit_scale=REQUESTS_PER_CALL,
            unit="req",
        ):
            chunk = order[begin : begin + REQUESTS_PER_CALL]
            for i, score in zip(chunk, mc_loglikelihoods(self.dllm, [items[i] for i in chunk], self.mc)):
                scores[i] = score
            self.requests_done += len(chunk)
        return [(score, False) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ELBO of each whole text, window by window of `max_length - 1` tokens after the prefix token."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="MC rolling", disable=disable_tqdm):
            ids, total, size = self.tok_encode(text), 0.0, self.max_length - 1
            for start in range(0, len(ids), size):
                window = ids[start : start + size]
                seed = request_seed(self.seed, text, str(start))
                total += mc_loglikelihood(self.dllm, [self.prefix_token_id], window, self.mc, seed)
            out.append(total)
            self.requests_done += 1
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], desc="diffusion generate", disable=disable_tqdm
        ):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = min(self.gen.gen_length, int(gen_kwargs.get("max_gen_toks", self.gen.gen_length)))
            spec = _fit(self.gen, length)
            prompt = self.tok_encode(context)[-(self.max_length - spec.gen_length) :]
            text = complete(self.dllm, prompt, spec, request_seed(self.seed, context))
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self.requests_done += 1
        return out


def _fit(spec: GenSpec, length: int) -> GenSpec:
    """The sampler settings for a request allowed `length` new tokens: gen_length shrinks to a whole
    number of blocks, steps keep their ratio to gen_length."""
    from dataclasses import replace

    if length >= spec.gen_length:
        return spec
    block = min(spec.block_length, length)
    gen_length = max(block, length // block * block)
    blocks = gen_length // block
    steps_per_block = max(1, spec.steps * block // spec.gen_length)
    return replace(spec, gen_length=gen_length, block_length=block, steps=blocks * steps_per_block)
