"""The file names of a model bundle (DESIGN.md §7), shared by the writer and every reader.

A bundle folder holds the exported window graph, the stateful step graph, the fitted
preprocessing, the stationarity report, the metadata record and the conformal calibration
(`forecaster.calibration.CALIBRATION_FILE`). Pure constants: importable without torch or pandas.
"""

from __future__ import annotations

MODEL_FILE = "model.onnx"
STEP_MODEL_FILE = "model_step.onnx"
PREPROCESSING_FILE = "preprocessing.json"
STATIONARITY_FILE = "stationarity.json"
METADATA_FILE = "metadata.json"
