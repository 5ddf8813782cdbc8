"""Masked Calibration Simulation (MCS, paper §3.2, Alg. 1, eq. 1).

For each calibration sequence x of length L: the prefix [0, floor(gamma L)) stays visible; for each
timestep tau on the grid, every other token is kept with probability alpha(tau) (Bernoulli) and
otherwise replaced by the family's mask token. alpha is the visibility schedule, alpha(0) = 1,
alpha(1) = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qdllm.errors import require

SCHEDULES = ("linear", "cosine")
MODES = ("full", "stratified")


@dataclass
class MCSSpec:
    enabled: bool = True  # False: standard fully visible calibration (Table 2a, w/o MCS)
    gamma: float = 0.25  # visible prefix ratio
    timesteps: int = 20  # T
    schedule: str = "linear"  # linear: 1 - tau | cosine: (1 + cos(pi tau)) / 2
    include_full_visible: bool = False  # add tau = 0 (all visible) to the grid
    mode: str = "full"  # full: every sequence x every tau | stratified: one tau per sequence
    seed: int = 42

    def validated(self) -> MCSSpec:
        """Check every field; errors name the Hydra key (`calib.<field>`)."""
        require(0.0 <= self.gamma < 1.0, "calib.gamma", self.gamma, "prefix ratio must lie in [0, 1)")
        require(self.timesteps >= 1, "calib.timesteps", self.timesteps, "T must be >= 1")
        require(self.schedule in SCHEDULES, "calib.schedule", self.schedule, f"use one of {SCHEDULES}")
        require(self.mode in MODES, "calib.mode", self.mode, f"use one of {MODES}")
        return self


def timestep_grid(spec: MCSSpec) -> list[float]:
    """tau_t = t / T for t = 1..T (paper §3.2: T uniform timesteps), optionally with tau = 0 first."""
    grid = [t / spec.timesteps for t in range(1, spec.timesteps + 1)]
    return [0.0, *grid] if spec.include_full_visible else grid


def visibility(tau: float, schedule: str) -> float:
    if schedule == "linear":
        return 1.0 - tau
    require(schedule == "cosine", "calib.schedule", schedule, f"use one of {SCHEDULES}")
    return 0.5 * (1.0 + math.cos(math.pi * tau))


def mcs_states(tokens: torch.Tensor, mask_token_id: int, spec: MCSSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked calibration states.

    Args:
        tokens: (n, L) int64 calibration windows.
    Returns:
        states (M, L) int64 and their tau (M,) fp32. M = n x |grid| (full), n (stratified), or n
        with tau = 0 when MCS is disabled.
    """
    spec.validated()
    n, length = tokens.shape
    if not spec.enabled:
        return tokens.clone(), torch.zeros(n)
    grid = timestep_grid(spec)
    if spec.mode == "full":
        pairs = [(i, tau) for i in range(n) for tau in grid]
    else:
        pairs = [(i, grid[i % len(grid)]) for i in range(n)]
    prefix = math.floor(spec.gamma * length)
    gen = torch.Generator().manual_seed(spec.seed)
    states = torch.empty(len(pairs), length, dtype=torch.int64)
    taus = torch.empty(len(pairs))
    for row, (i, tau) in enumerate(pairs):
        keep = torch.rand(length - prefix, generator=gen) < visibility(tau, spec.schedule)
        states[row] = tokens[i]
        states[row, prefix:] = torch.where(keep, tokens[i, prefix:], mask_token_id)
        taus[row] = tau
    return states, taus


def calibration_states(dllm, data, spec: MCSSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Text -> windows -> masked states, as one quantization run calibrates.

    Args:
        dllm: the `DiffusionLM` (its tokenizer and mask token id).
        data: a `qdllm.data.DataSpec`: where the text comes from and the window count / length.
    Returns:
        windows (n, L) int64 and the MCS states (M, L) int64 built from them.
    """
    from qdllm.data.calibration import calibration_windows, load_texts

    windows = calibration_windows(load_texts(data), dllm.tokenizer, data)
    states, _ = mcs_states(windows, dllm.mask_token_id, spec)
    return windows, states
