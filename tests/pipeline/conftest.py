import os
from pathlib import Path

import pytest

DATA_ROOT = Path(
    os.environ.get("QDLLM_DATA_ROOT", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
)


@pytest.fixture
def c4_path() -> str:
    path = DATA_ROOT / "c4" / "c4_excerpt.jsonl"
    if not path.is_file():
        pytest.fail(f"shared data not found at {path}; set QDLLM_DATA_ROOT")
    return str(path)
