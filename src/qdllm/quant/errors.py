"""Errors of `quantize_weight`: a bad setting or a bad input tensor."""

from __future__ import annotations

from qdllm.errors import ConfigError


class QuantConfigError(ConfigError):
    """A quantization setting is invalid; the message names the field and the fix."""


class QuantInputError(ValueError):
    """The weight, the second moment or an order map given to `quantize_weight` is unusable."""


def check_field(ok: bool, spec: object, field: str, message: str) -> None:
    """Raise `QuantConfigError("quant.<field>=<value>: message")` unless `ok`."""
    if not ok:
        raise QuantConfigError(f"quant.{field}={getattr(spec, field)!r}: {message}")
