"""Tests of forecaster.metrics: formulas on hand-computed cases and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.errors import DataError, ForecasterError
from forecaster.metrics import (
    coverage,
    coverage_per_step,
    mae,
    mae_per_step,
    mase,
    mase_per_step,
    mse,
    mse_per_step,
    smape,
    smape_per_step,
)

Y_TRUE = np.array([[1.0, 2.0], [3.0, 4.0]])
Y_PRED = np.array([[1.0, 3.0], [5.0, 1.0]])  # errors [[0, -1], [-2, 3]]


def test_mse_and_mae_match_hand_computation() -> None:
    assert mse(Y_TRUE, Y_PRED) == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert mae(Y_TRUE, Y_PRED) == pytest.approx((0 + 1 + 2 + 3) / 4)


def test_per_step_variants_average_over_windows_only() -> None:
    np.testing.assert_allclose(mse_per_step(Y_TRUE, Y_PRED), [(0 + 4) / 2, (1 + 9) / 2])
    np.testing.assert_allclose(mae_per_step(Y_TRUE, Y_PRED), [(0 + 2) / 2, (1 + 3) / 2])
    assert mse_per_step(Y_TRUE, Y_PRED).shape == (2,)


def test_mase_with_season_1_scales_by_in_sample_naive_error() -> None:
    y_train = np.array([1.0, 3.0, 2.0, 5.0])  # |diffs| 2, 1, 3 -> scale 2
    y_true, y_pred = np.array([[4.0, 6.0]]), np.array([[5.0, 2.0]])  # |errors| 1, 4
    assert mase(y_true, y_pred, y_train, season=1) == pytest.approx(2.5 / 2)
    np.testing.assert_allclose(mase_per_step(y_true, y_pred, y_train, 1), [0.5, 2.0])


def test_mase_with_season_24_uses_the_seasonal_difference() -> None:
    # y[t] - y[t-24] for t = 24..47 is 1, 2, ..., 24: scale 12.5 (season 1 would give 0.5).
    y_train = np.concatenate([np.zeros(24), np.arange(1.0, 25.0)])
    y_true, y_pred = np.array([[4.0, 6.0]]), np.array([[5.0, 2.0]])
    assert mase(y_true, y_pred, y_train, season=24) == pytest.approx(2.5 / 12.5)
    assert mase(y_true, y_pred, y_train, season=1) == pytest.approx(2.5 / (24 / 47))


def test_mase_with_one_history_per_window_scales_each_window() -> None:
    y_train = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]])  # scales 1 and 2
    y_true = np.zeros((2, 2))
    y_pred = np.array([[1.0, 1.0], [2.0, 6.0]])
    np.testing.assert_allclose(mase_per_step(y_true, y_pred, y_train, 1), [1.0, 2.0])
    assert mase(y_true, y_pred, y_train, 1) == pytest.approx(1.5)


def test_mase_refuses_a_training_series_without_seasonal_variation() -> None:
    with pytest.raises(DataError, match="MASE is undefined .* season 24"):
        mase(Y_TRUE, Y_PRED, np.tile(np.arange(24.0), 3), season=24)


def test_mase_refuses_bad_season_and_short_or_mismatched_history() -> None:
    with pytest.raises(DataError, match="season: 0 is not an integer >= 1"):
        mase(Y_TRUE, Y_PRED, np.arange(10.0), season=0)
    with pytest.raises(DataError, match="24 values are too few for season 24"):
        mase(Y_TRUE, Y_PRED, np.arange(24.0), season=24)
    with pytest.raises(DataError, match=r"N = 2 .* got shape \(3, 5\)"):
        mase(Y_TRUE, Y_PRED, np.ones((3, 5)), season=1)
    with pytest.raises(DataError, match=r"y_train: 1 non-finite value\(s\); first at \[0, 2\]"):
        mase(Y_TRUE, Y_PRED, [0.0, 1.0, np.nan, 3.0], season=1)


def test_smape_matches_hand_computation_with_zero_over_zero_as_zero() -> None:
    y_true = np.array([[100.0, 0.0, 0.0, -50.0]])
    y_pred = np.array([[110.0, 0.0, 5.0, -50.0]])
    # Terms: 200*10/210, 0/0 := 0 (both zero: perfect), 200*5/5 = 200, 0.
    expected_terms = [2000 / 210, 0.0, 200.0, 0.0]
    np.testing.assert_allclose(smape_per_step(y_true, y_pred), expected_terms)
    assert smape(y_true, y_pred) == pytest.approx(sum(expected_terms) / 4)


def test_smape_of_all_zero_actuals_and_forecasts_is_zero_not_nan() -> None:
    assert smape(np.zeros((3, 4)), np.zeros((3, 4))) == 0.0


def test_smape_is_bounded_by_200() -> None:
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    assert 0.0 <= smape(y_true, y_pred) <= 200.0
    assert smape(np.ones((1, 1)), -np.ones((1, 1))) == pytest.approx(200.0)


def test_coverage_counts_inclusive_bounds() -> None:
    y_true = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    lower = np.array([[0.0, 2.0, 4.0], [4.0, 6.0, 5.0]])
    upper = np.array([[2.0, 2.0, 5.0], [5.0, 7.0, 7.0]])
    # inside: yes, yes (on both bounds), no | yes (on lower), no, yes
    assert coverage(y_true, lower, upper) == pytest.approx(4 / 6)
    np.testing.assert_allclose(coverage_per_step(y_true, lower, upper), [1.0, 0.5, 0.5])


def test_coverage_refuses_crossed_bounds() -> None:
    with pytest.raises(DataError, match=r"lower > upper at 1 position\(s\); first at window 0"):
        coverage(np.zeros((1, 2)), np.array([[0.0, 1.0]]), np.array([[1.0, 0.5]]))


def test_coverage_refuses_bounds_of_another_shape() -> None:
    with pytest.raises(DataError, match=r"upper: shape \(1, 3\) does not match"):
        coverage(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 3)))


@pytest.mark.parametrize("metric", [mse, mae, smape, mse_per_step, mae_per_step, smape_per_step])
def test_metrics_refuse_mismatched_shapes(metric) -> None:
    with pytest.raises(DataError, match=r"y_pred: shape \(3, 2\) does not match y_true's \(2, 3\)"):
        metric(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("metric", [mse, mae, smape])
def test_metrics_refuse_non_finite_values_naming_the_position(metric) -> None:
    y_pred = np.zeros((2, 3))
    y_pred[1, 2] = np.nan
    expected = r"y_pred: 1 non-finite value\(s\); first at window 1, step 2: nan"
    with pytest.raises(DataError, match=expected):
        metric(np.zeros((2, 3)), y_pred)
    y_true = np.zeros((2, 3))
    y_true[0, 1] = np.inf
    with pytest.raises(ForecasterError, match="y_true: .* first at window 0, step 1: inf"):
        metric(y_true, np.zeros((2, 3)))


def test_metrics_refuse_1d_and_empty_inputs() -> None:
    with pytest.raises(DataError, match=r"expected a 2-D \[N, H\] array .* y\[None, :\]"):
        mse(np.zeros(3), np.zeros(3))
    with pytest.raises(DataError, match="no values to score"):
        mae(np.zeros((0, 3)), np.zeros((0, 3)))


def test_metrics_do_not_modify_their_inputs() -> None:
    y_true, y_pred = Y_TRUE.copy(), Y_PRED.copy()
    mse(y_true, y_pred), smape(y_true, y_pred), mase(y_true, y_pred, [0.0, 1.0, 3.0], 1)
    np.testing.assert_array_equal(y_true, Y_TRUE)
    np.testing.assert_array_equal(y_pred, Y_PRED)
