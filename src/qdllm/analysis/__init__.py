"""Measurements on models (not the notebooks under the repository's top-level `analysis/` folder).

`qdllm.analysis.outliers`: activation-outlier statistics at every block Linear's input, clean and
under Masked Calibration Simulation; `python -m qdllm.analysis.outliers --help`.
"""
