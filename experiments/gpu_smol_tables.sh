#!/usr/bin/env bash
# The GPU runs on smol_dllm (docs/RESULTS.md), after experiments/stage_smol_dllm.sh host1..host3 in the same lease:
#   bash experiments/gpu_smol_tables.sh train     # adapt_dllm.py for TRAIN_BUDGET s (rerun: resumes)
#   bash experiments/gpu_smol_tables.sh export    # the finished adapter -> $OUT (shards + adapter.tgz)
#   bash experiments/gpu_smol_tables.sh restore   # a fresh host: assets/smol_dllm at .host/adapt/adapter
#                                                 # and the committed records of finished jobs (RUNS_TGZ,
#                                                 # made by stage_smol_dllm.sh pack), which `tables` skips
#   bash experiments/gpu_smol_tables.sh ar        # the AR base model's lm-eval scores (reference row)
#   bash experiments/gpu_smol_tables.sh tables    # every smol_* experiment, JOBS at a time on GPU 0
#                                                 # (Ray: stage it first, experiments/gpu_launcher_sweep.sh)
#   bash experiments/gpu_smol_tables.sh collect   # results.json / layers.parquet of every job -> $OUT
# `tables` resumes: rerun it with the same sweep dir and finished jobs are skipped.
set -uo pipefail
. experiments/stage_smol_dllm.sh env
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
JOBS=${JOBS:-6}                  # six keep an H200 at 100 %; more only slow every job
SWEEP=${SWEEP:-.host/logs}
ADAPT=.host/adapt
EXPERIMENTS=${EXPERIMENTS:-smol_fp,smol_table1,smol_table2a_mcs,smol_table2b_abmp,smol_table2c_daq,smol_table2d_calib,smol_table2e_comp,smol_fp_full}
OUT=${OUT:-/tmp/out}

case "${1:-}" in
  train)
    python3 experiments/adapt_dllm.py "out_dir=$ADAPT" "base.gguf_path=$SMOL_GGUF" \
      "time_budget_s=${TRAIN_BUDGET:-500}" ;;
  export)
    # $OUT takes files of at most 16 MiB: the two weight shards alone, the small files in one archive
    cp $ADAPT/adapter/adapter-*.safetensors "$OUT/" && tar czf "$OUT/adapter.tgz" -C $ADAPT \
      --exclude='adapter/adapter-*.safetensors' adapter loss_curve.csv loss_curve.png summary.json \
      && ls -la "$OUT" ;;
  restore)
    # a job's config holds the adapter path: the same path on every host lets `tables` skip them
    mkdir -p $ADAPT && rm -rf $ADAPT/adapter && cp -r assets/smol_dllm $ADAPT/adapter
    tar xzf "${RUNS_TGZ:-.stage3/smol_runs.tgz}" ;;
  ar)
    python3 experiments/eval_ar_base.py --out .host/results/ar_base.json --gguf "$SMOL_GGUF" \
      --olmo-data-root "$QDLLM_EVAL_DATA" && cp .host/results/ar_base.json "$OUT/" ;;
  tables)
    share=$(python3 -c "print(1 / $JOBS)")
    # SMOL_SOURCE: the adapter directory (default: the one `train` or `restore` left in .host/adapt)
    [ -n "${SMOL_SOURCE:-}" ] || [ ! -d $ADAPT/adapter ] || SMOL_SOURCE=$PWD/$ADAPT/adapter
    GPU_SHARE=$share SWEEP=$SWEEP RAY_ARGS="--num-gpus=1" timeout "${TABLES_TIMEOUT:-540}" \
      bash experiments/sweep_queue.sh "$EXPERIMENTS" "model.base_path=$SMOL_GGUF" \
      ${SMOL_SOURCE:+"model.source=$SMOL_SOURCE"} ;;
  collect)
    tar czf "$OUT/smol_runs.tgz" $(find "$SWEEP" -name results.json -o -name layers.parquet \
      -o -name '*.log' -o -name loss_curve.csv) && ls -la "$OUT" ;;
  *) echo "usage: $0 train|export|restore|ar|tables|collect" >&2; exit 2 ;;
esac
