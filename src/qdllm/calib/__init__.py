"""Masked Calibration Simulation (paper Alg. 1)."""

from qdllm.calib.mcs import MCSSpec, mcs_states, timestep_grid, visibility

__all__ = ["MCSSpec", "mcs_states", "timestep_grid", "visibility"]
