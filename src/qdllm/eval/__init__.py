"""Evaluation of (quantized) diffusion LMs: built-in ELBO perplexity; lm-eval tasks later."""

from qdllm.eval.ppl import elbo_perplexity, ppl_windows, stratified_masks
from qdllm.eval.runner import BUILTIN_TASKS, check_tasks, evaluate

__all__ = ["BUILTIN_TASKS", "check_tasks", "elbo_perplexity", "evaluate", "ppl_windows", "stratified_masks"]
