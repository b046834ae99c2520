from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_configs import tiny_config

from forecaster.calibration import CALIBRATION_FILE, DEFAULT_LEVELS, Calibration, conformal_rank
from forecaster.config import Config
from forecaster.errors import ConfigError, ModelError
from forecaster.evaluation import part_windows
from forecaster.inference import open_session
from pipelines.prepare import prepare
from pipelines.train import (
    METADATA_FILE,
    MODEL_FILE,
    STEP_MODEL_FILE,
    OnnxSeriesForecaster,
    choose_method,
    evaluate_baselines,
    evaluate_bundle,
    model_inputs,
    run_training,
)


def _config(tmp_path: Path, **sections: object) -> Config:
    return tiny_config(tmp_path / "out", **sections)


def _walk_csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    ds = pd.date_range("2024-01-01", periods=600, freq="h")
    y = np.cumsum(rng.normal(size=600))
    pd.DataFrame({"unique_id": "w", "ds": ds, "y": y}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, object]:
    tmp_path = tmp_path_factory.mktemp("train")
    config = _config(tmp_path)
    return config, run_training(config)


def test_training_writes_a_complete_bundle(trained: tuple[Config, object]) -> None:
    config, outcome = trained
    bundle = outcome.bundle  # type: ignore[attr-defined]
    names = {p.name for p in bundle.iterdir()}
    assert {MODEL_FILE, STEP_MODEL_FILE, METADATA_FILE, "preprocessing.json"} <= names
    assert bundle.stat().st_mode & 0o777 == 0o755  # readable by a serving account
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    assert metadata["training_method"] == outcome.method  # type: ignore[attr-defined]
    assert metadata["metrics"]["test"]["n_windows"] == 2 * (72 - 6 + 1)
    assert len(metadata["history"]["epochs"]) >= 1
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]


def test_evaluate_bundle_reproduces_the_logged_test_metric(
    trained: tuple[Config, object],
) -> None:
    config, outcome = trained
    scores = evaluate_bundle(config, outcome.bundle)  # type: ignore[attr-defined]
    logged = outcome.evaluations["test"]  # type: ignore[attr-defined]
    assert scores["model"]["mse"] == pytest.approx(logged["mse"], rel=1e-9)
    assert set(scores) == {"model", "repeat_last", "seasonal_naive"}


@pytest.mark.parametrize("key", ["horizon", "lookback"])
def test_evaluating_with_another_window_names_the_key(
    trained: tuple[Config, object], key: str
) -> None:
    config, outcome = trained
    value = getattr(config.window, key)
    other = config.model_copy(update={"window": config.window.model_copy(update={key: value + 1})})
    with pytest.raises(ConfigError, match=rf"window.{key}: {value + 1} in the config, .* {value}"):
        evaluate_bundle(other, outcome.bundle)  # type: ignore[attr-defined]


def test_evaluating_a_bundle_with_broken_metadata_names_the_file(
    trained: tuple[Config, object], tmp_path: Path
) -> None:
    config, outcome = trained
    broken = tmp_path / "bundle"
    shutil.copytree(outcome.bundle, broken)  # type: ignore[attr-defined]
    (broken / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelError, match=r"metadata.json is not valid bundle metadata"):
        evaluate_bundle(config, broken)


def test_bundle_calibration_is_fitted_on_the_validation_residuals(
    trained: tuple[Config, object],
) -> None:
    config, outcome = trained
    bundle = outcome.bundle  # type: ignore[attr-defined]
    calibration = Calibration.load(bundle / CALIBRATION_FILE)
    assert calibration.to_dict() == outcome.calibration.to_dict()  # type: ignore[attr-defined]
    assert calibration.levels == DEFAULT_LEVELS
    assert calibration.horizon == 6
    prepared = prepare(config)
    inputs = model_inputs(prepared)
    session = open_session(bundle / MODEL_FILE)
    assert set(calibration.series) == set(prepared.splits)
    for name, frame in prepared.data.frame.groupby("unique_id", sort=False):
        split = prepared.splits[str(name)]
        y = frame["y"].to_numpy(np.float64)
        windows = part_windows(y, split, 6, part="val")
        forecaster = OnnxSeriesForecaster(
            session=session,
            spec=prepared.spec.for_series(str(name)),
            transformed=inputs.transformed[str(name)],
            ds=frame["ds"].to_numpy(),
            lookback=split.lookback,
            horizon=6,
            name=str(name),
        )
        scores = np.sort(np.abs(forecaster(windows.inputs, windows.origins) - windows.targets), 0)
        series = calibration.series[str(name)]
        assert series.n_residuals == 72 - 6 + 1
        for i, level in enumerate(DEFAULT_LEVELS):
            expected = scores[conformal_rank(series.n_residuals, level) - 1]
            np.testing.assert_allclose(series.quantiles[i], expected, rtol=1e-6)


