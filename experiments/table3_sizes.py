"""Paper Table 3 (model size of LLaDA-8B) beside qdllm's numbers, computed from LLaDA-8B's exact
shapes with the storage accounting that the packed format matches (tests: packed bytes = accounting
within 1 %). Sizes do not depend on the weights: ABMP moves as many groups to K+1 as to K-1, and
a K+1 / K-1 pair stores as many planes and scales as two K groups. SliM-LLM's size depends on how
many groups its KL search moves (k per Linear); both ends of its range are shown.

    python experiments/table3_sizes.py [--out table3.json]
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


def model_gb(method: str, slim_k: str = "min") -> tuple[float, float]:
    """(GB with 1e9 bytes, bits per weight of the quantized Linears)."""
    quantized, weights = 0, 0
    for rows, cols in LLADA8B["linears"]:
        groups = len(group_widths(cols, GROUP))
        k = 1 if slim_k == "min" else (groups + 1) // 2 - 1
        quantized += linear_bits(method, rows, cols, k)
        weights += rows * cols
    quantized *= LLADA8B["blocks"]
    weights *= LLADA8B["blocks"]
    rest = 16 * (LLADA8B["embedding"] + LLADA8B["head"] + LLADA8B["norms"])
    return (quantized + rest) / 8 / 1e9, quantized / weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for method in PAPER_GB:
        gb, bpw = model_gb(method)
        row = {"method": method, "paper_gb": PAPER_GB[method], "qdllm_gb": gb, "bits_per_weight": bpw}
        if method == "SliM-LLM":
            row["qdllm_gb_max_k"], row["bits_per_weight_max_k"] = model_gb(method, "max")
        rows.append(row)
    print("| method | paper (GB) | qdllm (GB) | bits / weight (blocks) |")
    print("|---|---|---|---|")
    for r in rows:
        ours = f"{r['qdllm_gb']:.2f}" + (
            f" (k max: {r['qdllm_gb_max_k']:.2f})" if "qdllm_gb_max_k" in r else ""
        )
        print(f"| {r['method']} | {r['paper_gb']:.2f} | {ours} | {r['bits_per_weight']:.3f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
