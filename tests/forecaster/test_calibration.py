from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forecaster.calibration import (
    CALIBRATION_FILE,
    DEFAULT_LEVELS,
    Calibration,
    SeriesCalibration,
    conformal_rank,
    fit_calibration,
    level_label,
)
from forecaster.errors import DataError, ModelError
from forecaster.metrics import coverage, coverage_per_step, interval_width, interval_width_per_step

# Per-step scales grow with the horizon, as forecast errors do: one quantile for all steps would
# over-cover the first steps and under-cover the last.
STEP_SCALES = np.array([0.5, 1.0, 2.0, 4.0])


def _residuals(rng: np.random.Generator, n: int) -> np.ndarray:
    """`[n, 4]` exchangeable residuals: heavy-tailed, skewed, scale growing with the step."""
    return (rng.standard_t(df=4, size=(n, 4)) + 0.3) * STEP_SCALES


def test_coverage_is_at_least_the_level_on_exchangeable_residuals() -> None:
    # n = 29 separates the conformal rank from the plain empirical quantile: at 0.95 it is
    # ceil(30 * 0.95) = 29 (coverage 29/30), where ceil(29 * 0.95) = 28 would cover only 28/30.
    n_cal, n_test, n_seeds = 29, 200, 1000
    per_step: dict[float, list[np.ndarray]] = {level: [] for level in DEFAULT_LEVELS}
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        calibration = fit_calibration({"s": _residuals(rng, n_cal)})
        truth = rng.normal(size=(n_test, 4)) * 10
        point = truth + _residuals(rng, n_test)  # forecast = truth + residual
        for level in DEFAULT_LEVELS:
            lower, upper = calibration.bounds("s", point, level)
            per_step[level].append(coverage_per_step(truth, lower, upper))
    for level in DEFAULT_LEVELS:
        mean = np.mean(per_step[level], axis=0)  # [4] mean coverage over seeds, per step
        # E[coverage] = ceil((n + 1) level) / (n + 1) >= level; the mean over 1000 seeds has a
        # std below sqrt(level (1 - level) / (n + 2) / 1000) <= 0.0023, so 0.01 is four of them.
        expected = conformal_rank(n_cal, level) / (n_cal + 1)
        assert expected >= level
        np.testing.assert_allclose(mean, expected, atol=0.01)
        assert (mean >= level - 0.005).all()


def test_one_quantile_per_step_tracks_each_steps_scale() -> None:
    rng = np.random.default_rng(0)
    calibration = fit_calibration({"s": _residuals(rng, 2000)})
    q = calibration.series["s"].quantiles[0]
    ratios = q / STEP_SCALES
    np.testing.assert_allclose(ratios, ratios.mean(), rtol=0.15)


def test_quantile_is_the_conformal_order_statistic() -> None:
    residuals = -np.arange(1.0, 10.0)[:, None] * np.array([1.0, 2.0])  # |r| = 1..9, 2..18
    calibration = fit_calibration({"s": residuals}, levels=(0.5, 0.8))
    # n = 9: ranks ceil(10 * 0.5) = 5 and ceil(10 * 0.8) = 8.
    np.testing.assert_array_equal(calibration.series["s"].quantiles, [[5.0, 10.0], [8.0, 16.0]])
    assert calibration.series["s"].capped == (False, False)
    assert calibration.series["s"].n_residuals == 9
    # Round-off must not push an exact rank up: (99 + 1) * 0.55 is 55.00000000000001 in floats.
    assert conformal_rank(99, 0.55) == 55
    assert conformal_rank(19, 0.95) == 19
    assert conformal_rank(29, 0.95) == 29


def test_quantiles_are_monotone_in_the_level() -> None:
    rng = np.random.default_rng(3)
    levels = (0.5, 0.8, 0.9, 0.95, 0.99)
    calibration = fit_calibration(
        {"a": _residuals(rng, 150), "b": _residuals(rng, 40)}, levels=levels
    )
    for series in calibration.series.values():
        assert (np.diff(series.quantiles, axis=0) >= 0).all()
        assert series.quantiles.shape == (len(levels), 4)


def test_levels_are_stored_ascending() -> None:
    calibration = fit_calibration({"s": np.ones((30, 2))}, levels=(0.95, 0.8))
    assert calibration.levels == (0.8, 0.95)


