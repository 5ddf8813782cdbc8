"""Packed checkpoint at full scale on a GPU: a random-init model with LLaDA-8B's blocks (byte-level
vocabulary), DAQ K=2 + ABMP 5 % through the pipeline with packing, save, load, and compare logits
with the fake-quantized model; reports the on-disk size by tensor kind and the load time.

    python experiments/pack_check_llada8b_shapes.py --out $OUT/pack_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import qdllm
from qdllm.calib import MCSSpec, mcs_states
from qdllm.data import DataSpec, calibration_windows, load_texts
from qdllm.models import load_dllm
from qdllm.packing.checkpoint import save_quantized
from qdllm.pipeline import PipelineSpec, quantize_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="d 256, FFN 768: a CPU smoke test of this script")
    ap.add_argument("--out", default="pack_check.json")
    args = ap.parse_args()
    hidden, ffn = (256, 768) if args.small else (4096, 12288)
    tiny = {"hidden": hidden, "layers": args.layers, "heads": 32, "kv_heads": 32, "intermediate": ffn}
    model = {"family": "llada", "source": "tiny", "device": args.device, "dtype": "bfloat16", "tiny": tiny}
    dllm = load_dllm(model)
    data = DataSpec(nsamples=8, seqlen=1024)
    windows = calibration_windows(load_texts(data), dllm.tokenizer, data)
    states, _ = mcs_states(windows, dllm.mask_token_id, MCSSpec(timesteps=4, mode="stratified"))
    t0 = time.perf_counter()
    report = quantize_model(
        dllm, states, {"method": "daq", "abmp_ratio": 0.05}, PipelineSpec(pack=True, progress=False)
    )
    quantize_s = time.perf_counter() - t0
    path = Path(tempfile.mkdtemp()) / "packed"
    t0 = time.perf_counter()
    sizes = save_quantized(dllm, report.packed, path, {"method": "daq", "group_size": 128, "sym": False})
    save_s = time.perf_counter() - t0
    probe = windows[:2, :256].to(args.device)
    reference = dllm.logits(probe)
    del dllm
    if args.device == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    loaded = qdllm.load_quantized(path, device=args.device)
    load_s = time.perf_counter() - t0
    identical = bool(torch.equal(loaded.logits(probe), reference))
    accounted = sum(r["bits_per_weight"] * r["rows"] * r["cols"] for r in report.layers) / 8
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "blocks": args.layers,
        "quantize_seconds": quantize_s,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "identical_logits": identical,
        "sizes_bytes": sizes,
        "packed_linear_bytes": sizes["signs_or_codes"] + sizes["scales_and_zeros"] + sizes["maps"],
        "accounted_linear_bytes": accounted,
        "on_disk_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
