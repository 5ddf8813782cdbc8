"""Scale check: a random-init model with LLaDA-8B's exact shapes through the whole pipeline (GPU).

Reduced calibration (default 32 x 2048 tokens, T = 4, stratified), DAQ K=2 + diag compensation +
ABMP 5 %. Reports seconds per block by stage, peak GPU memory and a projection to the paper's
settings (128 x 4096, T = 20, full: 160x the tokens; statistics and propagation scale with tokens,
attention additionally with L, the quantizer itself does not).

    python experiments/scale_check_llada8b.py --blocks 32 --out scale.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qdllm.calib import MCSSpec, mcs_states
from qdllm.models.llada import LLaDA, LLaDAConfig, LLaDAModelLM
from qdllm.pipeline import PipelineSpec, quantize_model


def random_llada8b(n_layers: int, device: str) -> LLaDA:
    cfg = LLaDAConfig(n_layers=n_layers)
    with torch.device("meta"):
        model = LLaDAModelLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
    model.eval().requires_grad_(False)
    return LLaDA(model, None, cfg.mask_token_id, shift_logits=False, name="llada8b-random")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls for the S accumulation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dllm = random_llada8b(args.blocks, "cuda")
    tokens = torch.randint(
        0, 126000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1)
    )
    states, _ = mcs_states(tokens, dllm.mask_token_id, MCSSpec(timesteps=args.timesteps, mode="stratified"))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = quantize_model(
        dllm,
        states,
        {"method": "daq", "order": 2, "abmp_ratio": 0.05, "compensation": "diag"},
        PipelineSpec(batch_size=args.batch_size, cache_device="model", allow_tf32=args.tf32),
    )
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30

    tokens_now = states.numel()
    tokens_paper = 128 * 20 * 4096
    ratio = tokens_paper / tokens_now
    data_bound = sum(v for k, v in report.timing.items() if not k.startswith("quant/"))
    quant_time = sum(v for k, v in report.timing.items() if k.startswith("quant/"))
    scale32 = 32 / args.blocks
    # per token and block: 2 x 218.1 M Linear FLOPs + 4 L d attention FLOPs (QK^T and AV)
    linear_flops, d_model = 2 * 218.1e6, 4096
    attn_factor = (linear_flops + 4 * 4096 * d_model) / (linear_flops + 4 * args.seqlen * d_model)
    projected = scale32 * (quant_time + data_bound * ratio * attn_factor)
    per_block = {k: v / args.blocks for k, v in sorted(report.timing.items())}
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "blocks": args.blocks,
        "tf32_statistics": args.tf32,
        "states": list(states.shape),
        "tokens": tokens_now,
        "total_seconds": total,
        "seconds_per_block_by_stage": per_block,
        "peak_gpu_gib": peak,
        "token_ratio_to_paper": ratio,
        "projected_paper_seconds_32_blocks": projected,
        "paper_cache_gib_bf16": tokens_paper * 4096 * 2 / 2**30,
        "mean_proxy_error": sum(r["proxy_error"] for r in report.layers) / len(report.layers),
        "mean_bits_per_weight": sum(r["bits_per_weight"] * r["rows"] * r["cols"] for r in report.layers)
        / sum(r["rows"] * r["cols"] for r in report.layers),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"summary": summary, "layers": report.layers}, fh)


if __name__ == "__main__":
    main()
