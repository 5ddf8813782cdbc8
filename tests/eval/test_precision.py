"""`eval.autocast`: 16-bit evaluation matmuls that leave the weights as they were."""

import math

import pytest
import torch

from qdllm.config import resolve_job
from qdllm.errors import ConfigError
from qdllm.eval.runner import eval_precision, evaluate
from qdllm.models import load_dllm

PPL = ["eval=ppl", "eval.ppl.max_windows=2", "eval.ppl.seqlen=64", "eval.ppl.mc_num=4", "eval.batch_size=4"]


def test_autocast_runs_linears_in_bfloat16_and_off_keeps_float32():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with eval_precision(torch.device("cpu"), "bfloat16"):
        assert layer(x).dtype == torch.bfloat16
    with eval_precision(torch.device("cpu"), None):
        assert layer(x).dtype == torch.float32


def test_bfloat16_perplexity_is_close_to_float32_and_weights_are_untouched(composer):
    dllm = load_dllm({"family": "llada", "source": "tiny", "seed": 0})
    before = {k: v.clone() for k, v in dllm.model.state_dict().items()}
    fp32 = evaluate(dllm, resolve_job(composer(*PPL)).eval)["ppl"]
    bf16 = evaluate(dllm, resolve_job(composer(*PPL, "eval.autocast=bfloat16")).eval)["ppl"]
    # bf16 keeps 8 mantissa bits: per-token log-likelihoods move by ~1e-2 nats, not more
    assert bf16["nll"] == pytest.approx(fp32["nll"], abs=0.05)
    assert bf16["nll"] != fp32["nll"]  # the context really changed the arithmetic
    assert math.isfinite(bf16["ppl"])
    after = dllm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)


def test_unknown_autocast_type_is_refused_naming_the_field(composer):
    dllm = load_dllm({"family": "llada", "source": "tiny", "seed": 0})
    with pytest.raises(ConfigError, match="eval.autocast='float8'"):
        evaluate(dllm, resolve_job(composer(*PPL, "eval.autocast=float8")).eval)
