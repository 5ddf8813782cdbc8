"""The canonical record of one job: `results.json` + `layers.parquet` in its output dir.

Written atomically (temporary file + `os.replace`), so a crash never leaves a half-written
record; analysis reads these files and never W&B, whose offline runs cannot be read back
(docs/DESIGN.md).
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from qdllm.quant.groups import group_widths

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
LAYERS_FILE = "layers.parquet"
FP_BITS = 16  # storage of every tensor the quantizer leaves alone (embeddings, norms, head, biases)


def read_results(path: Path) -> dict[str, Any] | None:
    """The record in `path` (a results.json or its directory), or None when there is none."""
    path = path / RESULTS_FILE if path.is_dir() else path
    return json.loads(path.read_text()) if path.is_file() else None


def quant_summary(layers: list[dict[str, Any]], n_params: int, method: str) -> dict[str, Any]:
    """Weight-count averages over the quantized Linears and the resulting model size.

    avg_order_or_bits: mean DAQ order K (daq) or bit width (rtn, gptq) per weight; bits_per_weight
    adds the scales and offsets (`qdllm.quant.accounting`); model_size_gb counts the quantized
    Linears at their effective bits and every other parameter at 16 bits (paper Table 3).
    """
    if not layers:
        return {
            "method": method,
            "avg_order_or_bits": float(FP_BITS),
            "bits_per_weight": float(FP_BITS),
            "quantized_params": 0,
            "model_size_gb": n_params * FP_BITS / 8 / 1e9,
            "orders_hist": {},
            "seconds": 0.0,
        }
    weights, order_sum, bits_sum, hist = 0, 0.0, 0.0, {}
    for row in layers:
        n = row["rows"] * row["cols"]
        widths = group_widths(row["cols"], row["group_size"])
        orders = json.loads(row["orders"])
        order_sum += row["rows"] * sum(k * w for k, w in zip(orders, widths, strict=True))
        bits_sum += row["bits_per_weight"] * n
        weights += n
        for k, count in json.loads(row["orders_hist"]).items():
            hist[k] = hist.get(k, 0) + count
    return {
        "method": method,
        "avg_order_or_bits": order_sum / weights,
        "bits_per_weight": bits_sum / weights,
        "quantized_params": weights,
        "model_size_gb": (bits_sum + (n_params - weights) * FP_BITS) / 8 / 1e9,
        "orders_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "seconds": sum(row["seconds"] for row in layers),
    }


def environment(device: str) -> dict[str, Any]:
    import transformers

    import qdllm

    cuda = torch.cuda.is_available() and device.startswith("cuda")
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "qdllm": qdllm.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(torch.device(device)) if cuda else platform.processor() or "cpu",
        **_git_state(),
    }


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(dirty)}
