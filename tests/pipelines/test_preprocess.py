"""pipelines.preprocess: fitting on the training window, period detection, frames, errors."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from statsmodels.tsa.seasonal import STL

from forecaster.config import PreprocessConfig
from forecaster.errors import DataError
from forecaster.transform import (
    PreprocessingSpec,
    components,
    inverse_forecast,
    inverse_transform,
    transform,
)
from pipelines.preprocess import (
    apply_preprocessor,
    detect_periods,
    fit_preprocessor,
    fit_series,
    residuals,
    stl_options,
)

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOUR = np.timedelta64(3600, "s")


def _hourly(n: int, start: str = "2024-01-01") -> npt.NDArray[np.datetime64]:
    return np.datetime64(start, "s") + np.arange(n) * HOUR


def _plant(n: int, seed: int = 0, noise: float = 0.3) -> npt.NDArray[np.float64]:
    """Hourly series: level + slope + daily sine + weekend dip + noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    daily = np.sin(2 * np.pi * t / 24)
    weekend = np.where((t // 24) % 7 >= 5, -0.8, 0.0)
    return 5.0 + 0.01 * t + daily + weekend + rng.normal(0.0, noise, n)


def _max_error(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    return float(np.max(np.abs(a - b)))


@st.composite
def fitted_cases(
    draw: st.DrawFn,
) -> tuple[PreprocessConfig, npt.NDArray[np.float64], npt.NDArray[np.datetime64], int]:
    """A config (any option combination), a hourly series with trend, seasonality and noise, and
    the number of training points (the rest is a future the fit has not seen)."""
    period = draw(st.integers(3, 12))
    seasonality = draw(st.sampled_from(["none", "stl", "mstl"]))
    config = PreprocessConfig(
        trend=draw(st.sampled_from(["none", "linear", "robust"])),
        seasonality=seasonality,
        periods=[period, 2 * period] if seasonality == "mstl" else [period],
        scaling=draw(st.sampled_from(["standard", "robust"])),
        difference=draw(st.integers(0, 2)),
    )
    n_train = period * draw(st.integers(5, 20)) + draw(st.integers(0, period - 1))
    n = n_train + draw(st.integers(1, 50))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    amplitude = draw(st.floats(0.1, 100.0))
    t = np.arange(n)
    y = (
        draw(st.floats(-1e4, 1e4))
        + draw(st.floats(-5.0, 5.0)) * t
        + amplitude * rng.normal(size=period)[t % period]
        + amplitude * draw(st.floats(0.05, 2.0)) * rng.normal(size=n)
        + draw(st.floats(0.0, 1.0)) * np.cumsum(rng.normal(size=n))
    )
    return config, y, _hourly(n, "2023-06-01T07:00"), n_train


@PROPERTY
@given(fitted_cases())
def test_inverse_transform_recovers_fitted_series(
    case: tuple[PreprocessConfig, npt.NDArray[np.float64], npt.NDArray[np.datetime64], int],
) -> None:
    config, y, ds, n_train = case
    spec = fit_series(y[:n_train], ds[:n_train], config, series_id="pump_7")
    magnitude = float(np.max(np.abs(y)))
    for stop in (n_train, len(y)):  # the training window and beyond it
        result = transform(spec, y[:stop], ds[:stop])
        assert np.isfinite(result.values).all()
        back = inverse_transform(spec, result.values, ds[:stop], result.initial)
        assert _max_error(back, y[:stop]) <= 1e-8 * magnitude
    future = transform(spec, y, ds).values[n_train - len(y) :]
    history = transform(spec, y[:n_train], ds[:n_train])
    forecast = inverse_forecast(spec, future, ds[n_train:], history.last_levels)
    assert _max_error(forecast, y[n_train:]) <= 1e-8 * magnitude


@pytest.mark.parametrize(
    ("trend", "seasonality", "scaling", "difference"),
    list(
        itertools.product(
            ["none", "linear", "robust"], ["none", "stl", "mstl"], ["standard", "robust"], [0, 1, 2]
        )
    ),
)
def test_every_option_combination_fits_inverts_and_scales(
    trend: str, seasonality: str, scaling: str, difference: int
) -> None:
    config = PreprocessConfig.model_validate(
        {
            "trend": trend,
            "seasonality": seasonality,
            "periods": [6, 12] if seasonality == "mstl" else [6],
            "scaling": scaling,
            "difference": difference,
        }
    )
    rng = np.random.default_rng(3)
    t = np.arange(150)
    y = 20.0 + 0.2 * t + 3.0 * np.sin(2 * np.pi * t / 6) + rng.normal(0.0, 0.5, t.size)
    ds = _hourly(t.size)
    spec = fit_series(y, ds, config)
    assert (spec.trend.kind, spec.scaling.kind, spec.difference) == (trend, scaling, difference)
    assert spec.seasonality.kind == seasonality
    for profile in spec.seasonality.profiles:
        assert abs(np.mean(profile.values)) < 1e-12  # centred: the level belongs to the scaling
    result = transform(spec, y, ds)
    z = result.values
    if scaling == "standard":
        assert abs(z.mean()) < 1e-12
        assert abs(z.std() - 1.0) < 1e-12
    else:
        q25, median, q75 = np.quantile(z, [0.25, 0.5, 0.75])
        assert abs(median) < 1e-12
        assert abs((q75 - q25) * 0.7413 - 1.0) < 1e-12
    back = inverse_transform(spec, z, ds, result.initial)
    assert _max_error(back, y) <= 1e-8 * np.max(np.abs(y))


@PROPERTY
@given(
    st.integers(3, 24),
    st.integers(3, 10),
    st.integers(0, 23),
    st.integers(1, 60),
    st.sampled_from(["stl", "mstl"]),
    st.integers(0, 2**32 - 1),
)
def test_phase_extrapolation_matches_a_refit_on_the_extended_series(
    period: int, cycles: int, extra: int, k: int, kind: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    profile = rng.normal(size=period) * rng.uniform(0.1, 100.0)
    amplitude = float(np.max(np.abs(profile)))
    n = period * cycles + extra % period
    t = np.arange(n + k)
    # Pure seasonal signal; a 1e-6 noise floor only keeps the residual's scale above zero.
    y = 50.0 + profile[t % period] + rng.normal(0.0, 1e-6 * amplitude, t.size)
    ds = _hourly(t.size)
    config = PreprocessConfig(trend="none", seasonality=kind, periods=[period])
    short = fit_series(y[:n], ds[:n], config)
    extended = fit_series(y, ds, config)
    predicted = components(short, ds[n:]).seasonal
    refitted = components(extended, ds[n:]).seasonal
    assert _max_error(predicted, refitted) <= 1e-4 * amplitude
    truth = (profile - profile.mean())[t[n:] % period]
    assert _max_error(predicted, truth) <= 1e-4 * amplitude


def test_detects_daily_and_weekly_periods_in_hourly_data() -> None:
    assert detect_periods(_plant(2000), 3600) == (24, 168)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("daily only", (24,)), ("white noise", ()), ("persistent AR(1)", ()), ("constant", ())],
)
def test_period_detection_ignores_what_is_not_seasonal(name: str, expected: tuple[int]) -> None:
    rng = np.random.default_rng(5)
    n = 2000
    shocks = rng.normal(size=n)
    series = {
        "daily only": np.sin(2 * np.pi * np.arange(n) / 24) + 0.3 * shocks,
        "white noise": shocks,
        "persistent AR(1)": np.array(list(itertools.accumulate(shocks, lambda a, e: 0.95 * a + e))),
        "constant": np.full(n, 3.0),
    }
    assert detect_periods(series[name], 3600) == expected


@pytest.mark.parametrize(
    ("step_s", "period", "n"),
    [(900, 96, 1000), (300, 288, 1000), (60, 60, 600), (86400, 7, 200), (7, 50, 2000)],
)
def test_period_detection_follows_the_step(step_s: int, period: int, n: int) -> None:
    rng = np.random.default_rng(11)
    t = np.arange(n)
    y = np.sin(2 * np.pi * t / period) + 0.3 * rng.normal(size=n)
    assert detect_periods(y, step_s) == (period,)  # 7 s: no natural cycle, top ACF peak


def test_robust_trend_resists_outliers_better_than_linear() -> None:
    rng = np.random.default_rng(2)
    n = 600
    t = np.arange(n)
    y = 3.0 + 0.05 * t + rng.normal(0.0, 0.5, n)
    late = rng.choice(np.arange(2 * n // 3, n), size=40, replace=False)
    y[late] += 30.0
    ds = _hourly(n)
    slopes = {
        kind: fit_series(y, ds, PreprocessConfig(trend=kind, seasonality="none")).trend.slope
        for kind in ("linear", "robust")
    }
    assert abs(slopes["robust"] - 0.05) < 0.002
    assert abs(slopes["linear"] - 0.05) > 5 * abs(slopes["robust"] - 0.05)
    future = _hourly(3, "2024-02-01")
    spec = fit_series(y, ds, PreprocessConfig(trend="robust", seasonality="none"))
    steps = (future - ds[0]) / HOUR
    np.testing.assert_allclose(
        components(spec, future).trend, spec.trend.intercept + spec.trend.slope * steps
    )


@pytest.mark.parametrize("kind", ["stl", "mstl"])
def test_seasonal_profile_resists_outliers(kind: str) -> None:
    rng = np.random.default_rng(0)
    n = 2000
    t = np.arange(n)
    truth = np.sin(2 * np.pi * t / 24) + 0.5 * np.cos(4 * np.pi * t / 24)
    y = 0.01 * t + truth + rng.normal(0.0, 0.3, n)
    spikes = rng.choice(n, size=60, replace=False)
    y[spikes] += rng.choice([-1.0, 1.0], size=60) * rng.uniform(5.0, 15.0, size=60)
    periods = [24] if kind == "stl" else [24, 168]
    spec = fit_series(y, _hourly(n), PreprocessConfig(seasonality=kind, periods=periods))
    daily = np.asarray(spec.seasonality.profiles[0].values)
    # A non-robust STL is off by about 0.5 here; sampling noise alone allows about 0.07.
    assert _max_error(daily, truth[:24] - truth[:24].mean()) < 0.2


@pytest.mark.parametrize("period", [2, 3, 7, 12, 24, 96, 168, 288])
def test_stl_jumps_are_a_tenth_of_statsmodels_default_windows(period: int) -> None:
    windows = STL(np.zeros(3 * period), period=period).config
    options = stl_options(period)
    assert options["robust"] is True
    for name in ("seasonal", "trend", "low_pass"):
        assert options[f"{name}_jump"] == math.ceil(windows[name] / 10)


@pytest.mark.parametrize(
    ("config", "values"),
    [
        (PreprocessConfig(trend="linear", seasonality="none"), np.full(100, 5.0)),
        (PreprocessConfig(trend="none", seasonality="stl", periods=[24]), np.zeros(100)),
        (PreprocessConfig(trend="linear", seasonality="none"), 2.0 + 0.5 * np.arange(100.0)),
    ],
)
def test_zero_variance_is_refused_naming_the_series(
    config: PreprocessConfig, values: npt.NDArray[np.float64]
) -> None:
    with pytest.raises(DataError, match=r"series 'pump_7': the residual has zero spread"):
        fit_series(values, _hourly(len(values)), config, series_id="pump_7")


def test_robust_scaling_of_mostly_equal_values_suggests_standard() -> None:
    y = np.zeros(200)
    y[::3] = np.random.default_rng(0).normal(size=67)
    config = PreprocessConfig(trend="none", seasonality="none", scaling="robust")
    with pytest.raises(DataError, match=r"series 'valve_2'.*try scaling 'standard'"):
        fit_series(y, _hourly(200), config, series_id="valve_2")
    standard = config.model_copy(update={"scaling": "standard"})
    assert fit_series(y, _hourly(200), standard).scaling.scale > 0


def test_period_longer_than_half_the_window_is_refused() -> None:
    config = PreprocessConfig(seasonality="stl", periods=[168])
    with pytest.raises(
        DataError, match=r"series 'pump_7': seasonal period 168 needs more than 336"
    ):
        fit_series(_plant(300), _hourly(300), config, series_id="pump_7")


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("gap", r"row 3: timestamp 2024-01-01T04:00:00 follows 2024-01-01T02:00:00"),
        ("unsorted", r"row 1: timestamp 2024-01-01T00:00:00 follows 2024-01-01T01:00:00"),
        ("nan", r"row 5: y is nan"),
    ],
)
def test_bad_training_window_is_refused_naming_the_row(broken: str, message: str) -> None:
    y, ds = _plant(60), _hourly(61)
    if broken == "gap":
        ds = np.delete(ds, 3)
    else:
        ds = ds[:60]
    if broken == "unsorted":
        ds[[0, 1]] = ds[[1, 0]]
    if broken == "nan":
        y[5] = np.nan
    with pytest.raises(DataError, match=rf"series 'pump_7', {message}"):
        fit_series(y, ds, PreprocessConfig(seasonality="none"), series_id="pump_7")


def test_scale_and_shift_leave_the_output_unchanged() -> None:
    y, ds = _plant(400), _hourly(400)
    config = PreprocessConfig(trend="robust", seasonality="stl", periods=[24])
    base = transform(fit_series(y, ds, config), y, ds).values
    moved = 250.0 * y - 3e4
    np.testing.assert_allclose(
        transform(fit_series(moved, ds, config), moved, ds).values, base, rtol=0, atol=1e-6
    )


def _frame(n: int = 400) -> pd.DataFrame:
    """Three hourly series, rows ordered by time then series (interleaved), with a covariate."""
    parts = [
        pd.DataFrame(
            {
                "unique_id": uid,
                "ds": pd.date_range("2024-01-01", periods=n, freq="h"),
                "y": _plant(n, seed=seed) * (seed + 1),
                "temperature": np.arange(n, dtype=float) + seed,
            }
        )
        for seed, uid in enumerate(["pump_1", "pump_2", "valve_3"])
    ]
    return pd.concat(parts).sort_values(["ds", "unique_id"], kind="stable").reset_index(drop=True)


def test_fit_preprocessor_uses_only_the_training_rows() -> None:
    frame = _frame()
    config = PreprocessConfig(seasonality="stl", difference=1)
    spec = fit_preprocessor(frame, config, train_rows=300)
    assert list(spec.series) == ["pump_1", "pump_2", "valve_3"]
    assert all(s.n_train == 300 for s in spec.series.values())
    assert all(s.seasonality.profiles[0].period == 24 for s in spec.series.values())
    changed = frame.copy()
    late = changed.groupby("unique_id").cumcount() >= 300
    changed.loc[late, "y"] = 1e6
    assert fit_preprocessor(changed, config, train_rows=300) == spec
    one = frame[frame["unique_id"] == "pump_2"]
    direct = fit_series(one["y"].to_numpy()[:300], one["ds"].to_numpy()[:300], config)
    assert spec.series["pump_2"] == direct


def test_fit_preprocessor_takes_train_rows_per_series() -> None:
    frame = _frame(200)
    rows = {"pump_1": 120, "pump_2": 150, "valve_3": 200}
    spec = fit_preprocessor(frame, PreprocessConfig(seasonality="none"), train_rows=rows)
    assert {uid: s.n_train for uid, s in spec.series.items()} == rows
    with pytest.raises(DataError, match=r"train_rows has no entry for series 'valve_3'"):
        fit_preprocessor(frame, PreprocessConfig(), train_rows={"pump_1": 100, "pump_2": 100})
    with pytest.raises(DataError, match=r"series 'pump_1': train_rows 500 is not between 1 and"):
        fit_preprocessor(frame, PreprocessConfig(), train_rows=500)


def test_apply_preprocessor_transforms_each_series_and_leaves_the_input_alone() -> None:
    frame = _frame()
    before = frame.copy()
    spec = fit_preprocessor(frame, PreprocessConfig(difference=1), train_rows=300)
    out = apply_preprocessor(spec, frame)
    pd.testing.assert_frame_equal(frame, before)
    assert list(out.columns) == ["unique_id", "ds", "y", "temperature", "residual"]
    assert len(out) == len(frame) - 3  # one row per series is spent on the difference
    full = residuals(spec, frame)
    for uid, group in out.groupby("unique_id", sort=False):
        source = before[before["unique_id"] == uid]
        result = transform(spec.series[uid], source["y"].to_numpy(), source["ds"].to_numpy())
        np.testing.assert_array_equal(group["y"].to_numpy(), result.values)
        np.testing.assert_array_equal(group["residual"].to_numpy(), result.residual[1:])
        np.testing.assert_array_equal(group["ds"].to_numpy(), source["ds"].to_numpy()[1:])
        np.testing.assert_array_equal(group["temperature"], source["temperature"].to_numpy()[1:])
        np.testing.assert_array_equal(full[uid], result.residual)


def test_fit_series_leaves_the_arrays_alone() -> None:
    y, ds = _plant(400), _hourly(400)
    y.flags.writeable = False
    ds.flags.writeable = False
    fit_series(y, ds, PreprocessConfig(trend="robust", seasonality="mstl", difference=2))
    np.testing.assert_array_equal(y, _plant(400))
    np.testing.assert_array_equal(ds, _hourly(400))


def test_apply_preprocessor_names_an_unknown_series() -> None:
    frame = _frame(100)
    spec = fit_preprocessor(frame[frame["unique_id"] != "valve_3"], PreprocessConfig())
    with pytest.raises(DataError, match=r"series 'valve_3' has no preprocessing"):
        apply_preprocessor(spec, frame)


def test_frame_without_a_column_is_refused() -> None:
    with pytest.raises(DataError, match=r"frame is missing column\(s\) 'ds'"):
        fit_preprocessor(_frame(50).drop(columns="ds"), PreprocessConfig())


def test_timezone_aware_timestamps_are_anchored_in_utc() -> None:
    frame = _frame(200)
    aware = frame.assign(ds=frame["ds"].dt.tz_localize("Europe/Berlin"))
    config = PreprocessConfig(seasonality="none")
    spec = fit_preprocessor(aware, config)
    assert spec.series["pump_1"].anchor == "2023-12-31T23:00:00"
    naive = frame.assign(ds=frame["ds"] - pd.Timedelta(hours=1))
    assert spec == fit_preprocessor(naive, config)


def test_fitted_spec_round_trips_through_json_with_identical_outputs(tmp_path: Path) -> None:
    frame = _frame()
    spec = fit_preprocessor(frame, PreprocessConfig(trend="robust", seasonality="mstl"))
    path = spec.save(tmp_path / "preprocessing.json")
    reread = PreprocessingSpec.load(path)
    assert reread == spec
    out, again = apply_preprocessor(spec, frame), apply_preprocessor(reread, frame)
    assert out["y"].to_numpy().tobytes() == again["y"].to_numpy().tobytes()


def test_undetected_seasonality_is_skipped_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(4)
    frame = pd.DataFrame(
        {
            "unique_id": np.repeat(["noise_a", "noise_b"], 300),
            "ds": np.tile(pd.date_range("2024-01-01", periods=300, freq="h"), 2),
            "y": rng.normal(size=600),
        }
    )
    with caplog.at_level(logging.WARNING, logger="pipelines.preprocess"):
        spec = fit_preprocessor(frame, PreprocessConfig(seasonality="stl"))
    assert all(s.seasonality.kind == "none" for s in spec.series.values())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 2 series ('noise_a', 'noise_b')" in warnings[0].getMessage()
