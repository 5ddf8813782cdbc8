"""The QDLM-study table: paired differences against a brute-force recomputation, grades, and the
table from hand-made job folders."""

import json
import math

import numpy as np
import pytest

from analysis.qdlm import grade, load_rows, paired_difference, study_table


def test_paired_difference_matches_a_float64_recomputation_on_shared_documents():
    rng = np.random.default_rng(0)
    fp_scores, row_scores = rng.integers(0, 2, 50).astype(float), rng.integers(0, 2, 50).astype(float)
    fp = {"doc_id": list(range(50)), "acc": fp_scores.tolist()}
    # the row scored the documents in another order and one document fewer
    order = rng.permutation(50)[:49]
    row = {"doc_id": order.tolist(), "acc": row_scores[order].tolist()}
    mean, se, n = paired_difference(row, fp, "acc")
    d = row_scores[order] - fp_scores[order]
    assert n == 49 and mean == pytest.approx(d.sum() / 49)
    assert se == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum() / 48 / 49))


def test_identical_rows_have_zero_difference_and_no_documents_is_an_error():
    fp = {"doc_id": [0, 1, 2], "acc": [1.0, 0.0, 1.0]}
    assert paired_difference(fp, fp, "acc") == (0.0, 0.0, 3)
    with pytest.raises(ValueError, match="no document"):
        paired_difference({"doc_id": [7], "acc": [1.0]}, fp, "acc")


def test_grades_follow_the_study_bounds():
    assert [grade(x) for x in (-0.05, 0.0099, 0.01, 0.0399, 0.04, 0.5)] == [
        "< 1 %", "< 1 %", "1-4 %", "1-4 %", "> 4 %", "> 4 %"
    ]  # fmt: skip


def _job(root, name, accs, ok=True):
    folder = root / name
    folder.mkdir()
    tasks = {"piqa": "acc", "arc_easy": "acc_norm", "arc_challenge": "acc_norm"}
    record = {
        "status": "ok" if ok else "failed",
        "eval": {t: {m: float(np.mean(accs[t]))} for t, m in tasks.items()},
        "quant": {"bits_per_weight": 4.0, "seconds": 2.0, "transform": {"seconds": 1.0}},
    }
    (folder / "results.json").write_text(json.dumps(record))
    scores = {t: {"doc_id": list(range(len(accs[t]))), m: accs[t]} for t, m in tasks.items()}
    (folder / "lm_eval_results.json").write_text(json.dumps({"per_document": scores}))


def test_table_from_job_folders(tmp_path):
    fp = {
        "piqa": [1.0, 1.0, 0.0, 1.0],
        "arc_easy": [1.0, 0.0, 1.0, 1.0],
        "arc_challenge": [0.0, 1.0, 1.0, 0.0],
    }
    worse = {
        "piqa": [1.0, 0.0, 0.0, 1.0],
        "arc_easy": [1.0, 0.0, 1.0, 1.0],
        "arc_challenge": [0.0, 1.0, 0.0, 0.0],
    }
    _job(tmp_path, "fp", fp)
    _job(tmp_path, "gptq_w3a16", worse)
    _job(tmp_path, "broken", worse, ok=False)
    table = study_table(load_rows(tmp_path)).set_index(["row", "task"])
    assert "broken" not in table.index.get_level_values(0)
    piqa = table.loc[("gptq_w3a16", "piqa")]
    assert piqa.paired_diff == pytest.approx(-0.25) and piqa.relative_drop == pytest.approx(1 / 3)
    general = table.loc[("gptq_w3a16", "general")]
    # the mean of the three task differences (-1/4, 0, -1/4); SE from the tasks' SEs (0.25, 0, 0.25)
    assert general.paired_diff == pytest.approx(-1 / 6) and general.grade == "> 4 %"
    assert general.paired_se == pytest.approx(math.sqrt(2 * 0.25**2) / 3) and general.documents == 12
    assert table.loc[("fp", "general")].paired_diff == 0.0 and table.loc[("fp", "piqa")].quantize_s == 3.0


def test_a_sweep_without_the_fp_row_is_refused(tmp_path):
    _job(tmp_path, "gptq_w4a16", {"piqa": [1.0], "arc_easy": [1.0], "arc_challenge": [1.0]})
    with pytest.raises(FileNotFoundError, match="'fp'"):
        load_rows(tmp_path)
