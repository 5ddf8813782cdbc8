#!/usr/bin/env bash
# The QDLM study's grid on smol_dllm on one GPU (conf/experiment/smol_qdlm.yaml), JOBS rows at a time,
# after experiments/stage_smol_dllm.sh host1 and host2 in the same lease (the base GGUF and the
# wheels the GPU host lacks). One job folder per row under $SWEEP; a rerun skips finished rows.
#   bash experiments/gpu_qdlm_study.sh run       # the grid and the FP generation probe; each finished
#                                                # row's records are appended to $OUT/qdlm_runs.tar at once
#                                                # (a call cut short keeps what finished)
#   bash experiments/gpu_qdlm_study.sh collect   # every row's records -> $OUT/qdlm_runs.tgz
set -uo pipefail
. experiments/stage_smol_dllm.sh env
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
JOBS=${JOBS:-5}
SWEEP=${SWEEP:-.host/qdlm}
OUT=${OUT:-/tmp/out}
TIMEOUT=${TIMEOUT:-500}
ONLY=${ONLY:-}   # space-separated row names to run (e.g. the ones a cut-short call left); empty: all
# name | overrides (the study's settings: W4A4 clips activations at 0.9 for the rotations, as its code)
ROWS="fp|quant=none
gptq_w4a16|quant=gptq quant.bits=4
gptq_w3a16|quant=gptq quant.bits=3
awq_w4a16|quant=awq quant.bits=4
awq_w3a16|quant=awq quant.bits=3
smoothquant_w8a8|quant=smoothquant
smoothquant_w8a16|quant=smoothquant act=none
smoothquant_w4a4|quant=smoothquant quant.bits=4 act=a4
quarot_w8a8|quant=quarot
quarot_w4a4|quant=quarot quant.bits=4 act=a4 act.clip=0.9
duquant_w8a8|quant=duquant
duquant_w4a4|quant=duquant quant.bits=4 act=a4 act.clip=0.9
daq_w2|quant=daq quant.bits=2"
# can the small model score above zero on math and code? FP only, a few documents each
PROBE="fp_generation|quant=none eval.tasks=[gsm8k,humaneval,mbpp] eval.limit=20 +eval.num_fewshot.gsm8k=4 eval.confirm_run_unsafe_code=true eval.gen.gen_length=128 eval.gen.steps=64 eval.gen.block_length=32"

run_row() {
  local name=${1%%|*} overrides=${1#*|}
  # shellcheck disable=SC2086
  python3 run.py experiment=smol_qdlm $overrides "model.base_path=$SMOL_GGUF" \
    "hydra.run.dir=$SWEEP/$name" > "$SWEEP/$name.log" 2>&1
  echo "$name exit $?"
  # one writer at a time: parallel rows append to the same archive
  flock /tmp/qdlm_runs.lock tar rf "$OUT/qdlm_runs.tar" "$SWEEP/$name.log" \
    $(find "$SWEEP/$name" -maxdepth 1 -name results.json -o -maxdepth 1 -name lm_eval_results.json) || true
}
export -f run_row
export SWEEP SMOL_GGUF OUT

case "${1:-}" in
  run)
    mkdir -p "$SWEEP"
    start=$(date +%s)
    printf '%s\n' "$ROWS" "$PROBE" | awk -F'|' -v only=" $ONLY " 'only == "  " || index(only, " " $1 " ")' \
      | timeout "$TIMEOUT" xargs -P "$JOBS" -I{} bash -c 'run_row "$@"' _ {} || true
    echo "grid wall seconds $(( $(date +%s) - start ))" | tee "$SWEEP/wall.txt" ;;
  collect)
    tar czf "$OUT/qdlm_runs.tgz" $(find "$SWEEP" -name results.json -o -name lm_eval_results.json \
      -o -name '*.log' -o -name wall.txt) && ls -la "$OUT" ;;
  *) echo "usage: $0 run|collect" >&2; exit 2 ;;
esac
