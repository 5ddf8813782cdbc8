#!/usr/bin/env bash
# Several experiments in one job queue on this host (docs/LAUNCHERS.md): one Ray instance, one
# `run.py -m experiment=E hydra/launcher=parallel` per experiment connected to it; Ray starts each
# job when a share of a GPU (GPU_SHARE) is free, whichever experiment it belongs to.
#   GPU_SHARE=0.25 SWEEP=logs/queue bash experiments/sweep_queue.sh smol_table2b_abmp,smol_table2c_daq [overrides...]
# Jobs go to $SWEEP/<experiment>/<num>_<overrides> (without SWEEP: logs/<task>/multiruns/<time>/...);
# rerun with the same SWEEP and finished jobs are skipped. `ray stop` at the end stops every Ray
# process of this user on the host.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 EXPERIMENT[,EXPERIMENT...] [overrides...]" >&2; exit 2; }
PY=${PY:-python3}
RAY=${RAY:-ray}
EXPERIMENTS=$1; shift
GPU_SHARE=${GPU_SHARE:-1}        # GPUs per job: 0.25 = four jobs per GPU, 0 on a CPU host
RAY_ARGS=${RAY_ARGS:-}           # for `ray start`, e.g. "--num-gpus=1 --num-cpus=8"
# shellcheck disable=SC2086
$RAY start --head --include-dashboard=false $RAY_ARGS > /dev/null || exit 1
trap '$RAY stop > /dev/null' EXIT
trap 'exit 143' TERM INT       # so that `timeout` still stops Ray
pids=()
for e in ${EXPERIMENTS//,/ }; do
  # object_store_memory must be left to the running instance when a driver connects to it
  $PY run.py -m "experiment=$e" hydra/launcher=parallel hydra.launcher.ray.init.address=auto \
    hydra.launcher.ray.init.object_store_memory=null "hydra.launcher.ray.remote.num_gpus=$GPU_SHARE" \
    ${SWEEP:+"hydra.sweep.dir=$SWEEP/$e"} "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
