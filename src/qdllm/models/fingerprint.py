"""Fingerprints that tell a model's files or weights apart when its config did not change.

A finished job and the pipeline's per-block checkpoints are matched to a new run by config; a
local model directory rewritten in place (a retrained adapter, a re-exported checkpoint) keeps
the same config, so both also carry one of these digests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

EDGE_BYTES = 1 << 20  # bytes read from each end of a file: safetensors headers and tail weights
SAMPLES_PER_TENSOR = 4096
# a model card, plots and training curves sit beside the weights but are never loaded: editing them
# (new scores in a card) must not orphan the finished work on the same weights
DOCUMENTATION_SUFFIXES = (".md", ".png", ".csv")


def source_fingerprint(source: str | None) -> str | None:
    """Digest of a local model file or directory: every file's relative path, size and first /
    last `EDGE_BYTES` bytes (cheap for a 16 GB checkpoint), documentation files in a directory
    (`DOCUMENTATION_SUFFIXES`) left out. None for a hub id or a built-in name."""
    if not source:
        return None
    root = Path(source)
    if not root.exists():
        return None
    base = root.parent if root.is_file() else root  # names are relative to the model's folder
    files = (
        [root]
        if root.is_file()
        else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in DOCUMENTATION_SUFFIXES
        )
    )
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(base)}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(EDGE_BYTES))
            if size > EDGE_BYTES:
                handle.seek(max(EDGE_BYTES, size - EDGE_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


@torch.no_grad()
def weights_digest(module: torch.nn.Module) -> str:
    """Digest of a model's state: every tensor's name, shape and dtype and `SAMPLES_PER_TENSOR`
    evenly strided values (as fp32). Changing a whole tensor, as a merged adapter does, changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
