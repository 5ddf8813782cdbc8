"""Calibration windows: raw text from local JSONL/text files or HF `datasets`, tokenized and cut.

Default offline source: `${data_root}/c4/c4_excerpt.jsonl` (field `text`). Cut like the paper's C4
windows (§4.1): documents in file order (or shuffled with `doc_order=random`), documents shorter than
`seqlen` tokens are skipped, one window of exactly `seqlen` tokens with a seeded random start is
taken from each accepted document, until `nsamples` windows exist.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from qdllm.errors import ConfigError, require

SOURCES = ("local", "hf")
DOC_ORDERS = ("file", "random")


class CalibrationDataError(ConfigError):
    """The calibration source is missing, unreadable or too small."""


@dataclass
class DataSpec:
    source: str = "local"  # local | hf
    path: str = "../shared/data/c4/c4_excerpt.jsonl"  # local file (.jsonl with `field`, or .txt)
    field: str = "text"
    hf_dataset: str = "allenai/c4"
    hf_config: str | None = "en"
    hf_split: str = "train"
    hf_data_files: str | None = "en/c4-train.00000-of-01024.json.gz"
    nsamples: int = 128
    seqlen: int = 4096
    seed: int = 42
    doc_order: str = "file"  # file | random

    def validated(self) -> DataSpec:
        """Check every field; errors name the Hydra key (`calib.<field>`)."""
        require(self.source in SOURCES, "calib.source", self.source, f"use one of {SOURCES}")
        require(self.nsamples >= 1, "calib.nsamples", self.nsamples, "must be >= 1")
        require(self.seqlen >= 2, "calib.seqlen", self.seqlen, "must be >= 2 tokens")
        require(self.doc_order in DOC_ORDERS, "calib.doc_order", self.doc_order, f"use one of {DOC_ORDERS}")
        return self


def load_texts(spec: DataSpec) -> list[str]:
    spec.validated()
    if spec.source == "local":
        path = Path(spec.path)
        if not path.is_file():
            raise CalibrationDataError(
                f"calib.path={spec.path!r} does not exist; point it at a JSONL or text file "
                "(the shared data root holds c4/c4_excerpt.jsonl)"
            )
        if path.suffix == ".jsonl" or path.suffix == ".json":
            texts = []
            with path.open() as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        row = json.loads(line)
                        if spec.field not in row:
                            raise CalibrationDataError(
                                f"{path}:{line_no} has no field {spec.field!r} (calib.field)"
                            )
                        texts.append(row[spec.field])
            return texts
        return [t for t in path.read_text().split("\n\n\n") if t.strip()]
    try:
        import datasets

        ds = datasets.load_dataset(
            spec.hf_dataset,
            spec.hf_config,
            split=spec.hf_split,
            data_files={spec.hf_split: spec.hf_data_files} if spec.hf_data_files else None,
        )
    except Exception as exc:
        raise CalibrationDataError(
            f"calib.source=hf: could not load {spec.hf_dataset!r} ({type(exc).__name__}: {exc}); "
            "without hub access use calib.source=local"
        ) from exc
    return list(ds[spec.field])


def calibration_windows(texts: list[str], tokenizer, spec: DataSpec) -> torch.Tensor:
    """(nsamples, seqlen) int64 token windows, seeded."""
    rng = random.Random(spec.seed)
    order = list(range(len(texts)))
    if spec.doc_order == "random":
        rng.shuffle(order)
    windows, accepted_tokens = [], 0
    for index in order:
        ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"]
        if len(ids) < spec.seqlen:
            continue
        start = rng.randint(0, len(ids) - spec.seqlen)
        windows.append(ids[start : start + spec.seqlen])
        accepted_tokens += len(ids)
        if len(windows) == spec.nsamples:
            return torch.tensor(windows, dtype=torch.int64)
    raise CalibrationDataError(
        f"corpus too small: only {len(windows)} of {len(texts)} documents have >= {spec.seqlen} tokens, "
        f"but calib.nsamples={spec.nsamples}; lower calib.nsamples or calib.seqlen, or use a larger corpus"
    )
