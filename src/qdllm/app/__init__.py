"""The Hydra application: one job (`run_job`), its results record, trackers and sweep callbacks."""

from qdllm.app.job import run_job

__all__ = ["run_job"]
