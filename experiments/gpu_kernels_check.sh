#!/usr/bin/env bash
# The packed-Linear kernels on one GPU: their tests, the benchmark (optionally with the launch-shape
# sweep) and the end-to-end LLaDA-8B-shaped run. Each step writes <out>/<step>.json or .log.
#   [BENCH_TUNE="gemv fused blocked"] bash experiments/gpu_kernels_check.sh <out dir> tests bench [e2e]
# (BENCH_TUNE: the paths whose launch shapes / block sizes the bench also sweeps, in the same run)
set -uo pipefail
OUT_DIR=${1:?usage: gpu_kernels_check.sh <out dir> step...}
shift
export PYTHONPATH=src:. WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in "$@"; do
  echo "=== $step"
  case $step in
    tests) timeout 200 python3 -m pytest tests/kernels -q -n 8 -p no:cacheprovider ;;
    # shellcheck disable=SC2086
    bench) timeout 420 python3 experiments/bench_packed.py --profile ${BENCH_TUNE:+--tune $BENCH_TUNE} --out "$OUT_DIR/bench_packed_h200.json" ;;
    e2e) timeout 250 python3 experiments/e2e_packed_llada8b.py --out "$OUT_DIR/e2e_packed_llada8b_h200.json" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "=== $step exit $?"
done
