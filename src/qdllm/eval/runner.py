"""Run the tasks of the `eval` node on a model; return {task: {metric: value}}."""

from __future__ import annotations

from typing import Any

from qdllm.errors import ConfigError
from qdllm.eval.ppl import elbo_perplexity, ppl_windows
from qdllm.models.base import DiffusionLM


def _wikitext_ppl(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, float]:
    ppl = eval_cfg.ppl
    windows = ppl_windows(ppl.path, ppl.field, dllm.tokenizer, ppl.seqlen, ppl.max_windows)
    return elbo_perplexity(dllm, windows, ppl.mc_num, eval_cfg.seed, eval_cfg.batch_size)


TASKS = {"ppl": _wikitext_ppl}
BUILTIN_TASKS = tuple(TASKS)


def check_tasks(eval_cfg: Any) -> None:
    """Fail before any work when `eval.tasks` names a task this version cannot run."""
    unknown = [t for t in eval_cfg.tasks if t not in BUILTIN_TASKS]
    if unknown:
        raise ConfigError(
            f"eval.tasks={list(eval_cfg.tasks)!r}: {unknown} need the lm-eval integration, which is not "
            f"wired yet; this version runs {list(BUILTIN_TASKS)} (use eval=ppl or eval=none)"
        )


def evaluate(dllm: DiffusionLM, eval_cfg: Any) -> dict[str, dict[str, float]]:
    check_tasks(eval_cfg)
    return {task: TASKS[task](dllm, eval_cfg) for task in eval_cfg.tasks}
