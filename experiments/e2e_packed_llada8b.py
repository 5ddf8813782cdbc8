"""End to end on one GPU: a packed LLaDA-8B-shaped model loaded with
`qdllm.load_quantized(..., device="cuda")` runs the LLaDA sampler (gen 256, steps 64, block 32) and a
5-request MC likelihood batch; GPU memory held and tokens/s against the bf16 model in the same run.

The model is a random init with LLaDA-8B's shapes (32 blocks, d 4096, FFN 12288) and its
126,464-token vocabulary (prompts use the byte-level tokenizer's ids, a subset of it). Every block
Linear is packed as DAQ K=2, group 128, with random signs and scales (the kernels' cost does not depend
on the values), so the packed model computes another function than the bf16 one: this measures speed
and memory, not accuracy.

    python experiments/e2e_packed_llada8b.py --out $OUT/e2e_packed_llada8b.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import qdllm
from experiments.bench_packed import GROUP, random_bcq
from qdllm.eval.likelihood import MCSpec, mc_loglikelihoods
from qdllm.eval.sampler import GenSpec, llada_generate
from qdllm.models.base import DiffusionLM
from qdllm.models.llada import LLADA_MASK_ID, LLaDAConfig, LLaDAModelLM
from qdllm.models.registry import _init_like_hf, wrap_model
from qdllm.models.tokenizer import byte_level_tokenizer
from qdllm.packing.checkpoint import save_quantized
from qdllm.packing.format import ModuleFormat

GEN = GenSpec(gen_length=256, steps=64, block_length=32)
MC = MCSpec(estimator="llada", mc_num=32, mc_batch=32)


def bf16_model() -> DiffusionLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LLaDAModelLM(LLaDAConfig())
    _init_like_hf(model)
    model.to(torch.bfloat16).eval().requires_grad_(False)
    return wrap_model("llada", model, byte_level_tokenizer(), LLADA_MASK_ID, "llada8b_shapes")


def packed_layers(dllm: DiffusionLM) -> dict[str, tuple[ModuleFormat, dict]]:
    """Random DAQ K=2 g128 tensors (fp16 scales) for every Linear of the pipeline's stages."""
    gen = torch.Generator().manual_seed(1)
    names = dllm.module_names()
    linears = [blk.get_submodule(n) for blk in dllm.blocks() for stage in dllm.stages for n in stage.linears]
    fmt = ModuleFormat("bcq", GROUP, "float16")
    return {
        names[id(linear)]: (fmt, random_bcq(linear.out_features, linear.in_features, 2, gen, "cpu"))
        for linear in linears
    }


def requests() -> list[tuple[list[int], list[int], int]]:
    """Five (context, target, seed) likelihood requests of byte-level ids."""
    return [(list(range(10 + i, 10 + i + 96)), list(range(100, 100 + 16 + 4 * i)), i) for i in range(5)]


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def workload(dllm: DiffusionLM) -> dict:
    prompt = list(range(32, 96))
    gen = torch.Generator().manual_seed(0)
    llada_generate(dllm, prompt, GenSpec(gen_length=32, steps=2, block_length=32), gen)  # compile, warm
    mc_loglikelihoods(dllm, requests()[:1], MC)
    torch.cuda.reset_peak_memory_stats()
    gen_s, answer = timed(lambda: llada_generate(dllm, prompt, GEN, gen))
    mc_s, scores = timed(lambda: mc_loglikelihoods(dllm, requests(), MC))
    forward_tokens = GEN.steps * (len(prompt) + GEN.gen_length)
    mc_tokens = sum(MC.mc_num * (len(c) + len(t)) for c, t, _ in requests())
    return {
        "sampler_seconds": gen_s,
        "sampler_generated_tokens_per_s": GEN.gen_length / gen_s,
        "sampler_forward_tokens_per_s": forward_tokens / gen_s,
        "mc_seconds": mc_s,
        "mc_forward_tokens_per_s": mc_tokens / mc_s,
        "answer_tokens": len(answer),
        "mc_scores_finite": all(torch.isfinite(torch.tensor(scores)).tolist()),
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/e2e_packed_llada8b_h200.json")
    args = ap.parse_args()
    report = {"device": torch.cuda.get_device_name(), "gen": GEN.__dict__, "mc": MC.__dict__}
    dllm = bf16_model()
    report["bf16"] = {"held_gb": torch.cuda.memory_allocated() / 1e9, **workload(dllm)}
    print(json.dumps(report["bf16"]), flush=True)
    path = Path(tempfile.mkdtemp()) / "packed"
    quantization = {"method": "daq", "group_size": GROUP, "sym": False}
    sizes = save_quantized(dllm, packed_layers(dllm), path, quantization)
    del dllm
    torch.cuda.empty_cache()
    load_s, packed = timed(lambda: qdllm.load_quantized(path, device="cuda"))
    report["packed"] = {
        "load_seconds": load_s,
        "checkpoint_bytes": sizes,
        "held_gb": torch.cuda.memory_allocated() / 1e9,
        **workload(packed),
    }
    print(json.dumps(report["packed"]), flush=True)
    for key in ("sampler_forward_tokens_per_s", "mc_forward_tokens_per_s"):
        report[f"packed_over_bf16_{key}"] = report["packed"][key] / report["bf16"][key]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
