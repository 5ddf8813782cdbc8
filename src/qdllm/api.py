"""The Python front door: load a dLLM, quantize it, save and reload the packed checkpoint.

    import qdllm
    dllm = qdllm.load("smol_dllm")
    result = qdllm.quantize(dllm, method="daq", bits=2, nsamples=16, seqlen=128)
    qdllm.save_packed(dllm, result, "smol-daq-w2")
    model = qdllm.load_quantized("smol-daq-w2")

`quantize` runs what one `run.py` job runs before its evaluation: calibration text -> windows ->
Masked Calibration Simulation (paper §3.2) -> the stage-wise pipeline with the chosen quantizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdllm.app.results import quant_summary
from qdllm.calib.mcs import MCSSpec, calibration_states
from qdllm.data.calibration import DataSpec
from qdllm.errors import ConfigError
from qdllm.models.base import DiffusionLM
from qdllm.models.registry import ModelSpec, load_dllm
from qdllm.packing.checkpoint import provenance, save_quantized
from qdllm.paths import CONF_DIR, REPO_ROOT
from qdllm.pipeline.quantize import PipelineReport, PipelineSpec, quantize_model
from qdllm.quant.spec import QuantSpec


@dataclass
class QuantizationResult:
    """What `quantize` did: the validated settings and the pipeline's report.

    `report.layers` has one metrics row per quantized Linear; `report.packed` the packed tensors that
    `save_packed` writes.
    """

    quant: QuantSpec
    data: DataSpec
    mcs: MCSSpec
    report: PipelineReport
    n_params: int

    @property
    def summary(self) -> dict[str, Any]:
        """Weight-averaged order/bits, bits per weight with scales, model size (paper Table 3)."""
        return quant_summary(self.report.layers, self.n_params, self.quant.method)

    @property
    def bits_per_weight(self) -> float:
        return self.summary["bits_per_weight"]


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The resolved `conf/model/<name>.yaml` node (with its recipe), `overrides` applied on top."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from qdllm.config import register_configs

    if not (CONF_DIR / "model" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model={name!r} is not a config under {CONF_DIR / 'model'}; known: {known}")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"model={name}", f"paths.root_dir={REPO_ROOT}"])
    GlobalHydra.instance().clear()
    node = OmegaConf.to_container(cfg.model, resolve=True)
    return {**node, **overrides}


def load(model: str = "smol_dllm", **options: Any) -> DiffusionLM:
    """Load a diffusion LM.

    Args:
        model: a config name under `conf/model` ("smol_dllm", "tiny_llada", "llada_base", ...), or a
            local directory / Hugging Face hub id; the latter need `family=` ("llada", "dream",
            "ar_dllm").
        options: any `model.*` field (`device="cuda"`, `dtype="bfloat16"`, `trust_remote_code=True`, ...).
    """
    if (CONF_DIR / "model" / f"{model}.yaml").is_file():
        return load_dllm(ModelSpec.from_any(model_config(model, **options)))
    if "family" not in options:
        raise ConfigError(
            f"model={model!r} is not a config name, so qdllm needs its family: "
            "qdllm.load(..., family='llada' | 'dream' | 'ar_dllm')"
        )
    return load_dllm(ModelSpec.from_any({"name": Path(model).name, "source": model, **options}))


def quantize(
    dllm: DiffusionLM,
    method: str = "daq",
    bits: int = 2,
    *,
    nsamples: int = 16,
    seqlen: int = 128,
    calib: DataSpec | dict[str, Any] | None = None,
    mcs: MCSSpec | dict[str, Any] | bool = True,
    pipeline: PipelineSpec | dict[str, Any] | None = None,
    **quant_options: Any,
) -> QuantizationResult:
    """Quantize `dllm` in place (fake-quantized weights) and keep the packed tensors.

    Args:
        method: "daq" (Quant-dLLM), "rtn", "gptq", "gptaq", "slim", "awq".
        bits: bit width; for DAQ the binary order K (paper eq. 3).
        nsamples, seqlen: calibration windows of the bundled C4 excerpt (or of `calib`).
        calib: other calibration text: a `DataSpec` or a dict of its fields (`path=...`, `source="hf"`).
        mcs: True (paper defaults: γ = 0.25, T = 20), False (plain fully visible calibration), or an
            `MCSSpec` / dict of its fields.
        pipeline: `PipelineSpec` fields (`cache_device="cpu"`, `checkpoint_dir=...` to resume, ...).
        quant_options: any `QuantSpec` field (`group_size`, `abmp_ratio`, `lam`, `iters`, ...).
    Returns:
        QuantizationResult with the per-Linear report and the bits per weight.
    """
    data = _spec(DataSpec, calib, nsamples=nsamples, seqlen=seqlen).validated()
    mcs_spec = _spec(MCSSpec, mcs if not isinstance(mcs, bool) else None, enabled=bool(mcs)).validated()
    quant = QuantSpec.from_any({"method": method, "bits": bits, **quant_options})
    pipe = dataclasses.replace(_spec(PipelineSpec, pipeline), pack=True)
    _, states = calibration_states(dllm, data, mcs_spec)
    report = quantize_model(dllm, states, quant, pipe)
    n_params = sum(p.numel() for p in dllm.model.parameters())
    return QuantizationResult(quant=quant, data=data, mcs=mcs_spec, report=report, n_params=n_params)


def save_packed(dllm: DiffusionLM, result: QuantizationResult, path: str | Path) -> dict[str, int]:
    """Write the packed low-bit checkpoint (safetensors, config with `quantization_config`, tokenizer,
    model card) into `path`; returns bytes per tensor kind. Reload with `qdllm.load_quantized(path)`."""
    if not result.report.packed:
        raise ConfigError(f"quant.method={result.quant.method!r} produced no packed tensors to save")
    calibration = {"mcs": result.mcs.enabled, "nsamples": result.data.nsamples, "seqlen": result.data.seqlen}
    return save_quantized(
        dllm, result.report.packed, path, provenance(result.quant, result.bits_per_weight, calibration)
    )


def _spec(kind: type, given: Any, **fields: Any):
    """`kind` from a dataclass instance, a dict of its fields or None, with `fields` set on top."""
    if given is None:
        base: dict[str, Any] = {}
    elif isinstance(given, kind):
        base = dataclasses.asdict(given)
    elif isinstance(given, dict):
        base = dict(given)
    else:
        raise ConfigError(f"expected a {kind.__name__} or a dict of its fields, got {type(given).__name__}")
    unknown = set(base) - {f.name for f in dataclasses.fields(kind)}
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} fields {sorted(unknown)}")
    return kind(**{**base, **fields})
