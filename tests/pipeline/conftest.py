import pytest

from qdllm.paths import data_root

DATA_ROOT = data_root()


@pytest.fixture
def c4_path() -> str:
    path = DATA_ROOT / "c4" / "c4_excerpt.jsonl"
    if not path.is_file():
        pytest.fail(f"calibration text not found at {path}; the repository ships it under data/")
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
