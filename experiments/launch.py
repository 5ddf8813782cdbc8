"""Run a paper-table experiment as independent `run.py` processes, spread over GPUs or CPU workers.

Hydra's basic launcher runs a sweep's jobs one after another in one process. This helper expands
the experiment's grid (`hydra.sweeper.params`, Hydra's own sweep syntax) and runs each job as its
own process (`hydra.mode=RUN`) in the same sweep layout (`<sweep dir>/<num>_<overrides>`), one
worker per GPU (CUDA_VISIBLE_DEVICES) or `--workers` CPU processes. A failing job is recorded
(results.json) and the others go on; relaunching with the same `--sweep-dir` skips finished jobs.

    python experiments/launch.py table2b_abmp --gpus 0,1,2,3
    python experiments/launch.py table2b_abmp_tiny --workers 2
    python experiments/launch.py table1 --gpus 0,1 --dry-run
    python experiments/launch.py smol_table1,smol_table2b_abmp --gpus 0,0,0,0 --sweep-dir logs/smol

Several experiments (comma-separated) share one job queue; with `--sweep-dir D` each one's jobs go
under `D/<task name>`. A GPU id may repeat: `--gpus 0,0,0` runs three jobs at a time on GPU 0,
which keeps a small model's GPU busy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from queue import Empty, Queue

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def expand_grid(experiment: str, extra: list[str]) -> tuple[list[list[str]], str]:
    """The experiment's jobs (each a list of overrides) and its task name."""
    from hydra import compose, initialize_config_dir

    # the basic sweeper's own grid expansion (hydra-core is pinned to 1.3.8, see pyproject.toml)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from qdllm.config import register_configs

    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("run", overrides=[f"experiment={experiment}", *extra], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params or {})
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (jobs,) = BasicSweeper.split_arguments(parsed, None) if parsed else ([[]],)
    return [list(job) for job in jobs], cfg.task_name


def job_dir_name(num: int, overrides: list[str]) -> str:
    """`<num>_<overrides>` as Hydra's sweep names job folders (conf/hydra/default.yaml)."""
    from qdllm.config.schema import job_dirname

    return f"{num}_{job_dirname(','.join(sorted(overrides)))}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", help="config names under conf/experiment/, comma-separated")
    parser.add_argument(
        "overrides", nargs="*", help="extra overrides for every job, e.g. calib.mode=stratified"
    )
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids, one worker each")
    parser.add_argument("--workers", type=int, default=1, help="CPU workers when --gpus is empty")
    parser.add_argument(
        "--sweep-dir", type=Path, help="reuse to resume; default logs/<task>/launches/<time> per experiment"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and exit")
    args = parser.parse_args()

    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    slots = [{"CUDA_VISIBLE_DEVICES": g} for g in args.gpus.split(",") if g] or [{}] * args.workers
    queue: Queue = Queue()
    total = 0
    for experiment in args.experiment.split(","):
        jobs, task = expand_grid(experiment, args.overrides)
        sweep_dir = args.sweep_dir / task if args.sweep_dir else REPO / "logs" / task / "launches" / stamp
        for num, overrides in enumerate(jobs):
            queue.put((experiment, num, overrides, sweep_dir / job_dir_name(num, overrides)))
            print(f"{experiment} #{num}: {' '.join(overrides)}")
        total += len(jobs)
    if args.dry_run:
        return 0
    failures: list[int] = []

    def worker(slot_env: dict[str, str]) -> None:
        while True:
            try:
                experiment, num, overrides, out = queue.get_nowait()
            except Empty:
                return
            command = [
                sys.executable,
                str(REPO / "run.py"),
                f"experiment={experiment}",
                "hydra.mode=RUN",
                f"hydra.run.dir='{out}'",  # quoted: the name holds '=' and ','
                *args.overrides,
                *overrides,
            ]
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "launch.log", "w") as log:
                code = subprocess.call(
                    command, cwd=REPO, env={**os.environ, **slot_env}, stdout=log, stderr=log
                )
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {out}/launch.log)"
            print(f"{experiment} #{num} {status}", flush=True)
            if code:
                failures.append(num)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"{total - len(failures)} ok, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
