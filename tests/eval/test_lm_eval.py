"""lm-eval integration on local task files with tiny models (offline)."""

import contextlib
import json
import os
import shutil

import datasets
import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from qdllm.errors import ConfigError
from qdllm.eval.likelihood import MCSpec
from qdllm.eval.lm import DiffusionEvalLM
from qdllm.eval.sampler import GenSpec
from qdllm.eval.tasks import mmlu_subjects, write_local_tasks
from qdllm.models import load_dllm
from tests.app.conftest import DATA_ROOT, REPO, read_record, run_cli

TASKS = ["arc_easy", "bbh_zeroshot_boolean_expressions"]


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    directory = write_local_tasks(TASKS, DATA_ROOT, tmp_path_factory.mktemp("tasks"))
    return TaskManager(include_path=str(directory), include_defaults=False)


def evaluate(family, task_manager, seed=0):
    lm = DiffusionEvalLM(
        load_dllm({"family": family, "source": "tiny", "seed": seed}),
        MCSpec(estimator="llada" if family == "llada" else "dream", mc_num=2, mc_batch=2),
        GenSpec(gen_length=8, steps=4, block_length=8),
        seed=1,
    )
    out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=3, task_manager=task_manager, log_samples=True)
    return out, lm


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_local_multiple_choice_and_generation_tasks_run_end_to_end(task_manager, family):
    out, lm = evaluate(family, task_manager)
    arc, bbh = out["results"]["arc_easy"], out["results"]["bbh_zeroshot_boolean_expressions"]
    assert arc["sample_len"] == 3 and 0 <= arc["acc,none"] <= 1 and "acc_norm,none" in arc
    assert bbh["sample_len"] == 3 and "exact_match,flexible-extract" in bbh
    samples = out["samples"]["bbh_zeroshot_boolean_expressions"]  # one entry per document and filter
    assert {s["doc_id"] for s in samples} == {0, 1, 2}
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
    # each arc_easy document scores one request per choice, each bbh document one generation
    n_choices = sum(
        len(s["doc"]["choices"]["text"]) for s in out["samples"]["arc_easy"] if s["filter"] == "none"
    )
    assert lm.requests_done == n_choices + 3


def test_scores_are_deterministic_under_the_seed(task_manager):
    first, _ = evaluate("llada", task_manager)
    second, _ = evaluate("llada", task_manager)
    scores = lambda out: [s["resps"] for s in out["samples"]["arc_easy"]]  # noqa: E731
    assert scores(first) == scores(second)


