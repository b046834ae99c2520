"""Tests of forecaster.baselines: hand cases, the ETTh1 figures, the optional statsforecast models.

The ETTh1 figures are the standard protocol's (OT, look-back 336, all test windows, MSE/MAE on the
scale z-scored with the training rows' mean and std); they fail, never skip, without ../shared.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecaster.baselines import (
    BASELINES,
    baseline,
    repeat_last,
    seasonal_naive,
    statsforecast_forecast,
    window_mean,
)
from forecaster.data import ett_split, holdout_split, read_wide
from forecaster.errors import DataError, ModelError
from forecaster.evaluation import evaluate_forecaster

LOOKBACK = 336
HAS_STATSFORECAST = importlib.util.find_spec("statsforecast") is not None


@pytest.fixture(scope="module")
def etth1_ot(shared_data: Path) -> np.ndarray:
    return read_wide(shared_data / "ett" / "ETTh1.csv", columns=["OT"])["y"].to_numpy()


def test_repeat_last_repeats_each_windows_last_value() -> None:
    inputs = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(repeat_last(inputs, 2), [[3.0, 3.0], [6.0, 6.0]])


def test_seasonal_naive_cycles_through_the_last_season() -> None:
    inputs = np.array([[1.0, 2.0, 3.0, 4.0], [9.0, 8.0, 7.0, 6.0]])
    np.testing.assert_array_equal(
        seasonal_naive(inputs, 5, season=2), [[3, 4, 3, 4, 3], [7, 6, 7, 6, 7]]
    )
    np.testing.assert_array_equal(seasonal_naive(inputs, 2, season=4), inputs[:, :2])


def test_seasonal_naive_with_season_1_is_repeat_last() -> None:
    inputs = np.random.default_rng(1).normal(size=(5, 30))
    np.testing.assert_array_equal(seasonal_naive(inputs, 7, 1), repeat_last(inputs, 7))


def test_window_mean_forecasts_the_mean_of_each_window() -> None:
    inputs = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(window_mean(inputs, 3), [[3.0] * 3, [1.0] * 3])


def test_seasonal_naive_is_exact_on_a_purely_periodic_series() -> None:
    t = np.arange(24 * 60)
    profile = np.random.default_rng(2).normal(size=24)
    values = 10.0 + profile[t % 24] + np.sin(2 * np.pi * t / 24)
    split = holdout_split(len(values), val_size=24 * 10, test_size=24 * 10, lookback=48)
    exact = evaluate_forecaster(baseline("seasonal_naive", 36, season=24), values, split, 36)
    naive = evaluate_forecaster(baseline("repeat_last", 36), values, split, 36)
    assert exact.metrics["mse"] == pytest.approx(0.0, abs=1e-24)
    assert exact.metrics["mae"] == pytest.approx(0.0, abs=1e-12)
    assert naive.metrics["mse"] > 0.1
    assert exact.n_evaluated == 240 - 36 + 1


def test_baseline_factory_binds_horizon_and_season() -> None:
    inputs = np.arange(48.0)[None, :]
    np.testing.assert_array_equal(baseline("repeat_last", 3)(inputs), [[47.0] * 3])
    np.testing.assert_array_equal(baseline("seasonal_naive", 3, season=24)(inputs), [[24, 25, 26]])
    np.testing.assert_allclose(baseline("window_mean", 2)(inputs), [[23.5, 23.5]])
    assert set(BASELINES) == {
        "repeat_last",
        "seasonal_naive",
        "window_mean",
        "auto_ets",
        "auto_arima",
    }


def test_baseline_factory_refuses_unknown_names_and_misplaced_seasons() -> None:
    with pytest.raises(ModelError, match="unknown name 'naive'; valid: repeat_last, seasonal_"):
        baseline("naive", 3)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="repeat_last has no season, got 24; use seasonal_naive"):
        baseline("repeat_last", 3, season=24)
    with pytest.raises(ModelError, match="horizon: 0 is not an integer >= 1"):
        baseline("window_mean", 0)


def test_baselines_refuse_bad_inputs() -> None:
    with pytest.raises(DataError, match="windows of 12 steps are too short; .* at least 24"):
        seasonal_naive(np.zeros((2, 12)), 4, season=24)
    with pytest.raises(ModelError, match="season: 0 is not an integer >= 1"):
        seasonal_naive(np.zeros((2, 12)), 4, season=0)
    with pytest.raises(DataError, match=r"expected a 2-D \[N, L\] array .* got shape \(12,\)"):
        repeat_last(np.zeros(12), 4)
    inputs = np.zeros((3, 5))
    inputs[2, 4] = np.nan
    with pytest.raises(DataError, match=r"1 non-finite value\(s\); first at window 2, step 4"):
        window_mean(inputs, 4)


def test_statsforecast_baseline_without_the_package_says_how_to_install(monkeypatch) -> None:
    # None in sys.modules makes `import statsforecast.models` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "statsforecast", None)
    monkeypatch.setitem(sys.modules, "statsforecast.models", None)
    forecast = baseline("auto_ets", 4, season=2)
    with pytest.raises(ModelError, match="optional package statsforecast.*: pip install"):
        forecast(np.arange(20.0)[None, :])
    with pytest.raises(ModelError, match="auto_arima baseline needs .* pip install statsforecast"):
        statsforecast_forecast(np.arange(20.0)[None, :], 4, model="auto_arima")


def test_statsforecast_baseline_forecasts_when_installed_and_refuses_clearly_otherwise() -> None:
    t = np.arange(24 * 9)
    values = 5.0 + np.sin(2 * np.pi * t / 24) + 0.01 * np.random.default_rng(3).normal(size=t.size)
    inputs = np.stack([values[:192], values[12:204]])  # [2, 192]
    if not HAS_STATSFORECAST:
        with pytest.raises(ModelError, match="pip install statsforecast"):
            statsforecast_forecast(inputs, 12, model="auto_ets", season=24)
        return
    forecasts = statsforecast_forecast(inputs, 12, model="auto_ets", season=24)
    assert forecasts.shape == (2, 12)
    # A seasonal ETS recovers a clean daily sine; the window mean (5.0) would be off by up to 1.
    np.testing.assert_allclose(forecasts[0], values[192:204], atol=0.1)
    np.testing.assert_allclose(forecasts[1], values[204:216], atol=0.1)


def test_statsforecast_baseline_refuses_unknown_model() -> None:
    with pytest.raises(ModelError, match="'theta' is not a statsforecast baseline"):
        statsforecast_forecast(np.zeros((1, 10)), 2, model="theta")  # type: ignore[arg-type]


# ETTh1 OT, look-back 336, every test window: (MSE, MAE) on the train-z-scored scale.
ETTH1_REPEAT_LAST = {
    96: (0.06926, 0.20328),
    192: (0.09196, 0.23568),
    336: (0.11327, 0.26520),
    720: (0.12918, 0.28341),
}
ETTH1_SEASONAL_NAIVE_24 = {
    96: (0.07145, 0.21051),
    192: (0.09158, 0.23683),
    336: (0.11083, 0.26341),
    720: (0.12523, 0.27963),
}


@pytest.mark.parametrize("horizon", [96, 192, 336, 720])
def test_etth1_repeat_last_and_seasonal_naive_test_scores(etth1_ot, horizon) -> None:
    split = ett_split(len(etth1_ot), dataset="ETTh", lookback=LOOKBACK)
    last = evaluate_forecaster(baseline("repeat_last", horizon), etth1_ot, split, horizon)
    daily = evaluate_forecaster(
        baseline("seasonal_naive", horizon, season=24), etth1_ot, split, horizon
    )
    assert last.n_evaluated == daily.n_evaluated == 2881 - horizon
    assert (last.metrics["mse"], last.metrics["mae"]) == pytest.approx(
        ETTH1_REPEAT_LAST[horizon], abs=1e-5
    )
    assert (daily.metrics["mse"], daily.metrics["mae"]) == pytest.approx(
        ETTH1_SEASONAL_NAIVE_24[horizon], abs=1e-5
    )


def test_etth1_repeat_last_at_96_matches_an_independent_computation(shared_data) -> None:
    # Straight from the README's row numbers, without the library's split, windows or metrics.
    ot = pd.read_csv(shared_data / "ett" / "ETTh1.csv")["OT"].to_numpy(dtype=np.float64)
    mean, std = ot[:8640].mean(), ot[:8640].std()
    sq = ab = 0.0
    count = 0
    for origin in range(11520, 14400 - 96 + 1):  # first target row of each window
        err = (ot[origin : origin + 96] - ot[origin - 1]) / std
        sq, ab, count = sq + float(err @ err), ab + float(np.abs(err).sum()), count + 1
    split = ett_split(len(ot), dataset="ETTh", lookback=LOOKBACK)
    result = evaluate_forecaster(baseline("repeat_last", 96), ot, split, 96)
    assert count == result.n_evaluated == 2785
    assert result.scale.mean == pytest.approx(mean)
    assert result.metrics["mse"] == pytest.approx(sq / (count * 96), rel=1e-12)
    assert result.metrics["mae"] == pytest.approx(ab / (count * 96), rel=1e-12)
    assert result.metrics["mse"] == pytest.approx(0.069, abs=5e-4)  # the prototype's figure
