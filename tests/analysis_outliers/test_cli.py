"""`python -m qdllm.analysis.outliers` end to end on tiny_llada, its errors and the --transform hook."""

import json
import subprocess
import sys

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


def test_transform_runs_before_and_after(tmp_path, capsys):
    """SmoothQuant (default sites qkv, ffn_in, attn_out) rescales the qkv input channels, but the
    ffn_out input (silu(gate) * up) is the same function before and after: its statistics agree."""
    with pytest.raises(SystemExit):
        main([*SMALL, "--out", str(tmp_path), "--transform", "nope"])
    assert "use one of" in capsys.readouterr().err

    paths = main([*SMALL, "--out", str(tmp_path), "--t", "0", "1", "--transform", "smoothquant"])
    layers = json.loads(paths["layers_json"].read_text())["layers"]

    def stats(state, kind):
        (rec,) = [
            r
            for r in layers
            if r["state"] == state and r["t"] == 0.0 and r["block"] == 0 and r["layer_type"] == kind
        ]
        return rec["stats"]["all"]

    after = "transformed:smoothquant"
    assert stats(after, "qkv")["max_abs"] != pytest.approx(stats("original", "qkv")["max_abs"], rel=1e-3)
    for key in ("max_abs", "kurtosis", "max_median"):
        assert stats(after, "ffn_out")[key] == pytest.approx(stats("original", "ffn_out")[key], rel=1e-4)
    summary = pd.read_csv(paths["summary_csv"])
    assert set(summary["state"]) == {"original", after}
    assert len(summary) == 2 * 2 * len(LAYER_TYPES) * len(SUBSETS)
