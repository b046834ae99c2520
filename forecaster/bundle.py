"""The file names of a model bundle (DESIGN.md §7) and of a job's embedded MLflow store, shared
by the writers and every reader (training, tracking, serving).

A bundle folder holds the exported window graph, the stateful step graph, the fitted
preprocessing, the stationarity report, the metadata record and the conformal calibration
(`forecaster.calibration.CALIBRATION_FILE`). Without a tracking server a job's runs and models
live in `<output_dir>/mlruns.db` with artifacts in `<output_dir>/mlartifacts`. Importable without
torch, pandas or MLflow.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.onnx"
STEP_MODEL_FILE = "model_step.onnx"
PREPROCESSING_FILE = "preprocessing.json"
STATIONARITY_FILE = "stationarity.json"
METADATA_FILE = "metadata.json"


def find_bundle(root: Path) -> Path | None:
    """The shallowest folder under `root` holding a `model.onnx` (a downloaded registered
    version nests the bundle's files under MLflow's own folders); None when there is none."""
    found = sorted(Path(root).rglob(MODEL_FILE), key=lambda p: len(p.parts))
    return found[0].parent if found else None


EMBEDDED_DB = "mlruns.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


def embedded_tracking_uri(output_dir: Path) -> str:
    """The tracking URI of a job's embedded store: `sqlite:///<output_dir>/mlruns.db`."""
    return f"sqlite:///{Path(output_dir).resolve() / EMBEDDED_DB}"
