"""The analysis API and notebooks on the results of a real tiny sweep."""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis import load_layers, load_runs, order_map, table1, table2, table3
from tests.app.conftest import REPO, app_env, run_cli

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((REPO / "analysis" / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    """Two tiny sweeps: a Table-1 grid (2 models x FP, GPTQ, Quant-dLLM) and a Table-2b grid."""
    root = tmp_path_factory.mktemp("results")
    sweeps = {
        "table1_test": ["model=tiny_llada,tiny_dream", "quant=none,gptq,daq"],
        "table2b_test": ["model=tiny_llada", "abmp.ratio=0.0,0.1"],
    }
    for name, grid in sweeps.items():
        proc = run_cli("debug=tiny_cpu", f"task_name={name}", f"hydra.sweep.dir={root / name}", *grid, "-m")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


def test_load_runs_has_one_row_per_job(results_root):
    runs = load_runs(results_root)
    assert len(runs) == 8 and set(runs["status"]) == {"ok"}
    assert set(runs["label"]) == {"FP", "GPTQ", "Quant-dLLM"}


def test_table1_reproduces_the_recorded_metrics(results_root):
    table = table1(load_runs(results_root))
    expected = {
        (r["config"]["model"]["name"], r["config"]["quant"]["method"]): r["eval"]["ppl"]["ppl"]
        for r in _records(results_root / "table1_test")
    }
    labels = {"none": "FP", "gptq": "GPTQ", "daq": "Quant-dLLM"}
    assert len(table) == len(expected) == 6
    for (model, method), value in expected.items():
        assert table.loc[(model, labels[method]), "ppl"] == pytest.approx(value)
        assert table.loc[(model, labels[method]), "avg"] == pytest.approx(value)
    assert list(table.index.get_level_values("method")[:3]) == ["FP", "GPTQ", "Quant-dLLM"]


def test_table2_b_pivots_the_abmp_ratio_of_its_own_sweep(results_root):
    table = table2(load_runs(results_root), "b")
    expected = {
        r["config"]["abmp"]["ratio"]: r["eval"]["ppl"]["ppl"] for r in _records(results_root / "table2b_test")
    }
    assert list(table.columns) == [0.0, 0.1] and list(table.index) == ["tiny_llada"]
    for ratio, value in expected.items():
        assert table.loc["tiny_llada", ratio] == pytest.approx(value)
    with pytest.raises(ValueError, match="part"):
        table2(load_runs(results_root), "e")


def test_table3_memory_counts_unquantized_tensors_at_16_bits(results_root):
    runs = load_runs(results_root)
    table = table3(runs)
    fp = runs[(runs["method"] == "none") & (runs["model"] == "tiny_llada")].iloc[0]
    assert table.loc[("tiny_llada", "FP"), "memory_gb"] == pytest.approx(fp["model.n_params"] * 2 / 1e9)
    assert table.loc[("tiny_llada", "Quant-dLLM"), "bits"] == pytest.approx(2.0)
    assert table.loc[("tiny_llada", "GPTQ"), "bits"] == pytest.approx(2.0)
    assert (table["memory_gb"] < table.loc[("tiny_llada", "FP"), "memory_gb"] + 1e-12).all()


def test_order_map_lists_every_group_of_every_linear(results_root):
    runs = load_runs(results_root / "table2b_test")
    layers = load_layers(runs[runs["config.abmp.ratio"] == 0.1])
    grid = order_map(layers)
    assert grid.shape[0] == len(layers) == 14
    assert grid.notna().sum(axis=1).tolist() == [len(json.loads(o)) for o in layers["orders"]]
    assert set(grid.stack().dropna().unique()) == {1.0, 2.0, 3.0}  # ABMP moved groups both ways


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_execute(results_root, path, monkeypatch):
    for key, value in {**app_env(), "QDLLM_RESULTS": str(results_root), "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) or "text/html" in o.get("data", {}) for o in outputs)
    assert os.environ["QDLLM_RESULTS"] == str(results_root)
