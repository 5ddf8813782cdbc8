"""Hydra structured-config schemas (`schema`) and their validation into specs (`resolve`)."""

from qdllm.config.resolve import JobSpecs, resolve_job
from qdllm.config.schema import (
    ABMPConf,
    CalibConf,
    EvalConf,
    LoggerConf,
    PathsConf,
    PplConf,
    QuantConf,
    RunConf,
    register_configs,
)

__all__ = [
    "ABMPConf",
    "CalibConf",
    "EvalConf",
    "JobSpecs",
    "LoggerConf",
    "PathsConf",
    "PplConf",
    "QuantConf",
    "RunConf",
    "register_configs",
    "resolve_job",
]