def test_too_few_residuals_use_the_largest_and_say_so() -> None:
    residuals = np.array([[1.0, -4.0], [-3.0, 2.0], [2.0, 1.0], [0.5, 0.5], [-1.0, 3.0]])
    calibration = fit_calibration({"s": residuals})
    series = calibration.series["s"]
    # n = 5: 0.8 needs rank ceil(6 * 0.8) = 5 <= 5; 0.95 needs rank 6 > 5, so it is capped.
    assert series.capped == (False, True)
    np.testing.assert_array_equal(series.quantiles, [[3.0, 4.0], [3.0, 4.0]])


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    calibration = fit_calibration(
        {"pump_1": _residuals(rng, 50) / 3, "pump_2": _residuals(rng, 3) * np.pi},
        levels=(0.8, 0.95, 0.975),
    )
    path = calibration.save(tmp_path / CALIBRATION_FILE)
    loaded = Calibration.load(path)
    assert loaded.horizon == calibration.horizon == 4
    assert loaded.levels == calibration.levels
    assert loaded.method == "split_conformal_abs"
    for uid, series in calibration.series.items():
        other = loaded.series[uid]
        assert other.levels == series.levels
        assert other.n_residuals == series.n_residuals
        assert other.capped == series.capped
        np.testing.assert_array_equal(other.quantiles, series.quantiles)
    assert loaded.series["pump_2"].capped == (True, True, True)
    assert loaded.to_dict() == calibration.to_dict()
    assert Calibration.from_dict(json.loads(path.read_text())).to_dict() == loaded.to_dict()
    assert not [p for p in tmp_path.iterdir() if p.name != CALIBRATION_FILE]


def _saved() -> dict[str, object]:
    return fit_calibration({"s": np.arange(20.0).reshape(10, 2)}).to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("horizon"), "horizon: Field required"),
        (lambda d: d.update(format_version=9), "format_version"),
        (lambda d: d.update(levels=[0.95, 0.8]), "not in ascending order"),
        (lambda d: d.update(levels=[0.8, 1.5]), r"level 1\.5 is not in \(0, 1\)"),
        (lambda d: d["series"]["s"].update(quantiles=[[1.0, 2.0]]), "series 's': quantiles must"),
        (lambda d: d["series"]["s"].update(quantiles=[[3.0, 2.0], [1.0, 2.0]]), "decrease"),
        (lambda d: d["series"]["s"].update(quantiles=[[-1.0, 2.0], [1.0, 2.0]]), "negative"),
        (lambda d: d["series"]["s"].update(n_residuals=0), "n_residuals"),
        (lambda d: d.update(series={}), "series"),
        (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
        (lambda d: d.update(method="quantile_regression"), "method"),
        (
            lambda d: d["series"]["s"].update(quantiles=[[1.0, 2.0], [3.0]]),
            "series .s.: quantiles: not a",
        ),
        (
            lambda d: d["series"]["s"].update(quantiles=[[1.0, float("inf")], [1.0, 2.0]]),
            "quantiles.0.1: Input should be a finite number",
        ),
        (lambda d: d["series"]["s"].update(capped=[False]), "capped has 1 entries for 2 levels"),
    ],
)
def test_malformed_file_names_the_problem(tmp_path: Path, edit: object, message: str) -> None:
    data = _saved()
    edit(data)  # type: ignore[operator]
    path = tmp_path / CALIBRATION_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message) as info:
        Calibration.load(path)
    assert str(path) in str(info.value)


def test_inconsistent_calibrations_are_refused() -> None:
    entry = SeriesCalibration(levels=(0.8, 0.95), quantiles=np.ones((2, 3)), n_residuals=10)
    with pytest.raises(ModelError, match=r"series 'a': quantiles must be 2 rows .* of 4 values"):
        Calibration(horizon=4, levels=(0.8, 0.95), series={"a": entry})
    with pytest.raises(ModelError, match=r"series 'a': levels \[0.8, 0.95\] differ from \[0.8\]"):
        Calibration(horizon=3, levels=(0.8,), series={"a": entry})
    with pytest.raises(ModelError, match="no series are calibrated"):
        Calibration(horizon=3, levels=(0.8, 0.95), series={})


