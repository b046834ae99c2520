"""The torch-free runtime entry point: sessions, metadata, both graph kinds, input validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster import inference
from forecaster.errors import ModelError, ModelUnavailable, ServingError
from forecaster.export import export_onnx
from forecaster.inference import (
    StepResult,
    forecast_step,
    forecast_window,
    initial_state,
    model_metadata,
    open_session,
    select_providers,
)
from forecaster.models.registry import build

D, HID, HORIZON = 2, 6, 3


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    model = build("mi_gru", D, HID, HORIZON, mi_init="mi")
    folder = tmp_path_factory.mktemp("inference")
    out = {}
    for graph in ("window", "step"):
        out[graph] = folder / f"{graph}.onnx"
        export_onnx(model, out[graph], lookback=12, freq="15min", graph=graph)  # type: ignore[arg-type]
    return out


def test_inference_module_does_not_import_torch() -> None:
    code = "import sys, forecaster.inference; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_metadata_and_initial_state(paths: dict[str, Path]) -> None:
    session = open_session(paths["step"], device="cpu", intra_op_threads=1)
    meta = model_metadata(session)
    assert meta["model"] == "mi_gru"
    assert meta["graph"] == "step"
    assert meta["lookback"] == "12"
    assert meta["freq"] == "15min"
    state = initial_state(session, 4)
    assert state.shape == (4, HID)
    assert state.dtype == np.float32
    assert not state.any()
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_step_results_chain_into_the_window_forecast(paths: dict[str, Path]) -> None:
    window = open_session(paths["window"], device="cpu")
    step = open_session(paths["step"], device="cpu")
    x = np.random.default_rng(1).standard_normal((5, 12, D))  # float64 in: cast to float32
    state = initial_state(step, 5)
    for chunk in np.split(x, [3, 4], axis=1):
        result = forecast_step(step, chunk, state)
        assert isinstance(result, StepResult)
        assert result.state.shape == (5, HID)
        state = result.state
    expected = forecast_window(window, x)
    assert expected.shape == (5, HORIZON)
    assert expected.dtype == np.float32
    assert np.max(np.abs(result.forecast - expected)) <= 1e-5


def test_inputs_with_wrong_shapes_are_refused_by_name(paths: dict[str, Path]) -> None:
    window = open_session(paths["window"], device="cpu")
    step = open_session(paths["step"], device="cpu")
    with pytest.raises(ServingError, match=r"x: shape \(4, 12\) is not \[B, T, d\]"):
        forecast_window(window, np.zeros((4, 12)))
    with pytest.raises(ServingError, match=r"x: shape \(4, 12, 5\) is not \[B, T, d\] .* 2"):
        forecast_window(window, np.zeros((4, 12, 5)))
    with pytest.raises(ServingError, match=r"x: needs at least one time step"):
        forecast_window(window, np.zeros((4, 0, D)))
    with pytest.raises(ServingError, match=r"state: shape \(4, 7\) is not \[B, S\]"):
        forecast_step(step, np.zeros((4, 1, D)), np.zeros((4, 7)))
    with pytest.raises(ServingError, match=r"state: batch 3 does not match x_new's batch 4"):
        forecast_step(step, np.zeros((4, 1, D)), np.zeros((3, HID)))
    with pytest.raises(ModelError, match="forecast_step needs a step graph"):
        forecast_step(window, np.zeros((4, 1, D)), np.zeros((4, HID)))


def test_missing_or_corrupt_files_are_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        open_session(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="cannot load model"):
        open_session(corrupt)


def test_bad_device_and_thread_count_are_refused(paths: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="device: 'tpu' is not"):
        open_session(paths["window"], device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="intra_op_threads: 0 is not a positive integer"):
        open_session(paths["window"], intra_op_threads=0)


def test_cuda_is_chosen_only_when_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        inference.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(inference, "_cuda_driver_present", lambda: False)
    assert select_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match="device: 'cuda' asked for but CUDA is not usable"):
        select_providers("cuda")
    monkeypatch.setattr(inference, "_cuda_driver_present", lambda: True)
    assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(inference.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert select_providers("auto") == ["CPUExecutionProvider"]
