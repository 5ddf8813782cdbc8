"""Packed-Linear matmul speed on one GPU: bf16 cuBLAS vs the packed kernels (CUDA-core gemv, fused,
blocked dequantize + cuBLAS, and what `QuantizedLinear` dispatches) vs the reference path, on LLaDA-8B's
Linear shapes and M tokens per forward.

Each timing replays a CUDA graph of one call on each of several rotated weight copies (together
over 4x the L2, so no call finds its weight in cache) and reports the median time per call over the
replays. Weights are random (the format is bits: random sign / code words are valid), x ~ N(0, 1).

    python experiments/bench_packed.py --out $OUT/bench_packed.json [--tune gemv fused blocked] [--profile]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from qdllm.kernels import FUSED_MAX_TOKENS, GEMV_MAX_TOKENS, FusedConfig, GemvConfig, PackedMatmul
from qdllm.kernels.dispatch import SCRATCH_BYTES
from qdllm.packing.format import ModuleFormat
from qdllm.packing.module import QuantizedLinear

SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288)]  # (out, in): attention / FFN up, gate / FFN down
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
GEMV_TIMED_TOKENS = 16  # the CUDA-core kernel is timed up to here (it slows with every token)
GROUP = 128
BLOCK_MIB = (16, 32, 64)  # blocked path: rows dequantized per block (the default is SCRATCH_BYTES)
PROFILE_TOKENS = (1, 16, 1024)
ROTATE_BYTES = 240 * 2**20  # > 4 x the H200's 60 MB L2


def random_words(shape: tuple, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen).to(device)


def random_bcq(rows: int, cols: int, order: int, gen: torch.Generator, device: str = "cuda") -> dict:
    """Packed (format 1) order-`order` BCQ tensors with random signs and scales."""
    groups, planes = cols // GROUP, order * cols
    return {
        "bcq_k": torch.full((groups,), order, dtype=torch.int8).to(device),
        "bcq_signs": random_words((rows, planes // 32), gen, device),
        "bcq_row_scale": (torch.rand(order * groups, rows, generator=gen) * 0.02 + 1e-3).half().to(device),
        "bcq_col_scale": (torch.rand(planes, generator=gen) + 0.5).half().to(device),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int32).to(device),
    }


def random_uniform(rows: int, cols: int, bits: int, gen: torch.Generator) -> dict:
    groups = cols // GROUP
    return {
        "uq_bits": torch.full((groups,), bits, dtype=torch.int8).cuda(),
        "uq_codes": random_words((rows, cols * bits // 32), gen, "cuda"),
        "uq_scale": (torch.rand(groups, rows, generator=gen) * 0.02 + 1e-3).half().cuda(),
        "uq_zero": random_words((rows * groups * bits // 32,), gen, "cuda"),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int32).cuda(),
    }


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copies_for(one: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / one))


def graph_time_us(calls: list, replays: int = 15) -> float:
    """Median time per call (us) of a CUDA graph that makes every call in `calls` once."""
    for call in calls:  # compile, allocate scratch
        call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def wall_time_us(call, repeats: int = 2) -> float:
    """For the reference path, which synchronises (it moves tensors to the CPU): wall clock."""
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return min(times)


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written) and bf16 matmul rate on this GPU."""
    a = torch.randn(2**30 // 4, device="cuda")
    b = torch.empty_like(a)
    copy_us = graph_time_us([lambda: b.copy_(a)], replays=10)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = graph_time_us([lambda: m @ m], replays=10)
    return {"copy_TBps": 2 * a.numel() * 4 / copy_us / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm_us / 1e6}


def layer_kinds(rows: int, cols: int, gen: torch.Generator) -> dict:
    return {
        "bcq_k2": partial(random_bcq, rows, cols, 2, gen),
        "uniform_2bit": partial(random_uniform, rows, cols, 2, gen),
    }


def rotated_plans(kind: str, make) -> tuple[list[PackedMatmul], int]:
    """Enough copies of one random layer to overflow the L2, and one copy's packed bytes."""
    first = make()
    copies = [first] + [make() for _ in range(copies_for(nbytes(first)) - 1)]
    return [PackedMatmul(t, kind.split("_")[0], GROUP, False) for t in copies], nbytes(first)


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


def gemv(x: torch.Tensor, config: GemvConfig | None, plan: PackedMatmul) -> torch.Tensor:
    return plan.gemv(x, config)


def fused(x: torch.Tensor, config: FusedConfig | None, plan: PackedMatmul) -> torch.Tensor:
    return plan.fused(x, config)


def blocked(x: torch.Tensor, block_bytes: int, plan: PackedMatmul) -> torch.Tensor:
    return plan.blocked(x, torch.bfloat16, block_bytes)


def bench_shape(rows: int, cols: int, gen: torch.Generator, reference: bool) -> list[dict]:
    bf16 = [
        torch.randn(rows, cols, generator=gen).bfloat16().cuda() for _ in range(copies_for(2 * rows * cols))
    ]
    results = []
    for kind, make in layer_kinds(rows, cols, gen).items():
        plans, packed_bytes = rotated_plans(kind, make)
        for tokens in TOKENS:
            x = torch.randn(tokens, cols, generator=gen).bfloat16().cuda()
            row = {"shape": [rows, cols], "kind": kind, "tokens": tokens, "packed_bytes": packed_bytes}
            row["bf16_us"] = graph_time_us([partial(bf16_matmul, x, w) for w in bf16])
            if tokens <= GEMV_TIMED_TOKENS and plans[0].kind == "bcq":
                row["gemv_us"] = graph_time_us([partial(gemv, x, None, p) for p in plans])
                row["gemv_GBps"] = packed_bytes / row["gemv_us"] / 1e3
            if tokens <= 256:
                row["fused_us"] = graph_time_us([partial(fused, x, None, p) for p in plans])
            for mib in BLOCK_MIB:
                calls = [partial(blocked, x, mib * 2**20, p) for p in plans]
                row[f"blocked_{mib}mib_us"] = graph_time_us(calls)
            row["blocked_us"] = row[f"blocked_{SCRATCH_BYTES // 2**20}mib_us"]
            if "fused_us" in row:  # packed GB read per second: distance to the memory floor
                row["fused_GBps"] = packed_bytes / row["fused_us"] / 1e3
            row["dispatch"] = dispatched_path(plans[0], tokens)
            row["packed_us"] = row[f"{row['dispatch']}_us"]
            row["speedup_vs_bf16"] = row["bf16_us"] / row["packed_us"]
            if reference and tokens == 1:
                fmt = ModuleFormat.of_tensors(plans[0].kind, GROUP, plans[0].tensors, plans[0].sym)
                module = QuantizedLinear(plans[0].tensors, fmt, torch.bfloat16, kernel=False)
                row["reference_us"] = wall_time_us(partial(module, x))
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def dispatched_path(plan: PackedMatmul, tokens: int) -> str:
    """The path `PackedMatmul.__call__` takes for `tokens`."""
    if tokens <= GEMV_MAX_TOKENS[plan.kind]:
        return "gemv"
    return "fused" if tokens <= FUSED_MAX_TOKENS[plan.kind] else "blocked"


# kernel path -> (rows per program, warps, config from (rows, groups per program, warps), call)
LAUNCH_SWEEPS = {
    "gemv": ((8, 16, 32, 64), (2, 4, 8), GemvConfig, gemv),
    "fused": ((32, 64, 128), (4, 8), lambda rows, groups, warps: FusedConfig(rows, 16, groups, warps), fused),
}


def tune_launch(path: str, plans: list[PackedMatmul], tokens: int, gen: torch.Generator) -> list[dict]:
    """Launch shapes of a kernel path: rows per program, programs ~ fill x processors (0: no split), warps."""
    rows_options, warps_options, make_config, call = LAUNCH_SWEEPS[path]
    processors = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(tokens, plans[0].cols, generator=gen).bfloat16().cuda()
    out = []
    for block_rows in rows_options:
        tiles = -(-plans[0].rows // block_rows)
        for fill in (0, 4, 8):
            splits = 1 if fill == 0 else min(plans[0].groups, max(1, -(-fill * processors // tiles)))
            for warps in warps_options:
                config = make_config(block_rows, -(-plans[0].groups // splits), warps)
                us = graph_time_us([partial(call, x, config, p) for p in plans], replays=7)
                out.append({"path": path, "tokens": tokens, "config": config.__dict__, "us": us})
    return out


def tune_blocked(plans: list[PackedMatmul], tokens: int, gen: torch.Generator) -> list[dict]:
    x = torch.randn(tokens, plans[0].cols, generator=gen).bfloat16().cuda()
    out = []
    for block_mib in (4, 16, 64, 1024):
        us = graph_time_us([partial(blocked, x, block_mib * 2**20, p) for p in plans], replays=7)
        out.append({"path": "blocked", "tokens": tokens, "block_mib": block_mib, "us": us})
    return out


TUNED_TOKENS = {"gemv": (1, 4), "fused": (1, 16), "blocked": (256, 1024, 4096)}


def tune(gen: torch.Generator, paths: list[str]) -> list[dict]:
    """Launch shapes of the CUDA-core and fused kernels at few tokens, the blocked path's block size
    at many."""
    sweepers = {
        "gemv": partial(tune_launch, "gemv"),
        "fused": partial(tune_launch, "fused"),
        "blocked": tune_blocked,
    }
    out = []
    for rows, cols in SHAPES:
        for kind, make in layer_kinds(rows, cols, gen).items():
            plans, _ = rotated_plans(kind, make)
            chosen = [p for p in paths if p != "gemv" or kind.startswith("bcq")]  # gemv reads BCQ only
            sweeps = [sweepers[path](plans, t, gen) for path in chosen for t in TUNED_TOKENS[path]]
            for sweep in sweeps:
                sweep = [{"shape": [rows, cols], "kind": kind, **r} for r in sweep]
                print("tune best", json.dumps(min(sweep, key=lambda r: r["us"])), flush=True)
                out += sweep
    return out


def profile(gen: torch.Generator) -> list[dict]:
    """Where the dispatched call spends its GPU time: CUDA time per kernel (torch.profiler) of 10
    calls on rotated copies, per format at PROFILE_TOKENS on the FFN-up shape."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows, cols = SHAPES[1]
    out = []
    for kind, make in layer_kinds(rows, cols, gen).items():
        plans, _ = rotated_plans(kind, make)
        for tokens in PROFILE_TOKENS:
            x = torch.randn(tokens, cols, generator=gen).bfloat16().cuda()
            for plan in plans:  # compile and allocate outside the profile
                plan(x, torch.bfloat16)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for plan in (plans * 10)[:10]:
                    plan(x, torch.bfloat16)
                torch.cuda.synchronize()
            kernels = [
                {"kernel": e.key[:80], "calls": e.count, "cuda_us_per_call": e.device_time_total / 10}
                for e in prof.key_averages()
                if e.device_time_total > 0
            ]
            kernels.sort(key=lambda k: -k["cuda_us_per_call"])
            row = {"shape": [rows, cols], "kind": kind, "tokens": tokens, "kernels": kernels[:6]}
            print("profile", json.dumps(row), flush=True)
            out.append(row)
    return out


def table(results: list[dict]) -> str:
    blocked_cols = [f"blocked_{mib}mib_us" for mib in BLOCK_MIB]
    head = (
        "| out x in | format | M | bf16 us | gemv us | fused us | "
        + " | ".join(f"blocked {mib} MiB us" for mib in BLOCK_MIB)
        + " | dispatch | vs bf16 | reference us |"
    )
    lines = [head, "|---" * (9 + len(BLOCK_MIB)) + "|"]
    for r in results:
        cells = [f"{r[k]:.1f}" if k in r else "" for k in ("bf16_us", "gemv_us", "fused_us", *blocked_cols)]
        ref = f"{r['reference_us']:.0f}" if "reference_us" in r else ""
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['kind']} | {r['tokens']} | {' | '.join(cells)} | "
            f"{r['dispatch']} | {r['speedup_vs_bf16']:.2f}x | {ref} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/bench_packed_h200.json")
    ap.add_argument(
        "--tune", nargs="*", choices=sorted(TUNED_TOKENS),
        help="also sweep these paths' launch shapes (gemv, fused) or block sizes (blocked); no names: all",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="CUDA time per kernel (torch.profiler)")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference path")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "gemv_max_tokens": GEMV_MAX_TOKENS,
        "fused_max_tokens": FUSED_MAX_TOKENS,
        "scratch_bytes": SCRATCH_BYTES,
        "group_size": GROUP,
        "ceilings": ceilings(),
    }
    print(json.dumps(report), flush=True)
    if args.tune is not None:
        report["tune"] = tune(gen, args.tune or sorted(TUNED_TOKENS))
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.profile:
        report["profile"] = profile(gen)
        Path(args.out).write_text(json.dumps(report, indent=1))
    report["results"] = [r for shape in SHAPES for r in bench_shape(*shape, gen, not args.no_reference)]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report["results"]))


if __name__ == "__main__":
    main()
