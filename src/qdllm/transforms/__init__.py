"""Function-preserving transforms of the FP model, applied before weight quantization.

A transform rewrites the FP model so that it computes the same function while its Linears'
inputs (and weights) become easier to quantize: SmoothQuant's per-channel scaling (`smooth.py`),
rotations (QuaRot, DuQuant). The pipeline (`qdllm.pipeline.transform.transform_model`) applies the
one named by `quant.transform.name` after the calibration states exist and before the first
weight is quantized; every weight method (RTN, GPTQ, ...) then quantizes the transformed weights.

Configuration: the `quant.transform` sub-node (`TransformSpec`), e.g.
`quant=smoothquant` or `quant=gptq quant.transform.name=smoothquant quant.transform.alpha=0.8`.

Registry: `TRANSFORMS` maps a name to a `Transform`. A transform is a function
`apply(dllm, spec) -> report` or, with `needs_act_absmax=True`,
`apply(dllm, spec, act_absmax) -> report`, where `act_absmax` maps every quantized Linear's full
name to the (C,) fp32 max |x| of its input over the calibration set (FP model). It edits the model
in place and returns a JSON-able report (recorded under `quant.transform` in results.json).
QuaRot (`quarot.py`) and DuQuant (`duquant.py`) leave online rotations on some Linear inputs
(`online.py`); a packed checkpoint stores them (`quantization_config.input_transforms`) and the
loader re-attaches them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qdllm.errors import ConfigError, require
from qdllm.transforms.duquant import DuQuantSpec, apply_duquant
from qdllm.transforms.quarot import QuaRotSpec, apply_quarot
from qdllm.transforms.smooth import SMOOTH_SITES, apply_smoothquant

NONE = "none"


@dataclass(frozen=True)
class Transform:
    """One registered transform: its function and whether it needs the activation maxima."""

    apply: Callable[..., dict[str, Any] | None]
    needs_act_absmax: bool = False


def _quarot(dllm, spec: TransformSpec) -> dict[str, Any]:
    quarot = QuaRotSpec(spec.seed, online_ffn_out=spec.online_ffn_out, online_attn_out=spec.online_attn_out)
    return dataclasses.asdict(apply_quarot(dllm, quarot))


def _duquant(dllm, spec: TransformSpec, act_absmax) -> dict[str, Any]:
    duquant = DuQuantSpec(
        alpha=spec.alpha,
        smooth=spec.smooth,
        block_size=spec.block_size,
        steps=spec.rotation_steps,
        permute=spec.permutation_times > 0,
    )
    return dataclasses.asdict(apply_duquant(dllm, duquant, act_absmax))


TRANSFORMS: dict[str, Transform] = {
    "smoothquant": Transform(apply_smoothquant, needs_act_absmax=True),
    "quarot": Transform(_quarot),
    "duquant": Transform(_duquant, needs_act_absmax=True),
}


@dataclass
class TransformSpec:
    """The `quant.transform` node.

    name: `none` or a key of `TRANSFORMS`.
    alpha: SmoothQuant's migration strength (eq. 4), 0.5 in the QDLM study (also DuQuant's smoothing).
    sites: where smoothing folds (`qdllm.transforms.smooth`): qkv, ffn_in (canonical SmoothQuant),
        attn_out (MHA only), ffn_out (QDLM's code smooths all four).
    seed: random choices of rotation transforms (QuaRot's Hadamard signs, its random orthogonal
        factors where no Hadamard order exists).
    online_ffn_out, online_attn_out: QuaRot's online Hadamards at the ffn_out input and across heads
        at the attn_out input.
    smooth: DuQuant's smoothing (with `alpha`) before its rotations.
    block_size, rotation_steps, permutation_times: DuQuant's block-diagonal rotation (block 128,
        256 greedy steps, one zigzag permutation in the QDLM study; 0 permutations: one rotation).
    """

    name: str = NONE
    alpha: float = 0.5
    sites: list[str] = field(default_factory=lambda: ["qkv", "ffn_in", "attn_out"])
    seed: int = 0
    online_ffn_out: bool = True
    online_attn_out: bool = True
    smooth: bool = True
    block_size: int = 128
    rotation_steps: int = 256
    permutation_times: int = 1

    @property
    def enabled(self) -> bool:
        return self.name != NONE

    def validated(self) -> TransformSpec:
        """Check every field; errors name the Hydra key (`quant.transform.<field>`)."""
        key = "quant.transform"
        names = [NONE, *TRANSFORMS]
        require(self.name in names, f"{key}.name", self.name, f"use one of {names}")
        require(0.0 <= self.alpha <= 1.0, f"{key}.alpha", self.alpha, "must lie in [0, 1]")
        unknown = [s for s in self.sites if s not in SMOOTH_SITES]
        require(
            not unknown, f"{key}.sites", self.sites, f"unknown site(s) {unknown}; use {list(SMOOTH_SITES)}"
        )
        require(len(set(self.sites)) == len(self.sites), f"{key}.sites", self.sites, "lists a site twice")
        require(self.block_size >= 1, f"{key}.block_size", self.block_size, "must be >= 1")
        require(self.rotation_steps >= 0, f"{key}.rotation_steps", self.rotation_steps, "must be >= 0")
        require(
            self.permutation_times >= 0, f"{key}.permutation_times", self.permutation_times, "must be >= 0"
        )
        return self


def get_transform(name: str) -> Transform:
    if name not in TRANSFORMS:
        raise ConfigError(
            f"quant.transform.name={name!r}: no such transform; use one of {[NONE, *TRANSFORMS]}"
        )
    return TRANSFORMS[name]


__all__ = [
    "NONE",
    "SMOOTH_SITES",
    "TRANSFORMS",
    "Transform",
    "TransformSpec",
    "apply_smoothquant",
    "get_transform",
]
