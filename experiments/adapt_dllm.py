"""Adapt SmolLM2-135M-Instruct into a masked-diffusion LM; see adapt_dllm.yaml.

    python experiments/adapt_dllm.py                      # train on one GPU (resumes if interrupted)
    python experiments/adapt_dllm.py prepare_only=true    # only tokenise the corpus into data.cache_dir
    python experiments/adapt_dllm.py max_steps=30 out_dir=outputs/probe   # time a few steps

The finished adapter lands in `<out_dir>/adapter`; `experiments/stage_smol_dllm.sh` copies it into
`assets/smol_dllm` with its loss curve.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from qdllm.adapt.train import adapt, base_tokenizer, prepare_tokens
from qdllm.models.adapted import base_gguf_path

CONFIG = Path(__file__).with_name("adapt_dllm.yaml")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = OmegaConf.from_dotlist(argv)
    prepare_only = bool(overrides.pop("prepare_only", False))
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), overrides)
    if prepare_only:
        gguf = base_gguf_path(cfg.base, cfg.base.gguf_path)
        print(prepare_tokens(cfg, base_tokenizer(gguf, cfg.special)))
        return
    print(adapt(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
