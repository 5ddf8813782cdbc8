"""The QDLM study's table (arXiv 2508.14896) from the job folders of `experiments/gpu_qdlm_study.sh`.

    python -m analysis.qdlm --runs <sweep dir> --out experiments/results/qdlm_smol_dllm

Every row is one job folder named after its setting (`gptq_w4a16`, ...), the FP row `fp`. Per task
the headline metric, its drop relative to FP, and the **paired** difference to FP with its standard
error: all rows score the same documents with the same Monte Carlo masks, so the per-document
differences d_i = score_i(row) - score_i(FP) carry the comparison, SE = sd(d) / sqrt(n) (much smaller
than the unpaired SE of either accuracy). A category (the study's "general" set here) averages its
tasks' differences, with SE = sqrt(sum SE_t^2) / n_tasks (tasks are independent documents). Grades
follow the study: relative drop < 1 %, 1-4 %, > 4 %.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.smol import HEADLINE

FP_ROW = "fp"
CATEGORIES = {"general": ("piqa", "arc_easy", "arc_challenge")}
GRADES = ((0.01, "< 1 %"), (0.04, "1-4 %"), (math.inf, "> 4 %"))
RESULTS_FILE, SCORES_FILE = "results.json", "lm_eval_results.json"


def grade(relative_drop: float) -> str:
    """The study's grade of a relative drop (a gain counts as < 1 %)."""
    return next(label for bound, label in GRADES if relative_drop < bound)


def paired_difference(row: dict[str, list], fp: dict[str, list], metric: str) -> tuple[float, float, int]:
    """Mean and standard error of score(row) - score(fp) over the documents both scored.

    row, fp: {"doc_id": [...], metric: [...]} (lm-eval's per-document scores)."""
    fp_by_doc = dict(zip(fp["doc_id"], fp[metric], strict=True))
    pairs = zip(row["doc_id"], row[metric], strict=True)
    diffs = np.array([value - fp_by_doc[doc] for doc, value in pairs if doc in fp_by_doc])
    n = len(diffs)
    if n == 0:
        raise ValueError(f"no document scored by both the row and the FP row for metric {metric!r}")
    se = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(diffs.mean()), se, n


def load_rows(sweep: str | Path) -> dict[str, dict]:
    """{row name: {"record": results.json, "scores": per-document scores}} of every ok job folder."""
    rows = {}
    for results in sorted(Path(sweep).glob(f"*/{RESULTS_FILE}")):
        record = json.loads(results.read_text())
        if record.get("status") != "ok":
            continue
        scores_file = results.parent / SCORES_FILE
        scores = json.loads(scores_file.read_text()).get("per_document", {}) if scores_file.is_file() else {}
        rows[results.parent.name] = {"record": record, "scores": scores}
    if FP_ROW not in rows:
        raise FileNotFoundError(f"{sweep}: no finished '{FP_ROW}' job folder; the table is relative to it")
    return rows


def study_table(rows: dict[str, dict]) -> pd.DataFrame:
    """One line per (row, task or category): score, FP score, relative drop, grade, paired
    difference and its SE, documents, bits per weight, quantization seconds."""
    fp = rows[FP_ROW]
    lines = []
    for name, row in rows.items():
        record = row["record"]
        per_task = {}
        for task, metric in HEADLINE.items():
            if task not in record.get("eval", {}) or task not in row["scores"]:
                continue
            diff, se, n = paired_difference(row["scores"][task], fp["scores"][task], metric)
            score, fp_score = record["eval"][task][metric], fp["record"]["eval"][task][metric]
            per_task[task] = (score, fp_score, diff, se, n)
        for category, tasks in CATEGORIES.items():
            present = [per_task[t] for t in tasks if t in per_task]
            if len(present) == len(tasks):
                score, fp_score = np.mean([p[0] for p in present]), np.mean([p[1] for p in present])
                diff = float(np.mean([p[2] for p in present]))
                se = math.sqrt(sum(p[3] ** 2 for p in present)) / len(present)
                per_task[category] = (score, fp_score, diff, se, sum(p[4] for p in present))
        quant = record.get("quant", {})
        for task, (score, fp_score, diff, se, n) in per_task.items():
            drop = (fp_score - score) / fp_score if fp_score else math.nan
            lines.append(
                {
                    "row": name,
                    "task": task,
                    "score": score,
                    "fp_score": fp_score,
                    "relative_drop": drop,
                    "grade": grade(drop),
                    "paired_diff": diff,
                    "paired_se": se,
                    "documents": n,
                    "ppl": record.get("eval", {}).get("ppl", {}).get("ppl", math.nan),
                    "bits_per_weight": quant.get("bits_per_weight", math.nan),
                    # the pipeline's seconds plus the FP transform's (SmoothQuant, QuaRot, DuQuant)
                    "quantize_s": quant.get("seconds", 0.0)
                    + (quant.get("transform") or {}).get("seconds", 0.0),
                    "eval_s": record.get("timing", {}).get("eval", math.nan),
                }
            )
    return pd.DataFrame(lines)


def markdown(table: pd.DataFrame, task: str) -> str:
    """The rows of one task or category as a Markdown table."""
    part = table[table["task"] == task]
    head = "| row | score | drop vs FP | grade | paired diff ± SE (points) | ppl | bits/weight | quantize s |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in part.itertuples(index=False):
        lines.append(
            f"| {r.row} | {100 * r.score:.1f} | {100 * r.relative_drop:+.1f} % | {r.grade} | "
            f"{100 * r.paired_diff:+.1f} ± {100 * r.paired_se:.1f} | {r.ppl:.1f} | {r.bits_per_weight:.2f} | "
            f"{r.quantize_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, help="the sweep dir of experiments/gpu_qdlm_study.sh")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    table = study_table(load_rows(args.runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "study_table.csv", index=False)
    text = "\n\n".join(f"### {task}\n\n{markdown(table, task)}" for task in table["task"].unique())
    (out / "study_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
