"""Turn a composed Hydra config into validated specs, before any work.

Type errors and unknown keys are caught by Hydra at compose time (the schema); this module checks
value ranges and cross-field rules, raising `ConfigError` with the offending key
(`abmp.ratio=0.7: ...`, `quant.order=0: ...`, `calib.gamma=1.5: ...`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from qdllm.calib.mcs import MCSSpec
from qdllm.config.schema import ABMP_FIELDS, EvalConf, LoggerConf, RunConf
from qdllm.data.calibration import DataSpec
from qdllm.errors import ConfigError, require
from qdllm.eval.runner import check_tasks
from qdllm.models.registry import ModelSpec
from qdllm.pipeline.quantize import PipelineSpec
from qdllm.quant.activations import ActSpec
from qdllm.quant.methods import get_method
from qdllm.quant.spec import ABMP_SCOPES, QuantSpec
from qdllm.transforms import TransformSpec

LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class JobSpecs:
    """Everything one job needs, validated."""

    run: RunConf
    model: ModelSpec
    data: DataSpec
    mcs: MCSSpec
    quant: QuantSpec
    transform: TransformSpec
    act: ActSpec
    pipeline: PipelineSpec
    eval: EvalConf
    logger: LoggerConf


def resolve_job(cfg: DictConfig | RunConf) -> JobSpecs:
    """Validate every node of the run config; raise `ConfigError` naming the first bad field."""
    run = cfg if isinstance(cfg, RunConf) else _to_run_conf(cfg)
    abmp = run.abmp
    require(0.0 <= abmp.ratio <= 0.5, "abmp.ratio", abmp.ratio, "must lie in [0, 0.5] (0 turns ABMP off)")
    require(abmp.scope in ABMP_SCOPES, "abmp.scope", abmp.scope, f"use one of {ABMP_SCOPES}")
    quant_fields = dataclasses.asdict(run.quant)
    transform = TransformSpec(**quant_fields.pop("transform")).validated()
    quant_fields.update({key: getattr(abmp, name) for key, name in ABMP_FIELDS.items()})
    quant = QuantSpec.from_any(quant_fields)
    model = ModelSpec.from_any(dataclasses.asdict(run.model))
    logger = run.logger
    require(logger.name in LOGGERS, "logger.name", logger.name, f"use one of {LOGGERS}")
    require(logger.mode in WANDB_MODES, "logger.mode", logger.mode, f"use one of {WANDB_MODES}")
    check_tasks(run.eval)
    method = get_method(quant.method)
    require(
        not run.pack
        or not method.quantizes
        or method.pack_kind is not None,  # none: recorded as nothing to pack
        "pack",
        run.pack,
        f"quant.method={quant.method!r} has no packed format yet; run without pack",
    )
    return JobSpecs(
        run=run,
        model=model,
        data=run.calib.data_spec(),
        mcs=run.calib.mcs_spec(),
        quant=quant,
        transform=transform,
        act=run.act.validated(),
        pipeline=dataclasses.replace(run.pipeline, pack=run.pack).validated(),
        eval=run.eval,
        logger=logger,
    )


def _to_run_conf(cfg: DictConfig) -> RunConf:
    try:
        run = OmegaConf.to_object(cfg)
    except Exception as exc:  # a missing value or a failed interpolation names its key
        raise ConfigError(f"config does not resolve: {exc}") from exc
    if not isinstance(run, RunConf):
        raise ConfigError("the config is not built on `run_schema`; list it first in the primary defaults")
    _reject_unknown_keys(cfg, RunConf, "")
    return run


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Keys appended with `+` pass Hydra's composition but are not in the schema: refuse them."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: unknown key; valid keys of {prefix or 'the run'} are {sorted(fields)}"
            )
        child = hints[key]
        if dataclasses.is_dataclass(child):
            _reject_unknown_keys(node[key], child, f"{prefix}{key}.")
