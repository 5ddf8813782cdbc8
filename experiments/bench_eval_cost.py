"""What evaluation costs on one GPU for LLaDA-8B: forwards timed on a random-init model with the
exact LLaDA-8B architecture (32 blocks, d 4096, vocabulary 126,464, bf16), then projected per task.

Measures (median of `--repeats`, CUDA-synchronised): one MC log-likelihood request
(`mc_loglikelihood`, mc_num 128 in batches of 32) at the token lengths typical of each task, the
mc_num = 1 request of MMLU, and one LLaDA generation (256/256/32). Projects the paper's settings
(full task sizes, mc_num 128; document / choice counts of the full splits, token lengths rough estimates) and
the dev tier used for ablations (limit 500 per task, mc_num 32).

    python experiments/bench_eval_cost.py --out $OUT/bench_eval_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from scale_check_llada8b import random_llada8b

from qdllm.eval.likelihood import MCSpec, mc_loglikelihood
from qdllm.eval.sampler import GenSpec, llada_generate

# task: (documents, choices per document, tokens per forward, shots); tokens per forward are estimates
LIKELIHOOD_TASKS = {
    "mmlu (5-shot, mc_num 1)": (14042, 4, 600, 5),
    "winogrande (5)": (1267, 2, 180, 5),
    "piqa (0)": (1838, 2, 60, 0),
    "arc_challenge (0)": (1172, 4, 60, 0),
    "arc_easy (0)": (2376, 4, 55, 0),
    "hellaswag (0)": (10042, 4, 110, 0),
}
GENERATION_TASKS = {"bbh_zeroshot (256/256/32)": (6511, 150)}  # documents, prompt tokens
DEV_BBH_DOCS = 27 * 20  # the dev tier keeps 20 documents of each BBH subtask


class FullHead:
    """The model with `logits(ids, start, length)` computed over all positions, then sliced."""

    def __init__(self, dllm):
        self.dllm = dllm

    def __getattr__(self, name):
        return getattr(self.dllm, name)

    def logits(self, ids, start=0, length=None):
        out = self.dllm.logits(ids)
        return out[:, start : None if length is None else start + length]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_eval_cost.json")
    args = ap.parse_args()
    dllm = random_llada8b(32, "cuda")
    gen = torch.Generator().manual_seed(0)
    request_s, rows = {}, []
    for task, (docs, choices, length, _) in LIKELIHOOD_TASKS.items():
        mc = MCSpec(
            estimator="llada",
            mc_num=1 if "mc_num 1" in task else 128,
            mc_batch=1 if "mc_num 1" in task else 32,
        )
        target = min(8, length // 4)
        context, continuation = [1] * (length - target), [2] * target
        request_s[task] = timed(partial(mc_loglikelihood, dllm, context, continuation, mc, 0), args.repeats)
        dev_mc = MCSpec("llada", mc_num=mc.mc_num if mc.mc_num == 1 else 32, mc_batch=mc.mc_batch)
        dev_s = timed(partial(mc_loglikelihood, dllm, context, continuation, dev_mc, 0), args.repeats)
        requests = docs * choices
        rows.append(
            {
                "task": task,
                "requests": requests,
                "tokens_per_forward": length,
                "seconds_per_request": request_s[task],
                "requests_per_second": 1 / request_s[task],
                "paper_hours": requests * request_s[task] / 3600,
                "dev_hours_limit500_mc32": min(docs, 500) * choices * dev_s / 3600,
            }
        )
    spec = GenSpec(gen_length=256, steps=256, block_length=32)
    for task, (docs, prompt) in GENERATION_TASKS.items():
        seconds = timed(partial(llada_generate, dllm, [1] * prompt, spec, gen), 1)
        rows.append(
            {
                "task": task,
                "requests": docs,
                "tokens_per_forward": prompt + 256,
                "seconds_per_request": seconds,
                "requests_per_second": 1 / seconds,
                "paper_hours": docs * seconds / 3600,
                "dev_hours_limit500_mc32": DEV_BBH_DOCS * seconds / 3600,
            }
        )
    total = {k: sum(r[k] for r in rows) for k in ("paper_hours", "dev_hours_limit500_mc32")}
    # baseline in the same run: the LM head over every position, then sliced (before the span API)
    context, continuation, mc = [1] * 52, [2] * 8, MCSpec("llada", mc_num=128, mc_batch=32)
    baseline = timed(partial(mc_loglikelihood, FullHead(dllm), context, continuation, mc, 0), args.repeats)
    head_speedup = baseline / request_s["piqa (0)"]
    print(
        f"piqa request with the head on all positions: {baseline:.3f} s ({head_speedup:.2f}x the span head)"
    )
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
        "total": total,
        "piqa_full_head_seconds_per_request": baseline,
        "span_head_speedup": head_speedup,
    }
    for r in rows:
        print(
            f"{r['task']:28s} {r['seconds_per_request']:8.3f} s/req {r['requests_per_second']:7.2f} req/s "
            f"paper {r['paper_hours']:6.2f} h  dev {r['dev_hours_limit500_mc32']:5.2f} h"
        )
    print("total", total)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