def test_test_metrics_include_interval_coverage_and_width(
    trained: tuple[Config, object],
) -> None:
    _, outcome = trained
    metadata = json.loads((outcome.bundle / METADATA_FILE).read_text())  # type: ignore[attr-defined]
    logged = outcome.evaluations["test"]  # type: ignore[attr-defined]
    assert metadata["metrics"]["test"] == pytest.approx(logged, rel=1e-12)
    for label in ("80", "95"):
        assert 0.0 <= logged[f"coverage_{label}"] <= 1.0
        assert logged[f"width_{label}"] > 0
    assert logged["coverage_80"] <= logged["coverage_95"]
    assert logged["width_80"] <= logged["width_95"]
    assert "coverage_80" not in outcome.evaluations["val"]  # type: ignore[attr-defined]


def test_evaluate_bundle_reports_the_coverage_of_its_calibration(
    trained: tuple[Config, object], tmp_path: Path
) -> None:
    config, outcome = trained
    bundle = outcome.bundle  # type: ignore[attr-defined]
    logged = outcome.evaluations["test"]  # type: ignore[attr-defined]
    scores = evaluate_bundle(config, bundle)["model"]
    for key in ("coverage_80", "coverage_95", "width_80", "width_95"):
        assert scores[key] == pytest.approx(logged[key], rel=1e-9)
    # On the windows it was fitted on, a conformal quantile covers at least its level per step.
    val = evaluate_bundle(config, bundle, part="val")["model"]
    assert val["coverage_80"] >= 0.8
    assert val["coverage_95"] >= 0.95
    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare)
    (bare / CALIBRATION_FILE).unlink()
    assert "coverage_80" not in evaluate_bundle(config, bare)["model"]


def _walk_config(tmp_path: Path, **sections: object) -> Config:
    """A random walk, undifferenced (`d_max: 0`): the stationarity gate chooses BPTT."""
    data = {
        "source": "file",
        "path": str(_walk_csv(tmp_path / "walk.csv")),
        "split": {"val_size": 72, "test_size": 72},
    }
    plain = {"trend": "none", "seasonality": "none"}
    return _config(
        tmp_path, data=data, preprocess=plain, **{"stationarity": {"d_max": 0}, **sections}
    )


def test_gate_decides_the_method(tmp_path: Path) -> None:
    config = _walk_config(tmp_path)
    method, reason = choose_method(config, prepare(config), None)
    assert method == "bptt"
    assert "stationarity gate chose BPTT" in reason
    strict = _walk_config(tmp_path, stationarity={"d_max": 0, "strict": True})
    with pytest.raises(ModelError, match="stationarity gate refused"):
        choose_method(strict, prepare(strict), None)
    assert choose_method(strict, prepare(strict), "bptt")[0] == "bptt"


def test_history_records_the_requested_method_when_the_gate_chose_bptt(tmp_path: Path) -> None:
    config = _walk_config(tmp_path, train={"epochs": 1})
    outcome = run_training(config)
    assert config.train.method == "feedback"
    assert (outcome.method, outcome.history.requested_method) == ("bptt", "feedback")
    metadata = json.loads((outcome.bundle / METADATA_FILE).read_text())
    assert metadata["history"]["requested_method"] == "feedback"
    assert "stationarity gate chose BPTT" in metadata["history"]["method_reason"]


def test_seasonal_naive_uses_the_daily_period_without_fitted_seasonality(tmp_path: Path) -> None:
    ds = pd.date_range("2024-01-01", periods=96 * 12, freq="15min")
    day = np.sin(2 * np.pi * np.arange(len(ds)) / 96)
    path = tmp_path / "q.csv"
    pd.DataFrame({"unique_id": "q", "ds": ds, "y": 5 + day}).to_csv(path, index=False)
    config = _config(
        tmp_path,
        data={"source": "file", "path": str(path), "split": {"val_size": 192, "test_size": 192}},
        window={"lookback": 96, "horizon": 24},
        preprocess={"trend": "none", "seasonality": "none"},
    )
    scores = evaluate_baselines(prepare(config), 24)
    # A pure daily cycle: seasonal naive with season 96 is exact, repeat-last is not.
    assert scores["seasonal_naive"]["mse"] < 1e-20
    assert scores["repeat_last"]["mse"] > 0.1


def test_a_model_with_a_linear_readout_and_matrix_feedback_goes_through_the_pipeline(
    tmp_path: Path,
) -> None:
    """`model.linear_lags` + `jacobian_matrix`: trained with feedback, exported (parity checked
    inside), and the bundle's ONNX model reproduces the logged test metric."""
    config = _config(
        tmp_path,
        model={"name": "scrn", "hidden_size": 8, "linear_lags": 24},
        train={
            "epochs": 2,
            "batch_size": 64,
            "stride": 2,
            "feedback": {"kind": "jacobian_matrix", "corrections": 1},
        },
    )
    outcome = run_training(config, method="feedback")
    assert outcome.method == "feedback", outcome.method_reason
    assert outcome.model.state_size == outcome.model.cell_size + 24
    metadata = json.loads((outcome.bundle / METADATA_FILE).read_text())
    assert metadata["model"]["linear_lags"] == 24
    scores = evaluate_bundle(config, outcome.bundle)
    assert scores["model"]["mse"] == pytest.approx(outcome.evaluations["test"]["mse"], rel=1e-9)
