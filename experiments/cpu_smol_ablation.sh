#!/usr/bin/env bash
# The smol_cpu grid (conf/experiment/smol_cpu.yaml) plus Quant-dLLM without MCS and without ABMP,
# one job at a time on this machine's CPU; results under logs/smol_cpu/ (resumable: finished jobs
# are skipped). About 4-5 minutes per job on 2 cores.
set -euo pipefail
SWEEP=${1:-logs/smol_cpu}
PY=${PY:-.venv/bin/python}
$PY run.py -m experiment=smol_cpu "hydra.sweep.dir=$SWEEP/grid" || true
for extra in calib=standard abmp.ratio=0.0; do
  dir="$SWEEP/daq_${extra//=/_}"
  $PY run.py experiment=smol_cpu hydra.mode=RUN "hydra.run.dir=$dir" quant=daq "$extra" > "$dir.log" 2>&1 || true
done
