"""Tables of the small real model (smol_dllm, docs/RESULTS.md) from its job directories.

    python -m analysis.smol --runs <dir of jobs> [--ar ar_base.json] --out experiments/results/smol_dllm/gpu

writes `runs.csv` (one row per job: method, bits, effective bits, ELBO perplexity, each task's
headline metric with its stderr, timings), `table1.csv` (Table 1 analogue, with the AR base row
when `--ar` is given), `table2_<part>.csv` for each ablation with jobs (`smol_table2`, whose default
point is Table 1's Quant-dLLM 2-bit job) and `fp_estimators.csv` (the FP model under each likelihood
estimator, `smol_fp_estimators`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis.runs import load_runs
from qdllm.eval.likelihood import resolve_estimator

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
# lm-eval's headline metric per task (length-normalised where the choices differ in length)
HEADLINE = {
    "piqa": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
}
ABLATIONS = {
    "mcs": ("config.calib.mcs", "MCS"),
    "abmp": ("config.abmp.ratio", "ABMP ratio"),
    "daq": ("daq_component", "DAQ component"),
    "calib": ("config.calib.nsamples", "calibration sequences"),
    "comp": ("config.quant.compensation", "compensation"),
}
DAQ_COMPONENTS = {(False, False): "baseline", (True, False): "RSR w/o DOR", (True, True): "RSR w/ DOR"}
FP_ESTIMATOR_EXPERIMENTS = ("smol_fp", "smol_fp_mc128", "smol_fp_chain", "smol_fp_chain_full")


def _bits(runs: pd.DataFrame) -> pd.Series:
    nominal = runs["config.quant.bits"].where(runs["method"] != "daq", runs["config.quant.order"])
    return nominal.where(runs["method"] != "none", 16).astype(int)


def smol_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished job with the numbers the smol tables use (NaN where not measured)."""
    ok = runs[runs["status"] == "ok"].copy()
    out = pd.DataFrame(
        {
            "experiment": ok["config.task_name"],
            "method": ok["label"],
            "bits": _bits(ok),
            "bits_per_weight": ok.get("quant.bits_per_weight", pd.Series(index=ok.index, dtype=float)).fillna(
                16.0
            ),
            "calib": ok["config.calib.name"],
            "calib_nsamples": ok["config.calib.nsamples"],
            "calib_seqlen": ok["config.calib.seqlen"],
            "abmp_ratio": ok["config.abmp.ratio"].where(ok["method"] == "daq"),
            "rsr": ok["config.quant.rsr"].where(ok["method"] == "daq"),
            "dor": ok["config.quant.dor"].where(ok["method"] == "daq"),
            "compensation": ok["config.quant.compensation"],
            "device": ok["config.model.device"],
            "estimator": list(map(resolve_estimator, ok["config.eval.estimator"], ok["config.model.family"])),
            "mc_num": ok["config.eval.mc_num"],
        }
    )
    for key in ("ppl", "nll", "nll_stderr", "windows"):
        out[f"ppl.{key}"] = ok.get(f"eval.ppl.{key}")
    for task in TASKS:
        metric = HEADLINE[task]
        for suffix in ("", "_stderr"):
            out[f"{task}.{metric}{suffix}"] = ok.get(f"eval.{task}.{metric}{suffix}")
        out[f"{task}.n"] = ok.get(f"eval.{task}.n")
    scored = [f"{t}.{HEADLINE[t]}" for t in TASKS if out[f"{t}.{HEADLINE[t]}"].notna().any()]
    out["mean_acc"] = out[scored].mean(axis=1) if scored else float("nan")
    out["quant_seconds"] = ok.get("quant.seconds")
    out["eval_seconds"] = ok.get("timing.eval")
    return out.sort_values(["experiment", "method", "bits"], kind="stable").reset_index(drop=True)


def ar_base_row(path: str | Path) -> pd.DataFrame:
    """The AR base model's lm-eval scores (experiments/eval_ar_base.py) as a `smol_runs` row."""
    record = json.loads(Path(path).read_text())
    row = {
        "experiment": "ar_base",
        "method": "AR base (SmolLM2-135M-Instruct)",
        "bits": 16,
        "bits_per_weight": 16.0,
    }
    for task in TASKS:
        metric = HEADLINE[task]
        values = record["metrics"][task]
        row[f"{task}.{metric}"] = values[metric]
        row[f"{task}.{metric}_stderr"] = values[f"{metric}_stderr"]
        row[f"{task}.n"] = values.get("n")
    row["mean_acc"] = sum(row[f"{t}.{HEADLINE[t]}"] for t in TASKS) / len(TASKS)
    return pd.DataFrame([row])


