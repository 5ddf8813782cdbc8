"""qdllm command-line entry point (Hydra). `python run.py quant=gptq`, `-m` for sweeps."""

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from qdllm.quant import quantize_weight


def synthetic_layer(rows: int, cols: int, tokens: int, seed: int, device: str):
    """A heavy-tailed weight and the second moment of correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.02
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen) @ mix
    return weight.to(device, torch.bfloat16), (x.T @ x / tokens).to(device)


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(cfg: DictConfig) -> None:
    quant = {**OmegaConf.to_container(cfg.quant, resolve=True)}
    quant.update(abmp_ratio=cfg.abmp.ratio, abmp_scope=cfg.abmp.scope)
    weight, second_moment = synthetic_layer(**cfg.synthetic)
    result = quantize_weight(weight, second_moment, quant)
    for key, value in result.summary().items():
        print(f"{key:18s} {value}")


if __name__ == "__main__":
    main()
