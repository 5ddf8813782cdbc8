"""`python -m qdllm.analysis.outliers` end to end on tiny_llada, its errors and the --transform hook."""

import json
import subprocess
import sys
import types

import pandas as pd
import pytest

from qdllm.analysis.outliers import LAYER_TYPES, SUBSETS, main
from qdllm.errors import ConfigError
from qdllm.paths import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--model", "tiny_llada", "--samples", "2", "--seqlen", "16", "--plot-max-points", "8"]


def test_cli_writes_tables_json_and_figures(tmp_path):
    out = tmp_path / "outliers"
    env = {"PYTHONPATH": f"{REPO_ROOT / 'src'}:{REPO_ROOT}", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "qdllm.analysis.outliers", *SMALL, "--out", str(out), "--t", "0", "0.5", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert names == {
        "summary.csv",
        "summary.md",
        "layers.json",
        "surfaces.png",
        "massive_vs_mask_ratio.png",
        "max_median_per_block.png",
    }
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3 * len(LAYER_TYPES) * len(SUBSETS)
    assert set(summary["t"]) == {0.0, 0.5, 1.0} and set(summary["subset"]) == set(SUBSETS)
    clean_mask = summary[(summary["t"] == 0.0) & (summary["subset"] == "mask")]
    assert (clean_mask["tokens"] == 0).all()
    layers = json.loads((out / "layers.json").read_text())
    assert layers["meta"]["model"] == "tiny_llada" and layers["meta"]["blocks"] == 2
    assert len(layers["layers"]) == 3 * 2 * len(LAYER_TYPES)
    # the JSON's per-block records aggregate to the CSV's summary (max over blocks)
    rows = [r for r in layers["layers"] if r["t"] == 1.0 and r["layer_type"] == "ffn_out"]
    expected = max(r["stats"]["visible"]["max_abs"] for r in rows)
    got = summary[
        (summary["t"] == 1.0) & (summary["layer_type"] == "ffn_out") & (summary["subset"] == "visible")
    ]
    assert float(got["max_abs"].iloc[0]) == pytest.approx(expected)
    markdown = (out / "summary.md").read_text()
    assert "| t | layer_type | subset |" in markdown and "per block" in markdown
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--t", "1.5"], "t=1.5"),
        (["--t", "0.333"], "max_timesteps"),
        (["--samples", "0"], "--samples=0"),
        (["--massive-threshold", "0.5"], "--massive-threshold=0.5"),
        (["--plot-sample", "3"], "--plot-sample=3"),
    ],
)
def test_bad_arguments_exit_with_the_flag_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_plot_block_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not a config"):
        main(["--model", "no_such_model", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="--plot-block=5.*2 blocks"):
        main([*SMALL, "--out", str(tmp_path), "--t", "0", "--plot-block", "5"])


def test_transform_without_a_registry_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "qdllm.transforms", None)  # as in a checkout without the package
    with pytest.raises(SystemExit):
        main([*SMALL, "--out", str(tmp_path), "--transform", "smooth"])
    assert "no qdllm.transforms package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "qdllm.transforms", types.ModuleType("qdllm.transforms"))
    with pytest.raises(SystemExit):
        main([*SMALL, "--out", str(tmp_path), "--transform", "smooth"])
    assert "no TRANSFORMS registry" in capsys.readouterr().err


def test_transform_registry_runs_before_and_after(tmp_path, capsys, monkeypatch):
    """A stand-in registry entry doubling every FFN norm weight: each block's ffn_in input doubles
    relative to the same block's input, so block 0's ffn_in |x| doubles and its max/median stays."""

    def double_ffn_norm(dllm, windows):
        assert windows.shape == (2, 16)
        for block in dllm.blocks():
            block.get_submodule(dllm.anatomy().ffn_norm).weight.mul_(2.0)

    registry = types.ModuleType("qdllm.transforms")
    registry.TRANSFORMS = {"double_ffn_norm": double_ffn_norm}
    monkeypatch.setitem(sys.modules, "qdllm.transforms", registry)
    with pytest.raises(SystemExit):
        main([*SMALL, "--out", str(tmp_path), "--transform", "nope"])
    assert "use one of ['double_ffn_norm']" in capsys.readouterr().err

    paths = main([*SMALL, "--out", str(tmp_path), "--t", "0", "1", "--transform", "double_ffn_norm"])
    layers = json.loads(paths["layers_json"].read_text())["layers"]

    def block0(state, kind):
        (rec,) = [
            r
            for r in layers
            if r["state"] == state and r["t"] == 0.0 and r["block"] == 0 and r["layer_type"] == kind
        ]
        return rec["stats"]["all"]

    before, after = block0("original", "ffn_in"), block0("transformed:double_ffn_norm", "ffn_in")
    assert after["max_abs"] == pytest.approx(2 * before["max_abs"], rel=1e-6)
    assert after["max_median"] == pytest.approx(before["max_median"], rel=1e-6)
    assert block0("transformed:double_ffn_norm", "qkv") == block0("original", "qkv")
    summary = pd.read_csv(paths["summary_csv"])
    assert set(summary["state"]) == {"original", "transformed:double_ffn_norm"}
    assert len(summary) == 2 * 2 * len(LAYER_TYPES) * len(SUBSETS)
