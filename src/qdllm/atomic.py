"""Files written in one step (temporary file + `os.replace`): a crash never leaves half a file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch


def write_json_atomic(path: Path, obj: Any, lenient: bool = False, indent: int | None = 2) -> None:
    """Standard JSON (non-finite floats become null), replaced in one step. `lenient` writes any
    other object as its `str` (third-party records such as lm-eval's task configs); `indent=None`
    writes it compactly."""
    default = (
        (lambda v: _jsonable(v) if isinstance(v, (torch.Tensor, Path)) else str(v)) if lenient else _jsonable
    )
    separators = None if indent is not None else (",", ":")
    write_text_atomic(
        path, json.dumps(_finite(obj), indent=indent, separators=separators, default=default, allow_nan=False)
    )


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
