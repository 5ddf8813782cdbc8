"""Helpers for the Hydra app: compose configs in-process, run `run.py` in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qdllm.config import register_configs
from qdllm.paths import data_root

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
DATA_ROOT = data_root().resolve()


def app_env() -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PROJECT_ROOT": str(REPO),
        "QDLLM_DATA_ROOT": str(DATA_ROOT),
    }


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python run.py <args>` from the repository root, offline, W&B disabled."""
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_record(job_dir: Path) -> dict:
    return json.loads((job_dir / "results.json").read_text())


@pytest.fixture
def composer(tmp_path, monkeypatch):
    """compose(overrides) -> DictConfig of conf/run.yaml, output dir in tmp_path."""
    monkeypatch.setenv("PROJECT_ROOT", str(REPO))
    monkeypatch.setenv("QDLLM_DATA_ROOT", str(DATA_ROOT))
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):

        def _compose(*overrides: str):
            # no `make data` extraction: the same answers with and without one on this machine
            fixed = [f"paths.output_dir={tmp_path}", f"paths.eval_data_dir={tmp_path / 'no_eval_data'}"]
            return compose("run", overrides=[*fixed, *overrides])

        yield _compose
    GlobalHydra.instance().clear()
