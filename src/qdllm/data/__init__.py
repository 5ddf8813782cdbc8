"""Calibration text sources and tokenized windows."""

from qdllm.data.calibration import CalibrationDataError, DataSpec, calibration_windows, load_texts

__all__ = ["CalibrationDataError", "DataSpec", "calibration_windows", "load_texts"]
