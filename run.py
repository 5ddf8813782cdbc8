"""qdllm's command line (Hydra).

python run.py                                        # the default job: tiny LLaDA, offline, CPU
python run.py model=llada_base abmp.ratio=0.05,0.1 -m   # a sweep, one job per value
python run.py experiment=table2b_abmp_tiny           # a paper-table sweep (tiny, offline)
python run.py --cfg job                              # print the composed config
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qdllm.app import run_job  # noqa: E402
from qdllm.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    main()
