"""Where qdllm's bundled offline data lives.

The repository ships the files the tests, the default run and the small experiments read under `data/`
(see `data/README.md`). `QDLLM_DATA_ROOT` points at another folder with the same layout, e.g. one that also
holds files qdllm may not redistribute (GPQA) or the Gutenberg training shards.
"""

from __future__ import annotations

import os
from pathlib import Path

from qdllm.errors import ConfigError

DATA_ROOT_ENV = "QDLLM_DATA_ROOT"
REPO_ROOT = Path(__file__).resolve().parents[2]  # src/qdllm/paths.py -> the repository
BUNDLED_DATA = REPO_ROOT / "data"
CONF_DIR = REPO_ROOT / "conf"  # the Hydra configs (`qdllm.load("<conf/model name>")` reads them)
DEFAULT_CALIBRATION_FILE = "c4/c4_excerpt.jsonl"


def data_root() -> Path:
    """The data folder: `$QDLLM_DATA_ROOT` when set, else the repository's `data/`.

    Raises ConfigError when the folder does not exist (a non-editable install has no `data/`).
    """
    configured = os.environ.get(DATA_ROOT_ENV)
    root = Path(configured) if configured else BUNDLED_DATA
    if not root.is_dir():
        origin = f"${DATA_ROOT_ENV}={configured!r}" if configured else f"the bundled data folder {root}"
        raise ConfigError(
            f"{origin} does not exist; set {DATA_ROOT_ENV} to a folder laid out like the repository's data/ "
            "(or install qdllm from a clone of the repository with `pip install -e .`)"
        )
    return root


def data_file(relative: str) -> Path:
    """`relative` (e.g. "c4/c4_excerpt.jsonl") under `data_root()`."""
    return data_root() / relative