def test_local_files_are_checked_against_the_official_row_counts(tmp_path):
    write_local_tasks(["arc_easy", "piqa", "gsm8k"], DATA_ROOT, tmp_path / "ok")  # the real files pass
    short = tmp_path / "data" / "tasks" / "arc" / "corrected"
    short.mkdir(parents=True)
    lines = (DATA_ROOT / "tasks/arc/corrected/arc_easy_test.jsonl").read_text().splitlines()[:100]
    (short / "arc_easy_test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="100 rows, the official split has 2376"):
        write_local_tasks(["arc_easy"], tmp_path / "data", tmp_path / "out")
    with pytest.raises(ConfigError, match="eval.tasks"):
        write_local_tasks(["truthfulqa_mc2"], DATA_ROOT, tmp_path / "out")
    shutil.rmtree(tmp_path / "data")


@pytest.mark.skipif(
    not (DATA_ROOT / "tasks/gpqa/gpqa_diamond.csv").is_file(),
    reason="GPQA is not redistributed; QDLLM_DATA_ROOT must hold tasks/gpqa/gpqa_diamond.csv",
)
def test_gpqa_copy_has_the_official_size(tmp_path):
    write_local_tasks(
        ["gpqa_diamond_zeroshot", "gpqa_diamond_n_shot"], DATA_ROOT, tmp_path
    )  # 198 rows checked


def test_piqa_labels_are_merged_in_order(tmp_path):
    out = write_local_tasks(["piqa"], DATA_ROOT, tmp_path)
    rows = [json.loads(line) for line in (out / "piqa_validation.jsonl").read_text().splitlines()]
    labels = (DATA_ROOT / "tasks/piqa/valid-labels.lst").read_text().split()
    assert [r["label"] for r in rows] == [int(x) for x in labels] and len(rows) == 1838


@pytest.mark.slow
def test_run_py_eval_smoke_writes_task_metrics(tmp_path):
    proc = run_cli("debug=tiny_cpu", "eval=smoke", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_record(tmp_path)
    assert set(record["eval"]) == {"arc_easy", "piqa", "bbh_zeroshot_boolean_expressions"}
    assert record["eval"]["arc_easy"]["n"] == 3 and 0 <= record["eval"]["piqa"]["acc"] <= 1
    # per-document scores, for paired comparisons: their mean is the reported accuracy
    per_doc = json.loads((tmp_path / "lm_eval_results.json").read_text())["per_document"]
    for task in ("arc_easy", "piqa"):
        scores = per_doc[task]
        assert sorted(scores["doc_id"]) == list(range(3)) and set(scores["acc"]) <= {0.0, 1.0}
        assert sum(scores["acc"]) / 3 == pytest.approx(record["eval"][task]["acc"])


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("before", [None, "0"], ids=["unset", "set_to_0"])
def test_local_data_is_offline_only_during_run_lm_eval(composer, monkeypatch, before, fails):
    """`datasets` is offline while lm-eval runs on local files; afterwards the variable and the
    flag `datasets` reads are as they were, also when the evaluation raises."""
    from qdllm.eval.runner import run_lm_eval

    if before is None:
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_DATASETS_OFFLINE", before)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    seen = {}

    def evaluate_and_record(**kwargs):
        seen.update(env=os.environ.get("HF_DATASETS_OFFLINE"), flag=datasets.config.HF_HUB_OFFLINE)
        if fails:
            raise RuntimeError("evaluation died")
        return {"results": {task: {"acc,none": 0.5} for task in kwargs["tasks"]}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate_and_record)
    dllm = load_dllm({"family": "llada", "source": "tiny"})
    with pytest.raises(RuntimeError, match="died") if fails else contextlib.nullcontext():
        run_lm_eval(dllm, composer("eval=smoke").eval, ["arc_easy"])
    assert seen == {"env": "1", "flag": True}
    assert os.environ.get("HF_DATASETS_OFFLINE") == before and datasets.config.HF_HUB_OFFLINE is False


def test_code_tasks_need_the_explicit_opt_in(composer):
    from qdllm.config import resolve_job

    with pytest.raises(ConfigError, match="confirm_run_unsafe_code"):
        resolve_job(composer("eval=code"))


OLMO_ROOT = REPO / ".data" / "eval"
needs_olmo = pytest.mark.skipif(not (OLMO_ROOT / ".complete").exists(), reason="run `make data` first")


@needs_olmo
def test_make_data_copies_match_the_official_splits(tmp_path):
    write_local_tasks(["hellaswag", "winogrande"], DATA_ROOT, tmp_path, OLMO_ROOT)  # row counts checked
    from qdllm.eval.tasks import _rows, local_tasks

    tasks = local_tasks()
    mmlu_test = sum(_rows(OLMO_ROOT / tasks[f"mmlu_{s}"].files["test"]) for s in mmlu_subjects())
    assert len(mmlu_subjects()) == 57 and mmlu_test == 14042


@needs_olmo
def test_mmlu_group_runs_from_the_local_copy(tmp_path):
    manager = TaskManager(
        include_path=str(write_local_tasks(["mmlu"], DATA_ROOT, tmp_path, OLMO_ROOT)), include_defaults=False
    )
    lm = DiffusionEvalLM(load_dllm({"family": "llada", "source": "tiny"}), MCSpec(mc_num=1, mc_batch=1))
    out = lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], limit=1, num_fewshot=1, task_manager=manager)
    assert out["results"]["mmlu"]["sample_len"] == 57 and 0 <= out["results"]["mmlu"]["acc,none"] <= 1


def test_missing_make_data_is_reported_before_any_work(tmp_path):
    from qdllm.eval.tasks import check_local

    with pytest.raises(ConfigError, match="make data"):
        check_local(["winogrande"], tmp_path)
    check_local(["arc_easy", "bbh_zeroshot"], tmp_path)  # tasks shipped in data/ need no extraction


@pytest.mark.slow
def test_lm_eval_command_line_knows_the_qdllm_model(tmp_path):
    import subprocess
    import sys

    from tests.app.conftest import app_env

    tasks = write_local_tasks(["arc_easy"], DATA_ROOT, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "qdllm.eval", "run", "--model", "qdllm", "--model_args",
         "family=llada,source=tiny,mc_num=2,mc_batch=2", "--tasks", "arc_easy",
         "--include_path", str(tasks), "--limit", "2"],
        env={**app_env(), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy" in proc.stdout and "acc_norm" in proc.stdout
