"""`quant=smoothquant` and the `act` group through the Hydra app (tiny models, offline)."""

import pytest

from qdllm.app import run_job
from qdllm.config import resolve_job
from qdllm.errors import ConfigError
from tests.app.conftest import composer, read_record, run_cli  # noqa: F401  (composer is a fixture)


def test_smoothquant_defaults_to_w8a8_and_w4a4_is_two_overrides(composer):  # noqa: F811
    w8a8 = resolve_job(composer("quant=smoothquant"))
    assert (w8a8.quant.method, w8a8.quant.bits, w8a8.quant.group_size, w8a8.act.bits) == ("rtn", 8, -1, 8)
    assert (w8a8.transform.name, w8a8.transform.alpha, w8a8.act.granularity) == ("smoothquant", 0.5, "token")
    w4a4 = resolve_job(composer("quant=smoothquant", "quant.bits=4", "act=a4"))
    assert (w4a4.quant.bits, w4a4.act.bits) == (4, 4)
    gptq = resolve_job(composer("quant=smoothquant", "quant.method=gptq", "act=none"))
    assert (gptq.quant.method, gptq.transform.name, gptq.act.enabled) == ("gptq", "smoothquant", False)
    default = resolve_job(composer())  # other methods: no transform, unquantized activations
    assert (default.transform.name, default.act.bits) == ("none", None)
    assert resolve_job(composer("quant=gptq", "act=a8", "act.clip=0.9")).act.clip == 0.9


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["act=a8", "act.bits=0"], "act.bits=0"),
        (["act=a8", "act.clip=1.5"], "act.clip=1.5"),
        (["act=a4", "act.granularity=row"], "act.granularity='row'"),
        (["quant=smoothquant", "quant.transform.alpha=2"], "quant.transform.alpha=2.0"),
        (["quant.transform.name=rotate"], "quant.transform.name='rotate'"),
    ],
)
def test_bad_values_fail_before_any_model_is_loaded_naming_the_field(composer, overrides, field):  # noqa: F811
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve_job(composer("debug=tiny_cpu", *overrides))


@pytest.mark.slow
def test_smoothquant_w8a8_job_records_the_transform_and_the_hooks(composer, tmp_path):  # noqa: F811
    record = run_job(composer("debug=tiny_cpu", "quant=smoothquant", "logger=none"))
    assert record["status"] == "ok"
    transform = record["quant"]["transform"]
    assert transform["name"] == "smoothquant" and transform["folded"] == {
        "qkv": 2,
        "ffn_in": 2,
        "attn_out": 2,
    }
    assert record["quant"]["act"] == {
        "bits": 8,
        "granularity": "token",
        "clip": 1.0,
        "qk": False,
        "linears": 14,
        "outputs": 0,
    }
    assert record["quant"]["avg_order_or_bits"] == 8.0 and record["eval"]["ppl"]["ppl"] > 1
    assert "transform" in record["timing"]


@pytest.mark.slow
def test_run_py_smoothquant_w4a4_gptq_on_tiny_dream(tmp_path):
    proc = run_cli(
        "debug=tiny_cpu",
        "model=tiny_dream",
        "quant=smoothquant",
        "quant.method=gptq",
        "quant.bits=4",
        "act=a4",
        "act.qk=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_record(tmp_path)
    assert record["status"] == "ok" and record["config"]["quant"]["method"] == "gptq"
    assert record["quant"]["transform"]["skipped"]["attn_out"].startswith("not folded: GQA")
    assert record["quant"]["act"]["linears"] == 14 and record["quant"]["act"]["outputs"] == 4
    assert record["quant"]["avg_order_or_bits"] == 4.0
