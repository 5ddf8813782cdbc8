#!/usr/bin/env bash
# The parallel launcher (hydra/launcher=parallel, Ray) against Hydra's basic one on one GPU
# (docs/LAUNCHERS.md): smol Table 2 jobs four at a time sharing the GPU, then the same jobs one after
# another; both timed, and the two runs' records and quantized weights compared. JSON -> $OUT.
#
# Here (once):   bash experiments/gpu_launcher_sweep.sh pack     -> .stage_l1, .stage_l2 (Python 3.12
#                wheels of ray and hydra-ray-launcher; ray's wheel is split: a call carries <= 64 MiB)
# On the host, in one lease, after experiments/stage_smol_dllm.sh host1 and host2 (the GGUF):
#                bash experiments/gpu_launcher_sweep.sh host1    (carry .stage_l1)
#                bash experiments/gpu_launcher_sweep.sh host2    (carry .stage_l2)
#                bash experiments/gpu_launcher_sweep.sh sweep      (both sides and the comparison)
# or, when both sides do not fit one 10-minute call, one call per piece, in the same lease:
#                bash experiments/gpu_launcher_sweep.sh parallel
#                SIDE_EXPERIMENTS=a,b bash experiments/gpu_launcher_sweep.sh sequential   (repeatable)
#                bash experiments/gpu_launcher_sweep.sh compare
# Each piece appends its wall time to $WORK/walls.jsonl; the sequential wall time is the sum of its
# pieces. Each piece also returns $OUT/launcher_sweep.tgz (records, layer tables, weight digests, logs):
# `WORK=<that archive unpacked> bash $0 compare` redoes the comparison anywhere.
# EXPERIMENTS / EVAL / CALIB choose the jobs. Defaults (the run in docs/LAUNCHERS.md): all five smol
# Table 2 sweeps, 10 jobs, perplexity-only evaluation, calib.mode=stratified (keeps every sweep's
# grid, calib.nsamples included, and cuts MCS's T-fold calibration cost).
set -uo pipefail
HOST=.host
RAY_VERSION=2.60.0
EXPERIMENTS=${EXPERIMENTS:-smol_table2a_mcs,smol_table2b_abmp,smol_table2c_daq,smol_table2d_calib,smol_table2e_comp}
EVAL=${EVAL:-eval=ppl eval.ppl.max_windows=32}
CALIB=${CALIB-calib.mode=stratified}   # CALIB= for the experiments' own calibration
# MODEL_ARGS (default: the staged smol base GGUF); empty for experiments on the tiny models, e.g. a
# CPU dry run of this script: MODEL_ARGS= EXPERIMENTS=table2b_abmp_tiny EVAL=... bash $0 sweep
PAR_TIMEOUT=${PAR_TIMEOUT:-270}
SEQ_TIMEOUT=${SEQ_TIMEOUT:-330}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-$HOST/launcher_sweep}   # compare also runs on a copy of $OUT: WORK=<that copy>

pack() {
  rm -rf .stage_l1 .stage_l2 && mkdir -p .stage_l1 .stage_l2/whl
  # --no-deps: ray's core needs only; its [default] extras (dashboard, autoscaler) are not used here
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .stage_l2/whl "ray==$RAY_VERSION" hydra-ray-launcher==1.2.2 \
    msgpack==1.2.4 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 attrs==26.1.0 click==8.5.1 filelock==4.3.2
  local ray_whl
  ray_whl=$(ls .stage_l2/whl/ray-*.whl)
  split -b 44M "$ray_whl" .stage_l1/ray.whl.
  mv .stage_l1/ray.whl.ab .stage_l2/ && basename "$ray_whl" > .stage_l2/ray_wheel_name
  rm "$ray_whl"
  du -sh .stage_l1 .stage_l2
}

host1() { mkdir -p $HOST && cp .stage_l1/ray.whl.aa $HOST/; }

