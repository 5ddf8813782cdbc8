"""analysis.smol's estimator table on hand-made rows (means checked by hand arithmetic)."""

import math

import pandas as pd
import pytest

from analysis.smol import HEADLINE, TASKS, smol_fp_estimators


def _row(experiment, estimator, mc_num, scores):
    row = {"experiment": experiment, "estimator": estimator, "mc_num": mc_num}
    for task in TASKS:
        row[f"{task}.{HEADLINE[task]}"] = scores.get(task, math.nan)
        row[f"{task}.{HEADLINE[task]}_stderr"] = 0.01
        row[f"{task}.n"] = 300
    return row


def test_estimator_table_means_and_ratio_to_the_ar_base():
    five = dict(zip(TASKS, [0.6, 0.5, 0.3, 0.4, 0.5]))  # mean 0.46
    chain = dict(zip(TASKS, [0.6, 0.46, 0.23, 0.41, 0.5]))  # mean 0.44
    rows = pd.DataFrame(
        [
            _row("ar_base", None, None, five),
            _row("smol_fp_chain", "chain", 32, chain),
            _row("smol_fp_mc128", "dream", 128, {"piqa": 0.57}),
            _row("smol_table1", "dream", 32, five),  # not an FP estimator row
        ]
    )
    table = smol_fp_estimators(rows).set_index("experiment")
    assert list(table.index) == ["ar_base", "smol_fp_chain", "smol_fp_mc128"]
    assert table.loc["smol_fp_chain", "mean_acc"] == pytest.approx(0.44)
    assert table.loc["smol_fp_chain", "of_ar_base"] == pytest.approx(0.44 / 0.46)
    assert math.isnan(table.loc["smol_fp_chain", "mc_num"])  # the chain draws no masks
    assert math.isnan(table.loc["smol_fp_mc128", "mean_acc"])  # PIQA alone has no five-task mean
    assert table.loc["smol_fp_mc128", "piqa.acc"] == 0.57
