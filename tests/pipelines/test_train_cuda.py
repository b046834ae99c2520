"""The whole training job on a GPU: CUDA training (with and without AMP), export, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_configs import tiny_config

from pipelines.train import METADATA_FILE, MODEL_FILE, run_training

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("method", "amp"), [("feedback", False), ("feedback", True), ("bptt", True)]
)
def test_training_job_runs_on_cuda(tmp_path: Path, method: str, amp: bool) -> None:
    config = tiny_config(
        tmp_path / "out",
        model={"name": "mi_gru", "hidden_size": 16},
        train={"epochs": 3, "batch_size": 64, "stride": 2, "device": "cuda", "amp": amp},
    )
    outcome = run_training(config, method=method)
    assert outcome.history.device.startswith("cuda")
    assert outcome.history.memory_measure == "cuda_max_allocated"
    assert outcome.history.best_val_loss < outcome.history.evaluations[0].val_loss
    metadata = json.loads((outcome.bundle / METADATA_FILE).read_text())
    assert (outcome.bundle / MODEL_FILE).is_file()
    assert metadata["training_method"] == outcome.method
    assert 0 < metadata["metrics"]["test"]["mse"] < 10