def smol_table1(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 1 analogue: FP, AR base and every method x bits; headline metric per task, mean, perplexity."""
    table1 = rows[rows["experiment"].isin(["smol_fp", "smol_table1", "ar_base"])]
    columns = [
        "method",
        "bits",
        "bits_per_weight",
        "ppl.ppl",
        *(f"{t}.{HEADLINE[t]}" for t in TASKS),
        "mean_acc",
    ]
    return table1.sort_values(["bits", "method"], ascending=[False, True])[columns].reset_index(drop=True)


def smol_table2(rows: pd.DataFrame, part: str) -> pd.DataFrame:
    """Ablation `part` (ABLATIONS) of Quant-dLLM at 2 bits: its own jobs plus Table 1's default job."""
    factor, _ = ABLATIONS[part]
    default = rows[
        (rows["experiment"] == "smol_table1") & (rows["method"] == "Quant-dLLM") & (rows["bits"] == 2)
    ]
    mine = rows[rows["experiment"] == f"smol_table2{'abcde'[list(ABLATIONS).index(part)]}_{part}"]
    both = pd.concat([default, mine]).copy()
    both["daq_component"] = [DAQ_COMPONENTS.get((bool(r), bool(d))) for r, d in zip(both["rsr"], both["dor"])]
    both["config.calib.mcs"] = both["calib"].eq("mcs")
    both = both.rename(columns={"abmp_ratio": "config.abmp.ratio", "calib_nsamples": "config.calib.nsamples"})
    both["config.quant.compensation"] = both["compensation"].replace({"auto": "diag (auto)"})
    columns = [
        factor,
        "ppl.ppl",
        "ppl.nll",
        "ppl.nll_stderr",
        *(f"{t}.{HEADLINE[t]}" for t in TASKS),
        "mean_acc",
    ]
    return both[columns].sort_values(factor, kind="stable").reset_index(drop=True)


def smol_fp_estimators(rows: pd.DataFrame) -> pd.DataFrame:
    """The FP model's accuracies under each likelihood estimator (MC ELBO with 32 / 128 masks, the
    chain rule), beside the AR base; `of_ar_base` = mean accuracy / the AR base's mean (NaN where
    a row lacks a task)."""
    fp = rows[rows["experiment"].isin(FP_ESTIMATOR_EXPERIMENTS)].copy()
    fp["mc_num"] = fp["mc_num"].where(fp["estimator"] != "chain")
    ar = rows[rows["experiment"] == "ar_base"]
    both = pd.concat([ar.assign(estimator="autoregressive (lm-eval HFLM)"), fp], ignore_index=True)
    columns = ["experiment", "estimator", "mc_num"]
    for task in TASKS:
        columns += [f"{task}.{HEADLINE[task]}", f"{task}.{HEADLINE[task]}_stderr", f"{task}.n"]
    table = both[columns].reset_index(drop=True)
    # a mean over the five tasks only: an estimator run on some tasks has none
    table["mean_acc"] = table[[f"{t}.{HEADLINE[t]}" for t in TASKS]].mean(axis=1, skipna=False)
    if len(ar):
        table["of_ar_base"] = table["mean_acc"] / table["mean_acc"].iloc[0]
    return table


def smol_cpu_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The laptop-scale CPU grid (experiment smol_cpu): one row per variant, ELBO perplexity."""
    cpu = rows[rows["experiment"] == "smol_cpu"].copy()
    variant = cpu["method"].astype(str)
    daq = cpu["method"] == "Quant-dLLM"
    component = [DAQ_COMPONENTS.get((bool(r), bool(d))) for r, d in zip(cpu["rsr"], cpu["dor"])]
    variant = variant.where(
        ~daq, [f"Quant-dLLM ({c})" if c != "RSR w/ DOR" else "Quant-dLLM" for c in component]
    )
    variant = variant.where(~(daq & cpu["calib"].ne("mcs")), variant + ", no MCS")
    variant = variant.where(~(daq & cpu["abmp_ratio"].eq(0)), variant + ", no ABMP")
    cpu["variant"] = variant
    columns = ["variant", "bits", "bits_per_weight", "ppl.ppl", "ppl.nll", "ppl.nll_stderr", "quant_seconds"]
    return cpu[columns].sort_values("ppl.nll", kind="stable").reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--ar", type=Path, help="ar_base.json from experiments/eval_ar_base.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = smol_runs(load_runs(args.runs))
    if args.ar:
        rows = pd.concat([rows, ar_base_row(args.ar)], ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out / "runs.csv", index=False, float_format="%.6g")
    table = smol_table1(rows)
    table.to_csv(args.out / "table1.csv", index=False, float_format="%.6g")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for part in ABLATIONS:
        ablation = smol_table2(rows, part)
        if len(ablation):
            ablation.to_csv(args.out / f"table2_{part}.csv", index=False, float_format="%.6g")
    estimators = smol_fp_estimators(rows)
    if len(estimators):
        estimators.to_csv(args.out / "fp_estimators.csv", index=False, float_format="%.6g")
    if (rows["experiment"] == "smol_cpu").any():
        smol_cpu_table(rows).to_csv(args.out / "cpu_ablation.csv", index=False, float_format="%.6g")


if __name__ == "__main__":
    main()
