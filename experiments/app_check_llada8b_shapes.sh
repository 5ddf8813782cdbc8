#!/usr/bin/env bash
# The Hydra app end to end on one GPU with a stand-in for LLaDA-8B: random init, LLaDA-8B's block
# shapes (32 blocks, d 4096, 32 heads, FFN 12288), a byte-level vocabulary; local C4 excerpt and
# WikiText-2 (no hub needed). A two-job multirun (`abmp.ratio=0.05,0.1 -m`, one process) shows that
# the second job starts with the first one's GPU memory released.
#   bash experiments/app_check_llada8b_shapes.sh [results dir]    (needs QDLLM_DATA_ROOT offline)
set -euo pipefail
RESULTS=${1:-logs/app_check}
python3 run.py debug=llada8b_shapes_gpu "hydra.sweep.dir=$RESULTS/sweep" abmp.ratio=0.05,0.1 -m
for job in "$RESULTS"/sweep/*/; do
  cp "$job/results.json" "$RESULTS/job$(basename "$job" | cut -d_ -f1)_results.json"
done
cp "$RESULTS/sweep/summary.csv" "$RESULTS/"
