"""Tests of forecaster.evaluation: window enumeration, the protocol's metrics, batching.

The window counts are the protocol's (../shared/data/README.md §1) on the real ETT files: they
fail, never skip, without ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecaster import evaluation
from forecaster.baselines import baseline, repeat_last
from forecaster.data import Split, ett_split, holdout_split, read_wide
from forecaster.errors import DataError, ModelError
from forecaster.evaluation import (
    Windows,
    evaluate_forecaster,
    part_windows,
    protocol_metrics,
    train_scale,
)
from forecaster.metrics import mae, mse

LOOKBACK = 336
HORIZONS = [96, 192, 336, 720]
# dataset -> (file, split name, windows in a 4-month part = protocol constant - H)
ETT = {"ETTh1": ("ETTh1.csv", "ETTh", 2881), "ETTm1": ("ETTm1.csv", "ETTm", 11521)}


@pytest.fixture(scope="module")
def ett_ot(shared_data: Path) -> dict[str, np.ndarray]:
    return {
        name: read_wide(shared_data / "ett" / file, columns=["OT"])["y"].to_numpy()
        for name, (file, _, _) in ETT.items()
    }


@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("part", ["test", "val"])
@pytest.mark.parametrize("dataset", list(ETT))
def test_ett_window_counts_equal_the_protocol(ett_ot, dataset, part, horizon) -> None:
    _, kind, constant = ETT[dataset]
    values = ett_ot[dataset]
    split = ett_split(len(values), dataset=kind, lookback=LOOKBACK)
    windows = part_windows(values, split, horizon, part=part)
    assert windows.n_windows == constant - horizon
    assert windows.inputs.shape == (constant - horizon, LOOKBACK)
    assert windows.targets.shape == (constant - horizon, horizon)


@pytest.mark.parametrize("dataset", list(ETT))
def test_ett_test_windows_cover_exactly_the_test_months(ett_ot, dataset) -> None:
    _, kind, constant = ETT[dataset]
    values = ett_ot[dataset]
    month = (constant - 1) // 4  # rows in a 30-day month: 720 hourly, 2880 at 15 min
    split = ett_split(len(values), dataset=kind, lookback=LOOKBACK)
    windows = evaluation.test_windows(values, split, 96)
    first, last = int(windows.origins[0]), int(windows.origins[-1])
    assert first == 16 * month  # the first target is the test part's first row: 11520 hourly
    assert last + 96 == 20 * month  # the last target is row 14399 / 57599
    np.testing.assert_array_equal(windows.targets[0], values[first : first + 96])
    np.testing.assert_array_equal(windows.inputs[0], values[first - LOOKBACK : first])
    np.testing.assert_array_equal(windows.targets[-1], values[last : last + 96])
    np.testing.assert_array_equal(np.diff(windows.origins), 1)  # stride 1


def test_test_windows_is_not_collected_by_pytest() -> None:
    assert evaluation.test_windows.__test__ is False


def _series(n: int = 400) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    return 3.0 + np.sin(t / 5.0) + 0.01 * t


def test_windows_of_each_part_stay_inside_it() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    for part in ("train", "val", "test"):
        windows = part_windows(values, split, 7, part=part)
        rows: slice = getattr(split, part)
        assert windows.n_windows == split.n_windows(part, 7)
        assert windows.origins[0] - 20 == rows.start
        assert windows.origins[-1] + 7 == rows.stop
        assert windows.part == part


def test_windows_are_read_only_views_of_the_series() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    windows = evaluation.test_windows(values, split, 5)
    assert isinstance(windows, Windows)
    with pytest.raises(ValueError, match="read-only"):
        windows.inputs[0, 0] = 0.0


def test_windows_refuse_a_part_too_short_for_one_window() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=10, lookback=20)
    with pytest.raises(DataError, match="the test part has 30 rows, too few .* horizon 11"):
        evaluation.test_windows(values, split, 11)
    assert evaluation.test_windows(values, split, 10).n_windows == 1


def test_windows_refuse_bad_series_and_arguments() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    with pytest.raises(DataError, match="the series has 399 rows; the split reaches row 400"):
        evaluation.test_windows(values[:-1], split, 5)
    with pytest.raises(DataError, match=r"expected a 1-D series .* shape \(400, 1\)"):
        evaluation.test_windows(values[:, None], split, 5)
    with pytest.raises(DataError, match="horizon: 0 is not an integer >= 1"):
        evaluation.test_windows(values, split, 0)
    with pytest.raises(DataError, match="part: 'holdout' is not one of train, val, test"):
        part_windows(values, split, 5, part="holdout")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="lookback: 0 is not an integer >= 1"):
        evaluation.test_windows(
            values, Split(slice(0, 300), slice(300, 350), slice(350, 400), 0), 5
        )


def test_windows_refuse_non_finite_values_in_used_rows_only() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    broken = values.copy()
    broken[371] = np.nan
    with pytest.raises(DataError, match=r"values, row 371: nan is not finite \(1 such rows"):
        evaluation.test_windows(broken, split, 5)
    # A gap in rows the test part does not use (the validation months) is no obstacle.
    broken = values.copy()
    broken[300] = np.inf
    assert evaluation.test_windows(broken, split, 5).n_windows == 56


def test_protocol_metrics_zscore_with_the_training_statistics() -> None:
    y_true = np.array([[12.0, 14.0], [10.0, 10.0]])
    y_pred = np.array([[14.0, 14.0], [10.0, 16.0]])
    # z-errors = errors / 2: [[1, 0], [0, 3]]
    result = protocol_metrics(y_true, y_pred, train_mean=10.0, train_std=2.0)
    assert result["mse"] == pytest.approx((1 + 0 + 0 + 9) / 4)
    assert result["mae"] == pytest.approx((1 + 0 + 0 + 3) / 4)
    np.testing.assert_allclose(result["mse_per_step"], [0.5, 4.5])
    np.testing.assert_allclose(result["mae_per_step"], [0.5, 1.5])
    assert result["n_windows"] == 2
    # The mean cancels in the errors; only the std scales them.
    shifted = protocol_metrics(y_true, y_pred, train_mean=-7.0, train_std=2.0)
    assert shifted["mse"] == pytest.approx(result["mse"])


@pytest.mark.parametrize("std", [0.0, -1.0, np.nan])
def test_protocol_metrics_refuse_a_non_positive_std(std) -> None:
    with pytest.raises(DataError, match="need finite values and std > 0"):
        protocol_metrics(np.zeros((1, 2)), np.zeros((1, 2)), 0.0, std)


def test_protocol_metrics_refuse_mismatched_shapes() -> None:
    with pytest.raises(DataError, match=r"y_pred: shape \(2, 2\) does not match y_true's \(2, 3\)"):
        protocol_metrics(np.zeros((2, 3)), np.zeros((2, 2)), 0.0, 1.0)


def test_train_scale_is_the_population_std_of_the_training_rows() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    scale = train_scale(values, split)
    assert scale.mean == pytest.approx(values[:290].mean())
    assert scale.std == pytest.approx(values[:290].std(ddof=0))
    with pytest.raises(DataError, match=r"training rows \[0, 290\) are constant"):
        train_scale(np.ones(400), split)


class _CountingForecaster:
    """Repeat-last that records the size of every batch it is given."""

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.batches: list[int] = []

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        self.batches.append(inputs.shape[0])
        return repeat_last(inputs, self.horizon)


@pytest.mark.parametrize(("batch_size", "last"), [(128, 97), (32, 1), (2785, 2785), (4096, 2785)])
def test_evaluate_keeps_the_last_incomplete_batch(ett_ot, batch_size, last) -> None:
    values = ett_ot["ETTh1"]
    split = ett_split(len(values), dataset="ETTh", lookback=LOOKBACK)
    forecaster = _CountingForecaster(96)
    result = evaluate_forecaster(forecaster, values, split, 96, batch_size=batch_size)
    assert sum(forecaster.batches) == result.n_evaluated == result.n_windows == 2785
    assert forecaster.batches[-1] == result.last_batch_size == last
    assert len(forecaster.batches) == result.n_batches == -(-2785 // batch_size)
    windows = evaluation.test_windows(values, split, 96)
    z = 1.0 / result.scale.std
    full = mse(windows.targets * z, repeat_last(windows.inputs, 96) * z)
    assert result.metrics["mse"] == pytest.approx(full, rel=1e-12)
    if result.n_batches > 1 and last < batch_size:  # a drop_last loader would report otherwise
        kept = 2785 - last
        dropped = mse(windows.targets[:kept] * z, repeat_last(windows.inputs[:kept], 96) * z)
        assert abs(dropped - full) > 1e-6


def test_evaluate_scores_val_and_test_with_the_training_scale() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    for part in ("val", "test"):
        result = evaluate_forecaster(baseline("window_mean", 4), values, split, 4, part=part)
        windows = part_windows(values, split, 4, part=part)
        std = values[:290].std()
        predictions = windows.inputs.mean(axis=1, keepdims=True).repeat(4, axis=1)
        assert result.part == part
        assert result.metrics["mae"] == pytest.approx(mae(windows.targets / std, predictions / std))
        assert result.metrics["mse_per_step"].shape == (4,)


def test_evaluate_passes_origins_to_a_forecaster_that_asks_for_them() -> None:
    # A daily profile that a 5-step window cannot reveal, but the windows' rows (hence phases) do.
    t = np.arange(24 * 20)
    profile = np.random.default_rng(4).normal(size=24)
    values = profile[t % 24]
    split = holdout_split(len(values), val_size=72, test_size=72, lookback=5)
    seen: list[np.ndarray] = []

    def by_phase(inputs: np.ndarray, origins: np.ndarray) -> np.ndarray:
        seen.append(origins)
        return profile[(origins[:, None] + np.arange(6)) % 24]

    result = evaluate_forecaster(by_phase, values, split, 6, batch_size=16, with_origins=True)
    np.testing.assert_array_equal(
        np.concatenate(seen), evaluation.test_windows(values, split, 6).origins
    )
    assert result.metrics["mse"] == 0.0
    assert result.n_evaluated == 72 - 6 + 1


def test_evaluate_gives_the_forecaster_writable_copies() -> None:
    values = _series()
    original = values.copy()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)

    def scribbling(inputs: np.ndarray) -> np.ndarray:
        inputs[:] = 0.0  # a careless forecaster must not corrupt the series
        return np.zeros((inputs.shape[0], 3))

    evaluate_forecaster(scribbling, values, split, 3, batch_size=7)
    np.testing.assert_array_equal(values, original)


def test_evaluate_refuses_forecasts_of_the_wrong_shape() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    with pytest.raises(
        ModelError, match=r"shape \(10, 4\) for a batch of 10 windows; expected \(10, 5\)"
    ):
        evaluate_forecaster(lambda x: np.zeros((x.shape[0], 4)), values, split, 5, batch_size=10)


def test_evaluate_refuses_non_finite_forecasts_naming_the_window() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)

    def broken(inputs: np.ndarray) -> np.ndarray:
        out = repeat_last(inputs, 5)
        out[-1, 2] = np.nan
        return out

    # Test targets start at row 340; the first batch of 10 ends with the window of origin 349.
    with pytest.raises(ModelError, match="non-finite .* origin row 349, step 2: nan"):
        evaluate_forecaster(broken, values, split, 5, batch_size=10)


def test_evaluate_refuses_a_bad_batch_size() -> None:
    values = _series()
    split = holdout_split(len(values), val_size=50, test_size=60, lookback=20)
    with pytest.raises(DataError, match="batch_size: 0 is not an integer >= 1"):
        evaluate_forecaster(baseline("repeat_last", 3), values, split, 3, batch_size=0)
