"""lm-eval tasks on local data files (offline), keeping the stock prompts and metrics.

Each local task is a YAML that `include:`s lm-eval's stock task YAML and overrides only the dataset
fields (`dataset_path: json`, `data_files`, splits), written at run time into a directory of the
caller's choosing with absolute paths under the data root; nothing machine-specific is committed.
Files that need reshaping (PIQA's labels live in a separate file; GSM8K's splits) are derived into
the same directory. Row counts are checked against the official splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qdllm.errors import ConfigError

BBH_SUBTASKS = (
    "boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages "
    "formal_fallacies geometric_shapes hyperbaton logical_deduction_five_objects "
    "logical_deduction_seven_objects logical_deduction_three_objects movie_recommendation "
    "multistep_arithmetic_two navigate object_counting penguins_in_a_table "
    "reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks "
    "sports_understanding temporal_sequences tracking_shuffled_objects_five_objects "
    "tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies "
    "word_sorting"
).split()


@dataclass(frozen=True)
class LocalTask:
    """A stock lm-eval task (`stock`: YAML path under lm_eval/tasks) read from local files."""

    name: str
    stock: str
    files: dict[str, str]  # split -> file under the data root (or a derived file, see `derive`)
    rows: int  # documents of the evaluated split in the official dataset
    overrides: dict = field(default_factory=dict)
    derive: str | None = None  # name of a function below that builds the split files


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(
        "arc_easy",
        "arc/arc_easy.yaml",
        {"test": "tasks/arc/corrected/arc_easy_test.jsonl"},
        2376,
        {"training_split": None, "validation_split": None, "test_split": "test"},
    ),
    "arc_challenge": LocalTask(
        "arc_challenge",
        "arc/arc_challenge.yaml",
        {"test": "tasks/arc/corrected/arc_challenge_test.jsonl"},
        1172,
        {"training_split": None, "validation_split": None, "test_split": "test"},
    ),
    "piqa": LocalTask(
        "piqa",
        "piqa/piqa.yaml",
        {"validation": "piqa_validation.jsonl"},
        1838,
        {"training_split": None, "validation_split": "validation", "test_split": None},
        derive="_piqa",
    ),
    "gsm8k": LocalTask(
        "gsm8k",
        "gsm8k/gsm8k.yaml",
        {"train": "tasks/gsm8k/train.jsonl", "test": "tasks/gsm8k/test.jsonl"},
        1319,
        {"training_split": "train", "fewshot_split": "train", "test_split": "test"},
    ),
    **{
        f"bbh_zeroshot_{sub}": LocalTask(
            f"bbh_zeroshot_{sub}",
            f"bbh/zeroshot/{sub}.yaml",
            {"test": f"tasks/bbh/{sub}.json"},
            -1,  # 250 for most subtasks; checked against the file's own examples
            {"test_split": "test", "dataset_kwargs": {"field": "examples"}},
        )
        for sub in BBH_SUBTASKS
    },
}


# groups whose stock YAML is copied beside their local members (results keep the stock names)
LOCAL_GROUPS = {
    "bbh_zeroshot": ("bbh/zeroshot/_bbh_zeroshot.yaml", [f"bbh_zeroshot_{s}" for s in BBH_SUBTASKS])
}


def expand(names: list[str]) -> list[str]:
    """Leaf task names of `names` (groups replaced by their members)."""
    return [leaf for n in names for leaf in (LOCAL_GROUPS[n][1] if n in LOCAL_GROUPS else [n])]


def _piqa(data_root: Path, out_dir: Path) -> None:
    """Merge PIQA's valid.jsonl with valid-labels.lst into the lm-eval schema (goal, sol1, sol2, label)."""
    source = data_root / "tasks" / "piqa"
    rows = [json.loads(line) for line in (source / "valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (source / "valid-labels.lst").read_text().split()]
    if len(rows) != len(labels):
        raise ConfigError(f"{source}: {len(rows)} PIQA rows but {len(labels)} labels")
    with (out_dir / "piqa_validation.jsonl").open("w") as fh:
        for row, label in zip(rows, labels, strict=True):
            fh.write(
                json.dumps({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": label})
                + "\n"
            )


def missing_message(unknown: list[str]) -> str:
    local = sorted(n for n in [*LOCAL_TASKS, *LOCAL_GROUPS] if not n.startswith("bbh_zeroshot_"))
    return (
        f"eval.tasks: no local copy of {unknown}; local tasks are {local} (and the bbh_zeroshot_* "
        "subtasks); with hub access set eval.data=hub"
    )


def check_local(names: list[str]) -> None:
    unknown = [n for n in expand(names) if n not in LOCAL_TASKS]
    if unknown:
        raise ConfigError(missing_message(unknown))


def stock_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_local_tasks(names: list[str], data_root: str | Path, out_dir: str | Path) -> Path:
    """Write local YAMLs for `names` (plus derived data files) into `out_dir`; returns it.

    Raises ConfigError for a task without a local copy or a missing/short data file.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for group in (n for n in names if n in LOCAL_GROUPS):
        stock = yaml.safe_load((stock_task_dir() / LOCAL_GROUPS[group][0]).read_text())
        (out_dir / f"{group}.yaml").write_text(yaml.safe_dump(stock, sort_keys=False))
    names = expand(names)
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise ConfigError(missing_message(unknown))
    for name in names:
        task = LOCAL_TASKS[name]
        if task.derive:
            globals()[task.derive](data_root, out_dir)
        files = {}
        for split, rel in task.files.items():
            path = (out_dir / rel) if task.derive else (data_root / rel)
            if not path.is_file():
                raise ConfigError(
                    f"eval task {name}: data file {path} is missing (paths.data_root={data_root})"
                )
            files[split] = str(path.resolve())
        _check_rows(task, files)
        spec = {
            "include": str(stock_task_dir() / task.stock),
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            **task.overrides,
            "dataset_kwargs": {**task.overrides.get("dataset_kwargs", {}), "data_files": files},
        }
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out_dir


def _check_rows(task: LocalTask, files: dict[str, str]) -> None:
    if task.rows < 0:
        return
    split = task.overrides.get("test_split") or task.overrides.get("validation_split")
    path = Path(files[split])
    count = sum(1 for line in path.open() if line.strip())
    if count != task.rows:
        raise ConfigError(
            f"eval task {task.name}: {path} has {count} rows, the official split has {task.rows}"
        )
