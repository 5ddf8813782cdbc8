"""The one-screen summary printed at the end of a job."""

from __future__ import annotations

from typing import Any


def format_summary(record: dict[str, Any], top_stages: int = 6) -> str:
    model, quant, timing = record.get("model") or {}, record.get("quant") or {}, record.get("timing") or {}
    lines = [
        "=" * 72,
        f"qdllm job {record['run'].get('job_num', 0)}: {record['status'].upper()}"
        + (f"  ({record['error']})" if record.get("error") else ""),
        f"  output     {record['run']['output_dir']}",
    ]
    if model:
        lines.append(
            f"  model      {model['name']} ({model['family']}, {model['n_params'] / 1e6:.2f} M params)"
        )
    if quant:
        lines.append(
            f"  quant      {quant['method']}: {quant['avg_order_or_bits']:.3f} avg order/bits, "
            f"{quant['bits_per_weight']:.3f} bits/weight with scales, "
            f"{quant['model_size_gb']:.4g} GB, ABMP {quant['abmp_ratio']:.2f} ({quant['abmp_scope']})"
        )
    for task, metrics in (record.get("eval") or {}).items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        lines.append(f"  eval       {task}: {shown}")
    stages = sorted(((k, v) for k, v in timing.items() if k != "total"), key=lambda kv: -kv[1])
    if timing:
        lines.append(
            f"  time       {timing.get('total', 0.0):.1f} s total; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in stages[:top_stages])
        )
    memory = record.get("memory") or {}
    if "gpu_peak_gb" in memory:
        lines.append(
            f"  gpu memory {memory['gpu_peak_gb']:.1f} GiB peak "
            f"({memory.get('gpu_allocated_at_start_gb', 0.0):.2f} GiB held at start)"
        )
    lines.append("=" * 72)
    return "\n".join(lines)
