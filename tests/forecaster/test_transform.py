"""forecaster.transform: exact inversion, grid and phase arithmetic, JSON round trips, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from forecaster.errors import DataError
from forecaster.transform import (
    PreprocessingSpec,
    ScalingParams,
    SeasonalityParams,
    SeasonalProfile,
    SeriesTransform,
    TransformBatch,
    TrendParams,
    components,
    future_timestamps,
    inverse_forecast,
    inverse_forecast_steps,
    inverse_transform,
    shape_key,
    steps_since_anchor,
    transform,
    transform_steps,
)

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEPS_S = (1.0, 60.0, 900.0, 3600.0, 86400.0)


def _spec(**changes: object) -> SeriesTransform:
    """An hourly spec with every stage active; `changes` replace fields."""
    fields: dict[str, object] = {
        "anchor": "2024-01-01T00:00:00",
        "step_s": 3600.0,
        "n_train": 100,
        "trend": TrendParams(kind="linear", intercept=10.0, slope=0.5),
        "seasonality": SeasonalityParams(
            kind="mstl",
            profiles=(
                SeasonalProfile(period=3, values=(1.0, -2.0, 1.0)),
                SeasonalProfile(period=4, values=(0.5, 0.0, -0.5, 0.0)),
            ),
        ),
        "scaling": ScalingParams(kind="standard", center=0.25, scale=2.0),
        "difference": 0,
    }
    fields.update(changes)
    return SeriesTransform.model_validate(fields)


def _hourly(start: str, n: int) -> npt.NDArray[np.datetime64]:
    return np.datetime64(start, "s") + np.arange(n) * np.timedelta64(3600, "s")


@st.composite
def _profiles(draw: st.DrawFn, count: int) -> tuple[SeasonalProfile, ...]:
    periods = draw(st.lists(st.integers(2, 30), min_size=count, max_size=count, unique=True))
    values = st.floats(-1e3, 1e3, allow_nan=False)
    return tuple(
        SeasonalProfile(period=p, values=tuple(draw(st.lists(values, min_size=p, max_size=p))))
        for p in periods
    )


@st.composite
def series_transforms(draw: st.DrawFn) -> SeriesTransform:
    """Any valid spec: every trend x seasonality x scaling x difference combination."""
    trend_kind = draw(st.sampled_from(["none", "linear", "robust"]))
    trend = (
        TrendParams()
        if trend_kind == "none"
        else TrendParams(
            kind=trend_kind,
            intercept=draw(st.floats(-1e4, 1e4)),
            slope=draw(st.floats(-10, 10)),
        )
    )
    seasonal_kind = draw(st.sampled_from(["none", "stl", "mstl"]))
    count = {"none": 0, "stl": 1, "mstl": draw(st.integers(1, 3))}[seasonal_kind]
    seasonality = SeasonalityParams(kind=seasonal_kind, profiles=draw(_profiles(count)))
    scaling = ScalingParams(
        kind=draw(st.sampled_from(["standard", "robust"])),
        center=draw(st.floats(-1e3, 1e3)),
        scale=draw(st.floats(1e-3, 1e3)),
    )
    anchor_s = draw(st.integers(946_684_800, 2_208_988_800))  # 2000 .. 2040
    return SeriesTransform(
        anchor=str(np.datetime64(anchor_s, "s")),
        step_s=draw(st.sampled_from(STEPS_S)),
        n_train=draw(st.integers(1, 10_000)),
        trend=trend,
        seasonality=seasonality,
        scaling=scaling,
        difference=draw(st.integers(0, 2)),
    )


@st.composite
def spec_and_series(
    draw: st.DrawFn,
) -> tuple[SeriesTransform, npt.NDArray[np.float64], npt.NDArray[np.datetime64]]:
    """A spec and a series on its grid, starting anywhere before or after the anchor."""
    spec = draw(series_transforms())
    n = draw(st.integers(spec.difference + 1, 150))
    first_step = draw(st.integers(-1_000, 5_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = rng.normal(draw(st.floats(-1e4, 1e4)), draw(st.floats(1e-2, 1e3)), n)
    y = y + np.cumsum(rng.normal(0, 1, n)) * draw(st.floats(0, 10))  # level drift too
    ds = _grid(spec, first_step, n)
    return spec, y, ds


def _grid(spec: SeriesTransform, first_step: int, n: int) -> npt.NDArray[np.datetime64]:
    t = first_step + np.arange(n, dtype=np.int64)
    return (spec.anchor_ns + t * spec.step_ns).astype("datetime64[ns]")


def _magnitude(spec: SeriesTransform, y: npt.NDArray[np.float64], ds: npt.ArrayLike) -> float:
    parts = components(spec, ds)
    return float(max(np.max(np.abs(y)), np.max(np.abs(parts.trend + parts.seasonal)), 1e-300))


@PROPERTY
@given(spec_and_series())
def test_inverse_transform_recovers_the_series(
    case: tuple[SeriesTransform, npt.NDArray[np.float64], npt.NDArray[np.datetime64]],
) -> None:
    spec, y, ds = case
    result = transform(spec, y, ds)
    assert result.values.shape == (len(y) - spec.difference,)
    assert np.isfinite(result.values).all()
    back = inverse_transform(spec, result.values, ds, result.initial)
    assert np.max(np.abs(back - y)) <= 1e-8 * _magnitude(spec, y, ds)


@PROPERTY
@given(spec_and_series(), st.integers(1, 40))
def test_inverse_forecast_continues_the_history(
    case: tuple[SeriesTransform, npt.NDArray[np.float64], npt.NDArray[np.datetime64]],
    horizon: int,
) -> None:
    spec, y, ds = case
    horizon = min(horizon, len(y) - spec.difference - 1)
    assume(horizon >= 1)
    history = transform(spec, y[:-horizon], ds[:-horizon])
    future_values = transform(spec, y, ds).values[-horizon:]  # what a perfect model outputs
    forecast = inverse_forecast(spec, future_values, ds[-horizon:], history.last_levels)
    assert np.max(np.abs(forecast - y[-horizon:])) <= 1e-8 * _magnitude(spec, y, ds)


def test_transform_applies_each_stage_in_order() -> None:
    spec = _spec()
    ds = _hourly("2024-01-01T05:00", 3)  # t = 5, 6, 7
    y = np.array([1.0, 2.0, 4.0])
    t = np.array([5.0, 6.0, 7.0])
    seasonal = np.array([1.0, -2.0, 1.0])[[2, 0, 1]] + np.array([0.5, 0.0, -0.5, 0.0])[[1, 2, 3]]
    expected = (y - (10.0 + 0.5 * t) - seasonal - 0.25) / 2.0
    np.testing.assert_allclose(transform(spec, y, ds).values, expected, rtol=0, atol=1e-12)


def test_second_difference_uses_initial_values() -> None:
    spec = _spec(
        trend=TrendParams(),
        seasonality=SeasonalityParams(),
        scaling=ScalingParams(center=0.0, scale=1.0),
        difference=2,
    )
    ds = _hourly("2024-01-01", 5)
    y = np.array([1.0, 4.0, 9.0, 16.0, 25.0])
    result = transform(spec, y, ds)
    np.testing.assert_array_equal(result.values, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(result.initial, [1.0, 4.0])
    np.testing.assert_array_equal(result.last_levels, [16.0, 25.0])
    np.testing.assert_array_equal(inverse_transform(spec, result.values, ds, result.initial), y)
    future = inverse_forecast(spec, [2.0, 2.0], _hourly("2024-01-01T05:00", 2), [16.0, 25.0])
    np.testing.assert_array_equal(future, [36.0, 49.0])


@PROPERTY
@given(series_transforms(), st.integers(-10_000, 10_000), st.integers(1, 50))
def test_seasonal_profile_repeats_and_trend_extrapolates(
    spec: SeriesTransform, first_step: int, cycles: int
) -> None:
    periods = [profile.period for profile in spec.seasonality.profiles]
    shift = cycles * int(np.lcm.reduce(periods or [1]))
    # Only timestamps datetime64[ns] can hold: far shifts of long periods would wrap around.
    last_ns = int(spec.anchor_ns) + (first_step + shift + 8) * int(spec.step_ns)
    assume(-(2**63) < last_ns < 2**63)
    ds, later = _grid(spec, first_step, 8), _grid(spec, first_step + shift, 8)
    now, then = components(spec, ds), components(spec, later)
    np.testing.assert_array_equal(now.seasonal, then.seasonal)
    t = steps_since_anchor(spec, later).astype(np.float64)
    np.testing.assert_array_equal(then.trend, spec.trend.intercept + spec.trend.slope * t)


def test_negative_steps_before_the_anchor_use_the_right_phase() -> None:
    spec = _spec()
    ds = _hourly("2023-12-31T23:00", 2)  # t = -1, 0
    np.testing.assert_array_equal(steps_since_anchor(spec, ds), [-1, 0])
    np.testing.assert_array_equal(components(spec, ds).seasonal, [1.0 + 0.0, 1.0 + 0.5])


@pytest.mark.parametrize("unit", ["m", "s", "ms", "us", "ns"])
def test_any_datetime_unit_gives_the_same_output(unit: str) -> None:
    spec = _spec(difference=1)
    ds = _hourly("2024-03-01", 30)
    y = np.sin(np.arange(30.0))
    expected = transform(spec, y, ds).values
    np.testing.assert_array_equal(
        transform(spec, y, ds.astype(f"datetime64[{unit}]")).values, expected
    )


def test_off_grid_timestamp_is_refused_naming_the_row() -> None:
    ds = _hourly("2024-01-01", 4).astype("datetime64[s]")
    ds[2] += np.timedelta64(30, "m")
    with pytest.raises(DataError, match=r"series 'pump_7', row 2: timestamp 2024-01-01T02:30:00"):
        transform(_spec(), np.ones(4), ds, series_id="pump_7")


def test_gap_is_refused_when_differencing() -> None:
    ds = _hourly("2024-01-01", 5)[[0, 1, 2, 4]]
    with pytest.raises(DataError, match=r"row 3: differencing of order 1 needs consecutive"):
        transform(_spec(difference=1), np.ones(4), ds, series_id="pump_7")
    assert transform(_spec(), np.ones(4), ds).values.shape == (4,)  # without differencing: fine


def test_non_finite_value_is_refused_naming_the_row() -> None:
    y = np.array([1.0, 2.0, np.nan, 4.0])
    with pytest.raises(DataError, match=r"series 'pump_7', row 2: y is nan"):
        transform(_spec(), y, _hourly("2024-01-01", 4), series_id="pump_7")


def test_nat_timestamp_is_refused() -> None:
    ds = _hourly("2024-01-01", 3)
    ds[1] = np.datetime64("NaT")
    with pytest.raises(DataError, match=r"row 1: timestamp is NaT"):
        transform(_spec(), np.ones(3), ds)


def test_inverse_needs_initial_values_when_differencing() -> None:
    spec = _spec(difference=2)
    ds = _hourly("2024-01-01", 6)
    values = transform(spec, np.arange(6.0), ds).values
    with pytest.raises(DataError, match=r"needs initial \(2 values\)"):
        inverse_transform(spec, values, ds)
    with pytest.raises(DataError, match=r"initial must have shape \(2,\)"):
        inverse_transform(spec, values, ds, [0.0])
    with pytest.raises(DataError, match=r"values must have shape \(4,\)"):
        inverse_transform(spec, values[1:], ds, [0.0, 1.0])


def test_non_finite_model_output_propagates() -> None:
    spec = _spec()
    out = inverse_forecast(spec, [np.nan, 1.0], _hourly("2024-02-01", 2))
    assert np.isnan(out[0])
    assert np.isfinite(out[1])


def test_inputs_are_not_mutated() -> None:
    spec = _spec(difference=1)
    y = np.linspace(0.0, 5.0, 20)
    ds = _hourly("2024-01-01", 20)
    y_copy, ds_copy = y.copy(), ds.copy()
    y.flags.writeable = False
    ds.flags.writeable = False
    result = transform(spec, y, ds)
    initial, levels = result.initial.copy(), result.last_levels.copy()
    inverse_transform(spec, result.values, ds, result.initial)
    inverse_forecast(spec, result.values[:3], _hourly("2024-01-01T20:00", 3), result.last_levels)
    np.testing.assert_array_equal(y, y_copy)
    np.testing.assert_array_equal(ds, ds_copy)
    np.testing.assert_array_equal(result.initial, initial)
    np.testing.assert_array_equal(result.last_levels, levels)


def test_future_timestamps_continue_the_grid() -> None:
    ds = future_timestamps(_spec(), np.datetime64("2024-01-02T23:00"), 3)
    expected = np.array(["2024-01-03T00:00", "2024-01-03T01:00", "2024-01-03T02:00"], "M8[ns]")
    np.testing.assert_array_equal(ds, expected)
    with pytest.raises(DataError, match="not a whole number"):
        future_timestamps(_spec(), np.datetime64("2024-01-02T23:01"), 3)


@PROPERTY
@given(spec_and_series())
def test_json_round_trip_gives_bitwise_identical_outputs(
    case: tuple[SeriesTransform, npt.NDArray[np.float64], npt.NDArray[np.datetime64]],
) -> None:
    spec, y, ds = case
    document = PreprocessingSpec(series={"pump_7": spec})
    reread = PreprocessingSpec.from_json(document.to_json())
    assert reread == document
    before = transform(spec, y, ds)
    after = transform(reread.for_series("pump_7"), y, ds)
    assert after.values.tobytes() == before.values.tobytes()
    assert after.residual.tobytes() == before.residual.tobytes()


@PROPERTY
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=2, max_size=40))
def test_every_finite_float_survives_json_exactly(values: list[float]) -> None:
    profile = SeasonalProfile(period=len(values), values=tuple(values))
    spec = _spec(seasonality=SeasonalityParams(kind="stl", profiles=(profile,)))
    reread = PreprocessingSpec.from_json(PreprocessingSpec(series={"a": spec}).to_json())
    stored = reread.series["a"].seasonality.profiles[0].values
    assert np.asarray(stored).tobytes() == np.asarray(values).tobytes()


def test_save_is_atomic_and_load_reads_it_back(tmp_path: Path) -> None:
    document = PreprocessingSpec(series={"pump_7": _spec(), "pump_8": _spec(difference=2)})
    path = tmp_path / "bundle" / "preprocessing.json"
    path.parent.mkdir()
    path.write_text("old content", encoding="utf-8")
    assert document.save(path) == path
    assert PreprocessingSpec.load(path) == document
    assert sorted(p.name for p in path.parent.iterdir()) == ["preprocessing.json"]
    layout = json.loads(path.read_text(encoding="utf-8"))
    assert layout["format_version"] == 1
    assert set(layout["series"]["pump_7"]) == {
        "anchor",
        "step_s",
        "n_train",
        "trend",
        "seasonality",
        "scaling",
        "difference",
    }


def test_load_names_the_file_and_field(tmp_path: Path) -> None:
    layout = json.loads(PreprocessingSpec(series={"pump_7": _spec()}).to_json())
    layout["series"]["pump_7"]["scaling"]["scale"] = 0.0
    path = tmp_path / "preprocessing.json"
    path.write_text(json.dumps(layout), encoding="utf-8")
    pattern = r"preprocessing\.json: series\.pump_7\.scaling\.scale: 0\.0 Input should be greater"
    with pytest.raises(DataError, match=pattern) as info:
        PreprocessingSpec.load(path)
    assert info.value.field == "series.pump_7.scaling.scale"


def test_load_refuses_another_format_version(tmp_path: Path) -> None:
    layout = json.loads(PreprocessingSpec(series={"a": _spec()}).to_json())
    layout["format_version"] = 2
    path = tmp_path / "preprocessing.json"
    path.write_text(json.dumps(layout), encoding="utf-8")
    with pytest.raises(DataError, match=r"format_version: 2 .*reads format 1"):
        PreprocessingSpec.load(path)


def test_load_reports_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"preprocessing file not found: .*nowhere\.json"):
        PreprocessingSpec.load(tmp_path / "nowhere.json")
    path = tmp_path / "preprocessing.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"preprocessing\.json: not valid JSON"):
        PreprocessingSpec.load(path)


def test_unknown_series_is_named() -> None:
    with pytest.raises(DataError, match=r"series 'pump_9' has no preprocessing; known series: 'a'"):
        PreprocessingSpec(series={"a": _spec()}).for_series("pump_9")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"anchor": "2024-01-01T00:00:00+02:00"}, "not a naive ISO timestamp"),
        ({"anchor": "yesterday"}, "not a naive ISO timestamp"),
        ({"step_s": 0.0}, "greater than 0"),
        ({"trend": {"kind": "none", "intercept": 1.0}}, "intercept 0 and slope 0"),
        ({"seasonality": {"kind": "stl", "profiles": []}}, "exactly one profile"),
        (
            {"seasonality": {"kind": "none", "profiles": [{"period": 2, "values": [1, -1]}]}},
            "takes no",
        ),
        ({"seasonality": {"kind": "mstl", "profiles": [{"period": 3, "values": [1]}]}}, "needs 3"),
        ({"scaling": {"kind": "standard", "center": 0.0, "scale": float("inf")}}, "finite"),
        ({"difference": 3}, "less than or equal to 2"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_invalid_spec_is_rejected(changes: dict[str, object], message: str) -> None:
    fields = json.loads(_spec().model_dump_json())
    fields.update(changes)
    with pytest.raises(ValidationError, match=message):
        SeriesTransform.model_validate(fields)


def test_module_imports_neither_pandas_nor_statsmodels_nor_torch() -> None:
    code = (
        "import forecaster.transform, sys; "
        "heavy = {'pandas', 'statsmodels', 'torch'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- many series at once


def _same_shaped(spec: SeriesTransform, rng: np.random.Generator) -> SeriesTransform:
    """`spec` with other parameters (trend, profiles, scaling, anchor) but the same shape."""
    trend = spec.trend
    if trend.kind != "none":
        trend = trend.model_copy(update={"intercept": rng.normal(0, 100), "slope": rng.normal()})
    profiles = tuple(
        p.model_copy(update={"values": tuple(rng.normal(0, 10, p.period).tolist())})
        for p in spec.seasonality.profiles
    )
    shift = int(rng.integers(-50, 50)) * spec.step_ns
    return spec.model_copy(
        update={
            "anchor": str(np.datetime64(spec.anchor_ns + shift, "ns")),
            "trend": trend,
            "seasonality": spec.seasonality.model_copy(update={"profiles": profiles}),
            "scaling": spec.scaling.model_copy(
                update={"center": rng.normal(0, 10), "scale": float(rng.uniform(0.1, 10))}
            ),
        }
    )


@PROPERTY
@given(series_transforms(), st.integers(1, 5), st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_batched_transform_and_inversion_equal_the_per_series_ones_bit_for_bit(
    spec: SeriesTransform, count: int, seed: int, horizon: int
) -> None:
    rng = np.random.default_rng(seed)
    specs = [spec, *(_same_shaped(spec, rng) for _ in range(count - 1))]
    n = spec.difference + 1 + int(rng.integers(0, 60))
    starts = rng.integers(-500, 500, count)
    y = rng.normal(0, 100, (count, n)).cumsum(axis=1)
    ds = [_grid(s, int(first), n) for s, first in zip(specs, starts, strict=True)]
    t = np.stack([steps_since_anchor(s, d) for s, d in zip(specs, ds, strict=True)])
    batch = TransformBatch.stack(specs)
    together = transform_steps(batch, y, t)
    z = rng.normal(0, 1, (count, horizon))
    future_t = t[:, -1:] + np.arange(1, horizon + 1)
    inverted = inverse_forecast_steps(batch, z, future_t, together.last_levels)
    for row, (s, d) in enumerate(zip(specs, ds, strict=True)):
        alone = transform(s, y[row], d)
        np.testing.assert_array_equal(together.values[row], alone.values)
        np.testing.assert_array_equal(together.residual[row], alone.residual)
        future = future_timestamps(s, d[-1], horizon)
        expected = inverse_forecast(s, z[row], future, alone.last_levels)
        np.testing.assert_array_equal(inverted[row], expected)


def test_shape_key_separates_what_cannot_be_batched() -> None:
    base = _spec()
    assert shape_key(base) == (0, True, (3, 4))
    assert shape_key(_spec(difference=1)) != shape_key(base)
    assert shape_key(_spec(trend=TrendParams())) != shape_key(base)
    assert shape_key(_spec(seasonality=SeasonalityParams())) == (0, True, ())
    assert shape_key(_spec(scaling=ScalingParams(center=3.0, scale=0.5))) == shape_key(base)


def test_batch_of_differently_shaped_specs_is_refused_naming_the_row() -> None:
    with pytest.raises(DataError, match=r"specs\[1\].*differs"):
        TransformBatch.stack([_spec(), _spec(difference=1)])
    with pytest.raises(DataError, match="at least one"):
        TransformBatch.stack([])


def test_batched_shapes_are_checked() -> None:
    batch = TransformBatch.stack([_spec(difference=1), _spec(difference=1)])
    t = np.arange(10, dtype=np.int64).reshape(2, 5)
    with pytest.raises(DataError, match="must both be"):
        transform_steps(batch, np.zeros((2, 4)), t)
    with pytest.raises(DataError, match="must both be"):
        transform_steps(batch, np.zeros((3, 5)), np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(DataError, match="too few"):
        transform_steps(batch, np.zeros((2, 1)), t[:, :1])
    with pytest.raises(DataError, match="last_levels"):
        inverse_forecast_steps(batch, np.zeros((2, 5)), t, np.zeros((2, 2)))