host2() {
  local name
  name=$(cat .stage_l2/ray_wheel_name)
  mkdir -p $HOST/site $HOST/whl
  cat $HOST/ray.whl.aa .stage_l2/ray.whl.ab > "$HOST/whl/$name" && rm -f $HOST/ray.whl.aa
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $HOST/site \
    "$HOST/whl/$name" .stage_l2/whl/*.whl
  PYTHONPATH=$PWD/$HOST/site python3 -c "import ray, hydra_plugins.hydra_ray_launcher._core; print('ray', ray.__version__)"
}

job_args() {
  . experiments/stage_smol_dllm.sh env
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
  common=(save_model=true)
  # shellcheck disable=SC2206
  common+=(${MODEL_ARGS-model.base_path=$SMOL_GGUF} $EVAL $CALIB)
}

# wall time of one piece: side, experiments, seconds, exit status -> $WORK/walls.jsonl
record_wall() {
  python3 -c 'import json, sys, torch; print(json.dumps({"side": sys.argv[1], "experiments": sys.argv[2],
      "wall_s": float(sys.argv[4]) - float(sys.argv[3]), "exit": int(sys.argv[5]),
      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))' "$@" >> $WORK/walls.jsonl
}

# what the comparison needs of each finished job, kept small and sent back with every piece (a lease can
# end between calls): results.json, layers.parquet and the sha256 of the saved weights (then deleted,
# 0.5 GB per job)
keep_side() {
  local side=$1 d
  for d in $WORK/$side/*/*/; do
    [ -d "$d/model" ] && (cd "$d/model" && cat ./*.safetensors | sha256sum | cut -d' ' -f1 > ../model.sha256) \
      && rm -rf "$d/model"
  done
  mkdir -p "$OUT" && tail -c 20000 $WORK/$side.log > "$OUT/$side.log"
  # one archive: job folder names (`0_abmp.ratio=0.1,...`) do not come back from the device as files
  (cd $WORK && find . \( -name results.json -o -name layers.parquet -o -name model.sha256 -o -name summary.csv \
    -o -name '*.log' -o -name walls.jsonl \) -print0 | xargs -0 tar -czf "$OUT/launcher_sweep.tgz")
}

run_parallel() {
  local common t0 rc
  job_args
  rm -rf $WORK && mkdir -p $WORK
  t0=$(date +%s.%N)
  # four jobs share the GPU (a quarter each); several experiments in one Ray queue
  GPU_SHARE=0.25 SWEEP=$WORK/parallel RAY_ARGS="--num-gpus=1 --num-cpus=8" RAY="python3 -m ray.scripts.scripts" \
    PY=python3 timeout "$PAR_TIMEOUT" bash experiments/sweep_queue.sh "$EXPERIMENTS" "${common[@]}" \
    > $WORK/parallel.log 2>&1
  rc=$?
  record_wall parallel "$EXPERIMENTS" "$t0" "$(date +%s.%N)" "$rc"
  keep_side parallel
}

run_sequential() {
  local common t0 rc side=${SIDE_EXPERIMENTS:-$EXPERIMENTS}
  job_args
  mkdir -p $WORK
  t0=$(date +%s.%N)
  # the same jobs one after another: Hydra's basic launcher, one -m call per experiment
  timeout "$SEQ_TIMEOUT" bash -c 'for e in ${1//,/ }; do
      python3 run.py -m "experiment=$e" "hydra.sweep.dir=$2/sequential/$e" "${@:3}" || exit 1
    done' _ "$side" "$WORK" "${common[@]}" >> $WORK/sequential.log 2>&1
  rc=$?
  record_wall sequential "$side" "$t0" "$(date +%s.%N)" "$rc"
  keep_side sequential
}

compare() {
  python3 - "$WORK" "$EXPERIMENTS" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd

work, experiments = sys.argv[1:]
work = Path(work)
walls = [json.loads(line) for line in (work / "walls.jsonl").read_text().splitlines()]

def side_wall(side):
    pieces = [w for w in walls if w["side"] == side]
    return {"wall_s": sum(w["wall_s"] for w in pieces), "exit": max((w["exit"] for w in pieces), default=None),
            "pieces": pieces}

def digest(job_dir):
    """sha256 over the job's saved tensor files (save_model=true), as keep_side wrote it."""
    f = job_dir / "model.sha256"
    return f.read_text().strip() if f.exists() else None

def job(d):
    rec = json.loads((d / "results.json").read_text())
    layers = d / "layers.parquet"
    return rec, (pd.read_parquet(layers) if layers.exists() else None), digest(d)

jobs = []
for exp in experiments.split(","):
    par_root, seq_root = work / "parallel" / exp, work / "sequential" / exp
    names = sorted({p.parent.name for p in par_root.glob("*/results.json")}
                   | {p.parent.name for p in seq_root.glob("*/results.json")})
    for name in names:
        entry = {"experiment": exp, "job": name}
        sides = {}
        for side, root in (("parallel", par_root), ("sequential", seq_root)):
            if (root / name / "results.json").exists():
                sides[side] = job(root / name)
                rec = sides[side][0]
                entry[side] = {"status": rec["status"], "error": rec.get("error"),
                               "seconds": rec["timing"].get("total"), "eval": rec["eval"],
                               "bits_per_weight": rec["quant"].get("bits_per_weight"),
                               "gpu_peak_gb": rec["memory"].get("gpu_peak_gb")}
        if len(sides) == 2:
            (a, la, ha), (b, lb, hb) = sides["parallel"], sides["sequential"]
            entry["weights_identical"] = ha is not None and ha == hb
            entry["eval_identical"] = a["eval"] == b["eval"]
            entry["quant_identical"] = {k: v for k, v in a["quant"].items() if k != "seconds"} == \
                {k: v for k, v in b["quant"].items() if k != "seconds"}
            if la is not None and lb is not None:
                cols = [c for c in la.columns if c != "seconds" and pd.api.types.is_numeric_dtype(la[c])]
                entry["layers_max_abs_diff"] = float((la[cols] - lb[cols]).abs().max().max())
        jobs.append(entry)

out = {
    "gpu": sorted({w["gpu"] for w in walls if w.get("gpu")}),
    "experiments": experiments.split(","),
    "parallel": {"launcher": "hydra/launcher=parallel (Ray), 4 jobs per GPU (num_gpus=0.25)",
                 **side_wall("parallel")},
    "sequential": {"launcher": "Hydra basic launcher, one -m call per experiment", **side_wall("sequential")},
    "jobs": jobs,
}
finished = bool(jobs) and all(
    side in j and j[side]["status"] == "ok" for j in jobs for side in ("parallel", "sequential")
)
# a wall-time ratio means something only when every job finished on both sides
out["speedup"] = out["sequential"]["wall_s"] / out["parallel"]["wall_s"] if finished else None
out["all_finished"] = finished
out["all_identical"] = bool(jobs) and all(j.get("weights_identical") and j.get("eval_identical") for j in jobs)
print(json.dumps(out, indent=1))
(work / "launcher_sweep.json").write_text(json.dumps(out, indent=1))
EOF
  mkdir -p "$OUT" && { [ "$WORK/launcher_sweep.json" -ef "$OUT/launcher_sweep.json" ] || cp $WORK/launcher_sweep.json "$OUT/"; }
}

case "${1:-}" in
  pack) pack ;;
  host1) host1 ;;
  host2) host2 ;;
  parallel) run_parallel ;;
  sequential) run_sequential ;;
  compare) compare ;;
  sweep) run_parallel && run_sequential && compare ;;
  *) echo "usage: $0 pack|host1|host2|parallel|sequential|compare|sweep" >&2; exit 2 ;;
esac
