"""HumanEval and MBPP pass@1, scored natively (offline) by running the generated programs.

lm-eval scores these tasks with `evaluate`'s `code_eval` metric, fetched from the Hugging Face hub
at import time, so they cannot run offline; qdllm runs them itself on the local copies in
data/: HumanEval 0-shot (prompt = the function header, completion cut at the next top-level
statement), MBPP 3-shot with lm-eval's prompt format (examples = task_id 2-4 of the prompt split,
test split = task_id 11-510, completion cut at "[DONE]"). Each program runs in a fresh Python
process (`-I`, a temporary working directory, a timeout). That is isolation, not a sandbox: it
only runs behind `eval.confirm_run_unsafe_code=true`.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qdllm.errors import ConfigError
from qdllm.eval.sampler import GenSpec, answer
from qdllm.models.base import DiffusionLM

HUMANEVAL_SIZE, MBPP_TEST_SIZE = 164, 500
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_SHOTS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"{path} is missing (eval.data_root)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_humaneval(data_root: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    docs = _read_jsonl(Path(data_root) / "tasks/humaneval/HumanEval.jsonl.gz")
    if len(docs) != HUMANEVAL_SIZE:
        raise ConfigError(f"HumanEval has {len(docs)} problems, the official set has {HUMANEVAL_SIZE}")
    return docs[:limit]


def load_mbpp(
    data_root: str | Path, limit: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(test problems, few-shot examples)."""
    rows = {int(r["task_id"]): r for r in _read_jsonl(Path(data_root) / "tasks/mbpp/mbpp.jsonl")}
    test = [rows[i] for i in MBPP_TEST_IDS if i in rows]
    if len(test) != MBPP_TEST_SIZE:
        raise ConfigError(
            f"MBPP test split has {len(test)} problems, the official split has {MBPP_TEST_SIZE}"
        )
    return test[:limit], [rows[i] for i in MBPP_SHOTS]


def mbpp_text(doc: dict[str, Any]) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (
        f"You are an expert Python programmer, and here is your task: {doc['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def mbpp_prompt(doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    examples = [mbpp_text(s) + s["code"] + "\n[DONE]" for s in shots]
    return "\n\n".join([*examples, mbpp_text(doc)])


def truncate(completion: str, stops: tuple[str, ...]) -> str:
    cut = min((completion.find(s) for s in stops if s in completion), default=len(completion))
    return completion[:cut]


def passes(program: str, timeout: float) -> bool:
    """Whether `program` exits 0 within `timeout` seconds in a fresh, isolated Python process."""
    with tempfile.TemporaryDirectory() as workdir:
        try:
            result = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=workdir,
                capture_output=True,
                timeout=timeout,
                env={"PATH": "/usr/bin:/bin"},
            )
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


def humaneval_program(doc: dict[str, Any], completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: dict[str, Any], completion: str) -> str:
    setup = doc.get("test_setup_code") or ""
    return "\n".join([setup, completion, *doc["test_list"]]) + "\n"


def evaluate_humaneval(
    dllm: DiffusionLM, docs: list[dict[str, Any]], spec: GenSpec, seed: int, timeout: float
) -> dict[str, float]:
    solved = 0
    for doc in tqdm(docs, desc="HumanEval"):
        completion = truncate(answer(dllm, doc["prompt"], spec, seed), HUMANEVAL_STOPS)
        solved += passes(humaneval_program(doc, completion), timeout)
    return {"pass@1": solved / len(docs), "n": float(len(docs))}


def evaluate_mbpp(
    dllm: DiffusionLM,
    docs: list[dict[str, Any]],
    shots: list[dict[str, Any]],
    spec: GenSpec,
    seed: int,
    timeout: float,
) -> dict[str, float]:
    solved = 0
    for doc in tqdm(docs, desc="MBPP"):
        completion = truncate(answer(dllm, mbpp_prompt(doc, shots), spec, seed), ("[DONE]",))
        solved += passes(mbpp_program(doc, completion), timeout)
    return {"pass@1": solved / len(docs), "n": float(len(docs))}
