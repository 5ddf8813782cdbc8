"""Masked Calibration Simulation (paper Alg. 1)."""

from qdllm.calib.mcs import MCSSpec, calibration_states, mcs_states, timestep_grid, visibility

__all__ = ["MCSSpec", "calibration_states", "mcs_states", "timestep_grid", "visibility"]