def test_unreadable_files_give_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="calibration file not found"):
        Calibration.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"horizon": ')
    with pytest.raises(ModelError, match="broken.json: not valid JSON"):
        Calibration.load(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object, got list"):
        Calibration.load(listed)


def test_bounds_refuse_unknown_series_and_uncalibrated_levels() -> None:
    calibration = fit_calibration({"pump_1": np.ones((20, 3))})
    with pytest.raises(DataError, match="series 'pump_9' was not calibrated.*'pump_1'"):
        calibration.bounds("pump_9", np.zeros(3), 0.8)
    with pytest.raises(
        ModelError, match="level 0.9 is not calibrated; calibrated levels: 0.8, 0.95"
    ):
        calibration.bounds("pump_1", np.zeros(3), 0.9)


def test_bounds_refuse_bad_forecasts() -> None:
    calibration = fit_calibration({"s": np.ones((20, 3))})
    with pytest.raises(DataError, match="4 steps exceed the calibrated horizon 3"):
        calibration.bounds("s", np.zeros(4), 0.8)
    with pytest.raises(DataError, match="1 non-finite"):
        calibration.bounds("s", np.array([0.0, np.nan]), 0.8)
    with pytest.raises(DataError, match=r"got shape \(1, 1, 3\)"):
        calibration.bounds("s", np.zeros((1, 1, 3)), 0.8)


def test_shorter_forecasts_use_the_first_steps() -> None:
    residuals = np.arange(1.0, 21.0)[:, None] * np.array([1.0, 10.0, 100.0])  # [20, 3]
    calibration = fit_calibration({"s": residuals})
    q = calibration.series["s"].quantiles[1]  # level 0.95
    point = np.array([[1.0, 2.0], [3.0, 4.0]])
    lower, upper = calibration.bounds("s", point, 0.95)
    np.testing.assert_array_equal(lower, point - q[:2])
    np.testing.assert_array_equal(upper, point + q[:2])
    lower_1d, upper_1d = calibration.bounds("s", np.array([5.0]), 0.95)
    np.testing.assert_array_equal(lower_1d, [5.0 - q[0]])
    np.testing.assert_array_equal(upper_1d, [5.0 + q[0]])
    assert lower.shape == point.shape


def test_fit_refuses_bad_residuals() -> None:
    with pytest.raises(DataError, match="no series"):
        fit_calibration({})
    with pytest.raises(DataError, match=r"residuals\['a'\]: expected a non-empty \[N, H\]"):
        fit_calibration({"a": np.ones(5)})
    with pytest.raises(DataError, match=r"residuals\['b'\]: horizon 3 differs"):
        fit_calibration({"a": np.ones((5, 2)), "b": np.ones((5, 3))})
    with pytest.raises(DataError, match="first at window 1, step 0: inf"):
        fit_calibration({"a": np.array([[0.0], [np.inf]])})
    with pytest.raises(DataError, match=r"level 1\.0 is not in \(0, 1\)"):
        fit_calibration({"a": np.ones((5, 2))}, levels=(0.8, 1.0))
    with pytest.raises(DataError, match="level 0.8 is given twice"):
        fit_calibration({"a": np.ones((5, 2))}, levels=(0.8, 0.8))


def test_series_calibration_keeps_a_read_only_copy() -> None:
    quantiles = np.array([[1.0, 2.0]])
    series = SeriesCalibration(levels=(0.8,), quantiles=quantiles, n_residuals=3)
    quantiles[0, 0] = 99.0
    assert series.quantiles[0, 0] == 1.0
    assert series.capped == (False,)
    with pytest.raises(ValueError, match="read-only"):
        series.quantiles[0, 0] = 5.0


def test_level_labels_name_metrics() -> None:
    assert [level_label(v) for v in (0.8, 0.95, 0.975, 0.5)] == ["80", "95", "97.5", "50"]


def test_interval_width_is_the_mean_distance_between_bounds() -> None:
    lower = np.array([[0.0, 1.0], [2.0, -1.0]])
    upper = np.array([[1.0, 4.0], [2.0, 1.0]])
    np.testing.assert_allclose(interval_width_per_step(lower, upper), [0.5, 2.5])
    assert interval_width(lower, upper) == pytest.approx(1.5)
    assert coverage(np.array([[0.5, 5.0], [2.0, 0.0]]), lower, upper) == pytest.approx(0.75)
    with pytest.raises(DataError, match="lower > upper at 3 position.*window 0, step 0: 1.0 > 0.0"):
        interval_width(upper, lower)
    with pytest.raises(DataError, match="does not match"):
        interval_width(lower, upper[:, :1])


def test_numpy_scalars_are_stored_as_plain_numbers(tmp_path: Path) -> None:
    entry = SeriesCalibration(
        levels=(np.float64(0.8),), quantiles=[[1.0, 2.0]], n_residuals=np.int64(5)
    )
    calibration = Calibration(horizon=np.int64(2), levels=(np.float64(0.8),), series={"a": entry})
    loaded = Calibration.load(calibration.save(tmp_path / CALIBRATION_FILE))
    assert loaded.to_dict() == calibration.to_dict()
    assert type(loaded.horizon) is int
    assert loaded.series["a"].capped == (False,)
