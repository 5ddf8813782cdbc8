"""Read a folder's safetensors shards into one state dict (never pickles)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def read_shards(path: Path, pattern: str) -> dict[str, torch.Tensor]:
    """Every tensor of the files in `path` matching `pattern`, in file-name order ({} if none)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob(pattern)):
        tensors.update(load_file(str(file)))
    return tensors
