"""Paper Table 3 (model size of LLaDA-8B) beside qdllm's numbers, computed from LLaDA-8B's exact
shapes with the storage accounting that the packed format matches (tests: packed bytes = accounting
within 1 %). Sizes do not depend on the weights: ABMP moves as many groups to K+1 as to K-1, and
a K+1 / K-1 pair stores as many planes and scales as two K groups. SliM-LLM's size depends on how
many groups its KL search moves (k per Linear); both ends of its range are shown.

    python experiments/table3_sizes.py [--model llada8b|smol_dllm] [--out table3.json]

`--model smol_dllm`: the small real model (tied embedding stored once, 576-wide rows ending in a
half group); the paper has no row for it, so the table shows each method's compression against FP16
beside the paper's LLaDA-8B ratios.
"""

from __future__ import annotations

import argparse
import json

from qdllm.quant.accounting import daq_bits, slim_bits, uniform_bits
from qdllm.quant.groups import group_widths

LLADA8B = {
    "blocks": 32,
    "linears": [(4096, 4096)] * 4 + [(12288, 4096)] * 2 + [(4096, 12288)],  # (out, in)
    "embedding": 126464 * 4096,
    "head": 126464 * 4096,
    "norms": 32 * 2 * 4096 + 4096,
}
SMOL_DLLM = {
    "blocks": 30,
    "linears": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "embedding": 49152 * 576,
    "head": 0,  # tied to the embedding, stored once
    "norms": 30 * 2 * 576 + 576,
}
MODELS = {"llada8b": LLADA8B, "smol_dllm": SMOL_DLLM}
PAPER_GB = {"FP16": 16.09, "GPTQ": 3.70, "SliM-LLM": 3.72, "Quant-dLLM": 3.69}
GROUP = 128


def linear_bits(method: str, rows: int, cols: int, k: int = 0) -> int:
    widths = group_widths(cols, GROUP)
    if method == "FP16":
        return 16 * rows * cols
    if method == "GPTQ":
        return uniform_bits(rows, widths, [2] * len(widths), False, 16)
    if method == "Quant-dLLM":
        return daq_bits(rows, widths, [2] * len(widths), 16, False)
    bits = [1] * k + [2] * (len(widths) - 2 * k) + [3] * k
    return slim_bits(rows, widths, bits, 16)


def model_gb(method: str, slim_k: str = "min", model: dict = LLADA8B) -> tuple[float, float]:
    """(GB with 1e9 bytes, bits per weight of the quantized Linears)."""
    quantized, weights = 0, 0
    for rows, cols in model["linears"]:
        groups = len(group_widths(cols, GROUP))
        k = 1 if slim_k == "min" else (groups + 1) // 2 - 1
        quantized += linear_bits(method, rows, cols, k)
        weights += rows * cols
    quantized *= model["blocks"]
    weights *= model["blocks"]
    rest = 16 * (model["embedding"] + model["head"] + model["norms"])
    return (quantized + rest) / 8 / 1e9, quantized / weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="llada8b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = MODELS[args.model]
    fp_gb = model_gb("FP16", model=model)[0]
    rows = []
    for method in PAPER_GB:
        gb, bpw = model_gb(method, model=model)
        row = {
            "model": args.model,
            "method": method,
            "paper_gb": PAPER_GB[method],
            "qdllm_gb": gb,
            "bits_per_weight": bpw,
            "compression": fp_gb / gb,
            "paper_compression": PAPER_GB["FP16"] / PAPER_GB[method],
        }
        if method == "SliM-LLM":
            row["qdllm_gb_max_k"], row["bits_per_weight_max_k"] = model_gb(method, "max", model)
        rows.append(row)
    print(
        f"| method | paper LLaDA-8B (GB, x FP16) | qdllm {args.model} (GB, x FP16) | bits / weight (blocks) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        ours = f"{r['qdllm_gb']:.4g}" + (
            f" (k max: {r['qdllm_gb_max_k']:.4g})" if "qdllm_gb_max_k" in r else ""
        )
        paper = f"{r['paper_gb']:.2f} ({r['paper_compression']:.2f}x)"
        print(f"| {r['method']} | {paper} | {ours} ({r['compression']:.2f}x) | {r['bits_per_weight']:.3f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
