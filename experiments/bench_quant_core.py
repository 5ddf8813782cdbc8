"""Benchmark of `qdllm.quant.quantize_weight` on LLaDA-8B's Linear shapes (not a test).

Times RTN, GPTQ, GPTAQ, SliM-LLM and DAQ K=1/2/3 with and without compensation, on CPU and/or CUDA, prints a
markdown table and projects the time for all 224 Linear layers of LLaDA-8B (32 blocks x
[4 x 4096x4096 (q, k, v, attn_out), 2 x 12288x4096 (ff_proj, up_proj), 1 x 4096x12288 (ff_out)]).

    python experiments/bench_quant_core.py --devices cuda --repeats 3 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from qdllm.quant import quantize_weight

LLADA_SHAPES = {
    "attn 4096x4096": (4096, 4096),
    "ff_in 12288x4096": (12288, 4096),
    "ff_out 4096x12288": (4096, 12288),
}
LLADA_COUNT_PER_BLOCK = {"attn 4096x4096": 4, "ff_in 12288x4096": 2, "ff_out 4096x12288": 1}
LLADA_BLOCKS = 32

METHODS = {
    "rtn": {"method": "rtn", "bits": 2},
    "gptq": {"method": "gptq", "bits": 2},
    "gptaq": {"method": "gptaq", "bits": 2},
    "slim": {"method": "slim", "bits": 2},
    "daq_k1_off": {"method": "daq", "order": 1, "compensation": "off"},
    "daq_k2_off": {"method": "daq", "order": 2, "compensation": "off"},
    "daq_k3_off": {"method": "daq", "order": 3, "compensation": "off"},
    "daq_k1_diag": {"method": "daq", "order": 1, "compensation": "diag"},
    "daq_k2_diag": {"method": "daq", "order": 2, "compensation": "diag"},
    "daq_k3_diag": {"method": "daq", "order": 3, "compensation": "diag"},
    "daq_k2_exact": {"method": "daq", "order": 2, "compensation": "exact"},
    "daq_k2_diag_abmp": {"method": "daq", "order": 2, "compensation": "diag", "abmp_ratio": 0.05},
}


def synthetic_problem(rows: int, cols: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 heavy-tailed weight (rows, cols) and a correlated, well-posed S (cols, cols) in fp32.

    S = B B^T / r + diag(e) with a rank-256 factor B and log-normal e: correlated like real
    activations, and cheap to build at 12288 columns.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w *= 1 + 3 * (torch.rand(rows, cols, generator=gen) > 0.99)
    factor = torch.randn(cols, 256, generator=gen)
    diag = torch.exp(torch.randn(cols, generator=gen))
    w, factor, diag = w.to(device), factor.to(device), diag.to(device)
    s = factor @ factor.T / 256 + torch.diag(diag)
    return w.to(torch.bfloat16), s


def method_inputs(cfg: dict, s: torch.Tensor, tokens: int = 2048, seed: int = 1) -> dict:
    """The extra inputs of GPTAQ (a cross moment D, here 5 % of S: timing does not depend on its
    values) and SliM-LLM (calibration inputs with second moment S, for its KL search)."""
    if cfg["method"] == "gptaq":
        return {"cross_moment": 0.05 * s}
    if cfg["method"] == "slim":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(tokens, s.shape[0], generator=gen).to(s.device)
        return {"inputs": z @ torch.linalg.cholesky(s).T}
    return {}


def time_one(weight: torch.Tensor, s: torch.Tensor, cfg: dict, repeats: int) -> dict:
    extra = method_inputs(cfg, s)
    runs = [quantize_weight(weight, s, cfg, **extra) for _ in range(repeats)]
    return {
        "seconds": statistics.median(r.seconds for r in runs),
        "proxy_error": runs[0].proxy_error,
        "bits_per_weight": runs[0].bits_per_weight,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shapes", default=",".join(LLADA_SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    args = parser.parse_args()

    methods = args.methods.split(",")
    shapes = args.shapes.split(",")
    results: list[dict] = []
    for device in args.devices.split(","):
        hardware = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
        warm_w, warm_s = synthetic_problem(256, 512, device)
        for name in methods:  # warm-up: kernels, cuBLAS/cuSOLVER handles
            quantize_weight(warm_w, warm_s, METHODS[name], **method_inputs(METHODS[name], warm_s))
        for shape in shapes:
            rows, cols = LLADA_SHAPES[shape]
            weight, s = synthetic_problem(rows, cols, device)
            for name in methods:
                row = {"device": device, "hardware": hardware, "shape": shape, "method": name}
                row.update(time_one(weight, s, METHODS[name], args.repeats))
                results.append(row)
                print(
                    f"{device:5s} {shape:18s} {name:18s} {row['seconds']:8.3f} s"
                    f"  proxy {row['proxy_error']:.4f}  bpw {row['bits_per_weight']:.3f}",
                    flush=True,
                )
            del weight, s
            if device == "cuda":
                torch.cuda.empty_cache()

    print(render(results, methods, shapes))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"torch": torch.__version__, "results": results}, fh, indent=1)


def render(results: list[dict], methods: list[str], shapes: list[str]) -> str:
    """Markdown table: seconds per shape, the 224-layer projection and its ratio to GPTQ."""
    lines = []
    for device in dict.fromkeys(r["device"] for r in results):
        rows = [r for r in results if r["device"] == device]
        hardware = rows[0]["hardware"]
        lines.append(f"\n{device} ({hardware}), median seconds per matrix")
        lines.append(
            "| method | " + " | ".join(shapes) + " | 224 Linears (proj.) | vs GPTQ | proxy (ff_in) |"
        )
        lines.append("|---" * (len(shapes) + 4) + "|")
        projections = {}
        for name in methods:
            per = {r["shape"]: r for r in rows if r["method"] == name}
            if set(per) == set(LLADA_SHAPES):
                projections[name] = LLADA_BLOCKS * sum(
                    LLADA_COUNT_PER_BLOCK[s] * per[s]["seconds"] for s in LLADA_SHAPES
                )
        for name in methods:
            per = {r["shape"]: r for r in rows if r["method"] == name}
            cells = [f"{per[s]['seconds']:.3f}" if s in per else "-" for s in shapes]
            proj = projections.get(name)
            ratio = proj / projections["gptq"] if proj and "gptq" in projections else None
            proxy = per.get("ff_in 12288x4096", {}).get("proxy_error")
            lines.append(
                f"| {name} | "
                + " | ".join(cells)
                + f" | {f'{proj:.1f} s' if proj else '-'} | {f'{ratio:.2f}x' if ratio else '-'}"
                + f" | {f'{proxy:.4f}' if proxy is not None else '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
