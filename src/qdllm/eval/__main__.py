"""`python -m qdllm.eval ...`: lm-eval's command line with the `qdllm` model registered."""

from lm_eval.__main__ import cli_evaluate

import qdllm.eval.lm  # noqa: F401  (registers the model name "qdllm")

if __name__ == "__main__":
    cli_evaluate()
