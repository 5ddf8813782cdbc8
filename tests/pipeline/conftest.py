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


LINEARS_PER_BLOCK = 7  # the tiny models' q, k, v, o, gate, up, down


def quantize_killed_after_block_zero(monkeypatch, dllm, states, cfg, spec, error: BaseException) -> None:
    """Run `quantize_model` until the first Linear of block 1, where `error` is raised (a kill)."""
    from qdllm.pipeline import quantize as pipeline_module

    real, calls = pipeline_module.quantize_weight, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > LINEARS_PER_BLOCK:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "quantize_weight", dying)
    with pytest.raises(type(error)):
        pipeline_module.quantize_model(dllm, states, cfg, spec)
    monkeypatch.setattr(pipeline_module, "quantize_weight", real)
