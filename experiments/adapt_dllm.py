"""Adapt SmolLM2-135M-Instruct into a masked-diffusion LM; config `conf/adapt.yaml` (Hydra).

    python experiments/adapt_dllm.py                      # train on one GPU (resumes if interrupted)
    python experiments/adapt_dllm.py prepare_only=true    # only tokenise the corpus into data.cache_dir
    python experiments/adapt_dllm.py max_steps=30 out_dir=outputs/probe   # time a few steps
    python experiments/adapt_dllm.py --cfg job            # print the composed config

Every key is type-checked at compose time (`qdllm.config.adapt.AdaptConf`): a mistyped or ill-typed
override fails before any work. The finished adapter lands in `<out_dir>/adapter`;
`experiments/stage_smol_dllm.sh` copies it into `assets/smol_dllm` with its loss curve.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from qdllm.adapt.train import adapt, base_tokenizer, prepare_tokens
from qdllm.config.adapt import register_adapt_configs
from qdllm.models.adapted import base_gguf_path

register_adapt_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="adapt")
def main(cfg: DictConfig) -> None:
    if cfg.prepare_only:
        gguf = base_gguf_path(cfg.base, cfg.base.gguf_path)
        print(prepare_tokens(cfg, base_tokenizer(gguf, cfg.special)))
        return
    print(adapt(cfg))


if __name__ == "__main__":
    main()
