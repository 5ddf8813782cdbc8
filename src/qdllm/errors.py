"""Error types shared across qdllm."""


class ConfigError(ValueError):
    """A setting is invalid; the message names the field (`group.field=value`) and the fix."""


def require(ok: bool, key: str, value: object, message: str) -> None:
    """Raise `ConfigError("key=value: message")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")
