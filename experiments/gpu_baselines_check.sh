#!/usr/bin/env bash
# The baselines on a GPU: per-matrix timings of GPTQ, GPTAQ, SliM-LLM and DAQ on LLaDA-8B's shapes, then
# GPTAQ and SliM-LLM through the Hydra app on a 4-block stand-in with LLaDA-8B's shapes.
#   bash experiments/gpu_baselines_check.sh <results dir>
set -euo pipefail
RESULTS=${1:-logs/gpu_baselines}
mkdir -p "$RESULTS"
python3 experiments/bench_quant_core.py --devices cuda --methods gptq,gptaq,slim,daq_k2_diag \
  --repeats 3 --out "$RESULTS/bench_baselines.json"
python3 run.py debug=llada8b_shapes_gpu model.tiny.layers=4 "hydra.sweep.dir=$RESULTS/sweep" \
  quant=gptq,gptaq,slim -m
for job in "$RESULTS"/sweep/*/; do
  cp "$job/results.json" "$RESULTS/job$(basename "$job" | cut -d_ -f1)_results.json"
done
