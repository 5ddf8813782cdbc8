"""Training text for the adaptation: documents from the data root, tokenised into one uint16 stream.

Documents are Gutenberg books (boundaries from `gutenberg/books.tsv`) and C4 excerpt rows; each is
followed by the document token, so a window that crosses a boundary sees it as a real LM would.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qdllm.errors import ConfigError


def gutenberg_books(root: Path, shards: list[str]) -> Iterator[str]:
    """Each book of the named shards (e.g. "train-00"), cut at the byte sizes listed in books.tsv."""
    index = root / "gutenberg" / "books.tsv"
    if not index.is_file():
        raise ConfigError(
            f"adapt.data.root={str(root)!r} has no gutenberg/books.tsv; point it at a data folder "
            "laid out like the repository's data/ (QDLLM_DATA_ROOT)"
        )
    rows = list(csv.DictReader(index.open(encoding="utf-8"), delimiter="\t"))
    for shard in shards:
        path = root / "gutenberg" / f"{shard}.txt"
        if not path.is_file():
            raise ConfigError(
                f"adapt.data.root={str(root)!r} has no gutenberg/{shard}.txt: the repository ships only the "
                "validation shard; set QDLLM_DATA_ROOT to a folder holding the Gutenberg training shards"
            )
        data = path.read_bytes()
        offset = 0
        for row in (r for r in rows if r["split"] == shard):
            size = int(row["bytes"])
            yield data[offset : offset + size].decode("utf-8")
            offset += size + 3  # books are separated by "\n\n\n"


def jsonl_texts(path: Path, field: str = "text") -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)[field]


def tokenize_documents(docs: Iterator[str], tokenizer, doc_token_id: int, desc: str) -> np.ndarray:
    """One (N,) uint16 stream: each document's tokens followed by `doc_token_id`."""
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens; the uint16 token stream holds at most 65536"
        )
    parts = []
    for text in tqdm(docs, desc=desc, unit="doc"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        parts.append(np.asarray(ids + [doc_token_id], dtype=np.uint16))
    return np.concatenate(parts)


def random_windows(
    tokens: np.ndarray, batch: int, length: int, doc_token_id: int, generator: torch.Generator
) -> torch.Tensor:
    """(batch, length) int64: the document token, then `length - 1` tokens from a random offset."""
    span = length - 1
    if len(tokens) <= span:
        raise ConfigError(f"the token stream has {len(tokens)} tokens, fewer than adapt.seq_len={length}")
    starts = torch.randint(0, len(tokens) - span, (batch,), generator=generator).numpy()
    body = np.stack([tokens[s : s + span] for s in starts]).astype(np.int64)
    first = np.full((batch, 1), doc_token_id, dtype=np.int64)
    return torch.from_numpy(np.concatenate([first, body], axis=1))
