"""Tests of forecaster.data: loaders, validation, the synthetic plant and the splits.

Real data comes from ../shared/data (next to the repository root); those tests fail, never skip,
when it is missing. Row numbers in messages are 0-based data rows, header excluded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.config import DataConfig, GapConfig, SplitConfig, SyntheticConfig, WindowConfig
from forecaster.data import (
    ANOMALY_KINDS,
    ID_COL,
    TARGET_COL,
    TIME_COL,
    PlantData,
    Split,
    detect_time_column,
    ett_split,
    generate_plant,
    holdout_split,
    load_data,
    load_validated,
    make_split,
    read_long,
    read_wide,
    seasonal_periods,
    split_frame,
    validate,
)
from forecaster.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def shared(relative: str) -> Path:
    """A file of ../shared/data; fail loudly (never skip) when the checkout lacks it."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.fail(f"real test data missing: {path} (expected ../shared/data next to the repo)")
    return path


def make_frame(
    ids: tuple[str, ...] = ("a",), n: int = 48, freq: str = "h", start: str = "2024-01-01"
) -> pd.DataFrame:
    """A clean long frame: every series a sine on a slope, regular at `freq`."""
    ds = pd.date_range(start, periods=n, freq=freq)
    parts = [
        pd.DataFrame(
            {
                ID_COL: name,
                TIME_COL: ds,
                TARGET_COL: 10.0 * k + np.sin(np.arange(n) / 3.0) + 0.01 * np.arange(n),
            }
        )
        for k, name in enumerate(ids)
    ]
    return pd.concat(parts, ignore_index=True)


def problems_of(excinfo: pytest.ExceptionInfo[DataError]) -> list[str]:
    return excinfo.value.problems


# ---------------------------------------------------------------------------------------------
# Loaders


def test_read_long_csv_gives_typed_long_frame_with_covariates() -> None:
    frame = read_long(FIXTURES / "long_two_series.csv")
    assert list(frame.columns) == [ID_COL, TIME_COL, TARGET_COL, "ambient_c"]
    assert frame[ID_COL].unique().tolist() == ["pump_1", "pump_2"]
    assert frame[TIME_COL].dtype == "datetime64[ns]"
    assert frame[TARGET_COL].dtype == np.float64
    assert frame[TARGET_COL].iloc[3] == pytest.approx(4.45)
    result = validate(frame)
    assert result.freq == "h"
    assert result.rows_per_series == {"pump_1": 6, "pump_2": 6}


def test_read_long_parquet_round_trips_with_custom_column_names(tmp_path: Path) -> None:
    source = make_frame(("x", "y"), n=30)
    path = tmp_path / "plant.parquet"
    source.rename(columns={ID_COL: "tag", TIME_COL: "time", TARGET_COL: "reading"}).to_parquet(path)
    frame = read_long(path, id_col="tag", target_col="reading")
    pd.testing.assert_frame_equal(frame, source, check_dtype=False)
    assert frame[TIME_COL].dtype == "datetime64[ns]"


def test_read_long_keeps_numeric_ids_as_text(tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    path.write_text("unique_id,ds,y\n007,2024-01-01 00:00,1.5\n007,2024-01-01 01:00,2.5\n")
    frame = read_long(path)
    assert frame[ID_COL].tolist() == ["007", "007"]


def test_read_long_loads_nab_two_column_file_as_one_series() -> None:
    path = shared("nab/artificialNoAnomaly/art_daily_small_noise.csv")
    frame = read_long(path)
    assert frame[ID_COL].unique().tolist() == ["art_daily_small_noise"]
    assert len(frame) == 4032
    assert frame[TARGET_COL].dtype == np.float64
    assert frame[TIME_COL].iloc[0] == pd.Timestamp("2014-04-01 00:00:00")
    assert frame[TIME_COL].iloc[-1] == pd.Timestamp("2014-04-14 23:55:00")
    assert validate(frame).freq == "5min"


def test_read_long_target_is_the_only_numeric_column(tmp_path: Path) -> None:
    path = tmp_path / "pump.csv"
    path.write_text("time,state,flow\n2024-01-01 00:00,ON,3.0\n2024-01-01 01:00,ON,4.0\n")
    frame = read_long(path)
    assert frame[TARGET_COL].tolist() == [3.0, 4.0]
    assert frame["state"].tolist() == ["ON", "ON"]
    assert frame[ID_COL].iloc[0] == "pump"


def test_read_long_refuses_an_ambiguous_target(tmp_path: Path) -> None:
    path = tmp_path / "two.csv"
    path.write_text("ds,a,b\n2024-01-01 00:00,1,2\n")
    with pytest.raises(DataError, match="target is ambiguous among 'a', 'b'; pass target_col"):
        read_long(path)


def test_read_long_names_an_unknown_target_column() -> None:
    with pytest.raises(
        DataError, match="unknown target column 'flow'; available columns: 'unique_id', 'ds'"
    ):
        read_long(FIXTURES / "long_two_series.csv", target_col="flow")


def test_read_long_names_an_unknown_id_column() -> None:
    with pytest.raises(DataError, match="unknown id column 'tag'"):
        read_long(FIXTURES / "long_two_series.csv", id_col="tag")


def test_read_long_names_an_unknown_time_column() -> None:
    with pytest.raises(DataError, match="unknown time column 'when'.*'ambient_c'"):
        read_long(FIXTURES / "long_two_series.csv", time_col="when")


def test_loaders_refuse_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found: .*nope.csv"):
        read_long(tmp_path / "nope.csv")


def test_loaders_refuse_an_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"not a spreadsheet")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'.*use \.csv or \.parquet"):
        read_wide(path)


def test_read_wide_ett_ot_column() -> None:
    frame = read_wide(shared("ett/ETTh1.csv"), columns=["OT"])
    assert list(frame.columns) == [ID_COL, TIME_COL, TARGET_COL]
    assert len(frame) == 17420
    assert set(frame[ID_COL]) == {"OT"}
    assert frame[TIME_COL].iloc[0] == pd.Timestamp("2016-07-01 00:00:00")
    assert frame[TIME_COL].iloc[-1] == pd.Timestamp("2018-06-26 19:00:00")
    assert frame[TARGET_COL].iloc[0] == pytest.approx(30.5310001373291)


def test_read_wide_all_columns_in_file_order() -> None:
    frame = read_wide(shared("ett/ETTh1.csv"))
    names = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert frame[ID_COL].unique().tolist() == names
    result = validate(frame)
    assert result.n_series == 7
    assert result.rows_per_series == dict.fromkeys(names, 17420)


def test_read_wide_names_unknown_columns_and_lists_the_available_ones() -> None:
    with pytest.raises(DataError, match="unknown column 'TEMP'; available series columns: 'HUFL'"):
        read_wide(shared("ett/ETTh1.csv"), columns=["OT", "TEMP"])


def test_read_wide_reports_the_wide_file_row() -> None:
    frame = read_wide(FIXTURES / "wide_sensors.csv")
    assert frame[ID_COL].unique().tolist() == ["temperature", "pressure", "flow"]
    with pytest.raises(DataError, match=r"^series 'pressure', row 2: y is NaN"):
        validate(frame)


def test_detect_time_column_is_case_insensitive_and_ordered() -> None:
    assert detect_time_column(["Value", "DATE"]) == "DATE"
    assert detect_time_column(["time", "ds"]) == "ds"
    assert detect_time_column(["datetime", "x"]) == "datetime"


def test_detect_time_column_lists_the_columns_when_none_matches() -> None:
    with pytest.raises(DataError, match="no time column found among columns 'when', 'value'"):
        detect_time_column(["when", "value"])


def test_read_long_without_time_column_fails_with_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("when,value\n1,2\n")
    with pytest.raises(DataError, match="no time column found among columns 'when', 'value'"):
        read_long(path)


def test_file_problems_name_the_file_data_rows() -> None:
    frame = read_long(FIXTURES / "long_bad_rows.csv", id_col="sensor", target_col="value")
    with pytest.raises(DataError) as excinfo:
        validate(frame)
    assert str(excinfo.value) == (
        "series 'pump_1', row 2: timestamp 'not-a-date' cannot be parsed (and 4 more)"
    )
    assert problems_of(excinfo) == [
        "series 'pump_1', row 2: timestamp 'not-a-date' cannot be parsed",
        "series 'pump_2', row 7: y value 'stuck' is not numeric",
        "series 'pump_1', row 3: y is NaN (missing)",
        "series 'pump_1', row 5: timestamp 2024-03-01 04:00:00 is duplicated (first at row 4)",
        "series 'pump_1', row 3: 1 missing step of h between 2024-03-01 01:00:00 and "
        "2024-03-01 03:00:00 (gap policy 'refuse')",
    ]
    assert excinfo.value.field == TIME_COL


# ---------------------------------------------------------------------------------------------
# Validation


def test_validate_accepts_a_clean_frame() -> None:
    source = make_frame(("a", "b"), n=50)
    result = validate(source)
    assert result.freq == "h"
    assert result.n_series == 2
    assert result.rows_per_series == {"a": 50, "b": 50}
    assert result.warnings == []
    assert isinstance(result.frame.index, pd.RangeIndex)
    assert result.frame[ID_COL].dtype == "str"
    assert result.frame[TIME_COL].dtype == "datetime64[ns]"
    assert result.frame[TARGET_COL].dtype == np.float64
    pd.testing.assert_frame_equal(result.frame, source, check_dtype=False)
    assert result.frame is not source


def test_validate_never_mutates_the_callers_frame() -> None:
    source = make_frame(("a", "b"), n=30).iloc[::-1].drop(index=[5, 40])
    source[TIME_COL] = source[TIME_COL].astype(str)
    source["note"] = "x"
    before = source.copy(deep=True)
    result = validate(source, gap_policy="interpolate")
    pd.testing.assert_frame_equal(source, before)
    assert result.rows_per_series == {"b": 30, "a": 30}


def test_validate_infers_fifteen_minute_and_daily_steps() -> None:
    assert validate(make_frame(n=20, freq="15min")).freq == "15min"
    assert validate(make_frame(n=20, freq="D")).freq == "D"


def test_duplicate_timestamp_names_series_rows_and_value() -> None:
    frame = make_frame(("a", "b"), n=10)
    frame = pd.concat([frame, frame.iloc[[13]]], ignore_index=True)
    with pytest.raises(
        DataError,
        match=r"^series 'b', row 20: timestamp 2024-01-01 03:00:00 is duplicated "
        r"\(first at row 13\)$",
    ):
        validate(frame)


def test_unsorted_rows_are_sorted_with_a_warning() -> None:
    frame = make_frame(("a",), n=10)
    shuffled = frame.iloc[[0, 1, 2, 6, 3, 4, 5, 7, 8, 9]].reset_index(drop=True)
    result = validate(shuffled)
    assert result.warnings == ["1 series not sorted by ds, now sorted: 'a' (first at row 4)"]
    pd.testing.assert_frame_equal(result.frame, frame, check_dtype=False)


def test_unsorted_rows_are_refused_under_refuse_policy() -> None:
    frame = make_frame(("a",), n=10)
    shuffled = frame.iloc[[0, 1, 2, 6, 3, 4, 5, 7, 8, 9]].reset_index(drop=True)
    with pytest.raises(
        DataError,
        match=r"^series 'a', row 4: timestamp 2024-01-01 03:00:00 is out of order: it follows "
        r"2024-01-01 06:00:00 at row 3 \(1 such row\(s\) in the series; "
        r"unsorted policy 'refuse'\)$",
    ):
        validate(shuffled, unsorted="refuse")


def test_nab_backwards_step_is_named_by_its_file_row() -> None:
    frame = read_long(shared("nab/realKnownCause/machine_temperature_system_failure.csv"))
    with pytest.raises(
        DataError, match=r"row 10149: timestamp 2014-01-07 02:00:00 is out of order"
    ):
        validate(frame, unsorted="refuse")


def test_nab_duplicate_timestamps_are_reported() -> None:
    frame = read_long(shared("nab/realTraffic/occupancy_t4013.csv"))
    with pytest.raises(DataError) as excinfo:
        validate(frame)
    assert any(
        p.startswith("series 'occupancy_t4013', row ") and "is duplicated" in p
        for p in problems_of(excinfo)
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.nan, r"^series 'a', row 7: y is NaN \(missing\)$"),
        (np.inf, r"^series 'a', row 7: y is inf$"),
        (-np.inf, r"^series 'a', row 7: y is -inf$"),
    ],
)
def test_non_finite_values_are_refused(value: float, expected: str) -> None:
    frame = make_frame(n=12)
    frame.loc[7, TARGET_COL] = value
    with pytest.raises(DataError, match=expected):
        validate(frame)


def test_non_numeric_value_is_named() -> None:
    frame = make_frame(n=12)
    frame[TARGET_COL] = frame[TARGET_COL].astype(object)
    frame.loc[4, TARGET_COL] = "n/a (sensor offline)"
    with pytest.raises(
        DataError, match=r"^series 'a', row 4: y value 'n/a \(sensor offline\)' is not numeric$"
    ):
        validate(frame)


def test_unparsable_and_missing_timestamps_are_named() -> None:
    frame = make_frame(n=12)
    frame[TIME_COL] = frame[TIME_COL].astype(str).astype(object)
    frame.loc[5, TIME_COL] = "not-a-date"
    frame.loc[9, TIME_COL] = None
    with pytest.raises(DataError) as excinfo:
        validate(frame)
    problems = problems_of(excinfo)
    assert problems[0] == "series 'a', row 9: timestamp is missing"
    assert "series 'a', row 5: timestamp 'not-a-date' cannot be parsed" in problems


def test_timestamps_in_mixed_formats_are_parsed() -> None:
    frame = pd.DataFrame(
        {
            ID_COL: "a",
            TIME_COL: ["2024-01-01 00:00:00", "2024-01-02", "2024-01-03 00:00:00"],
            TARGET_COL: [1.0, 2.0, 3.0],
        }
    )
    result = validate(frame)
    assert result.freq == "D"
    assert result.frame[TIME_COL].iloc[1] == pd.Timestamp("2024-01-02")


def test_numeric_time_column_is_refused() -> None:
    frame = make_frame(n=5)
    frame[TIME_COL] = np.arange(5)
    with pytest.raises(DataError, match="column 'ds' holds numbers"):
        validate(frame)


def test_gap_is_refused_by_default() -> None:
    frame = make_frame(n=20).drop(index=[6, 7])
    with pytest.raises(
        DataError,
        match=r"^series 'a', row 8: 2 missing steps of h between 2024-01-01 05:00:00 and "
        r"2024-01-01 08:00:00 \(gap policy 'refuse'\)$",
    ):
        validate(frame)


def test_gap_within_max_gap_is_interpolated_linearly_with_a_warning() -> None:
    full = make_frame(n=20)
    full["load_kw"] = np.arange(20, dtype=float) * 2.0
    full["mode"] = ["auto"] * 7 + ["manual"] * 13
    result = validate(full.drop(index=[6, 7, 8]), gap_policy="interpolate", max_gap=3)
    assert result.warnings == [
        "interpolated 3 missing steps in 1 gap (at most 3 each) in 1 series: 'a'"
    ]
    frame = result.frame
    assert len(frame) == 20
    pd.testing.assert_series_equal(frame[TIME_COL], full[TIME_COL], check_dtype=False)
    y5, y9 = full[TARGET_COL].iloc[5], full[TARGET_COL].iloc[9]
    expected = y5 + (y9 - y5) * np.array([1, 2, 3]) / 4
    np.testing.assert_allclose(frame[TARGET_COL].iloc[6:9], expected)
    np.testing.assert_allclose(frame["load_kw"], full["load_kw"])
    assert frame["mode"].iloc[6:9].tolist() == ["auto", "auto", "auto"]


def test_gap_longer_than_max_gap_is_refused_under_interpolate() -> None:
    frame = make_frame(n=20).drop(index=[6, 7, 8, 9])
    with pytest.raises(
        DataError,
        match=r"row 10: 4 missing steps of h between 2024-01-01 05:00:00 and 2024-01-01 10:00:00 "
        r"\(more than max_gap 3 under gap policy 'interpolate'\)",
    ):
        validate(frame, gap_policy="interpolate", max_gap=3)


def test_off_grid_timestamp_is_refused_even_under_interpolate() -> None:
    frame = make_frame(n=12)
    extra = pd.DataFrame(
        {ID_COL: ["a"], TIME_COL: [pd.Timestamp("2024-01-01 04:30")], TARGET_COL: [1.0]}
    )
    frame = pd.concat([frame.iloc[:5], extra, frame.iloc[5:]], ignore_index=True)
    with pytest.raises(
        DataError,
        match=r"^series 'a', row 5: timestamp 2024-01-01 04:30:00 is off the series' h grid$",
    ) as excinfo:
        validate(frame, gap_policy="refuse")
    assert len(problems_of(excinfo)) == 1
    with pytest.raises(DataError, match="row 5: timestamp 2024-01-01 04:30:00 is off"):
        validate(frame, gap_policy="interpolate")


def test_series_with_different_steps_are_refused() -> None:
    frame = pd.concat(
        [make_frame(("a", "b"), n=10), make_frame(("c",), n=10, freq="15min")], ignore_index=True
    )
    with pytest.raises(
        DataError, match=r"^series 'c': its step is 15min but most series step h"
    ) as excinfo:
        validate(frame)
    assert len(problems_of(excinfo)) == 1


def test_given_freq_is_checked_against_the_data() -> None:
    frame = make_frame(n=10, freq="2h")
    assert validate(frame, freq="2h").freq == "2h"
    with pytest.raises(DataError, match="row 1: 1 missing step of h between"):
        validate(frame, freq="h")


@pytest.mark.parametrize(
    ("freq", "message"),
    [
        ("H", r"freq 'H' is not a pandas offset alias \(Did you mean h\?\)"),
        ("MS", "freq 'MS' is a calendar frequency; only fixed steps are supported"),
    ],
)
def test_bad_freq_is_named(freq: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        validate(make_frame(n=5), freq=freq)


def test_too_short_series_names_the_requirement() -> None:
    frame = pd.concat([make_frame(("long",), n=500), make_frame(("x",), n=100)], ignore_index=True)
    with pytest.raises(
        DataError,
        match=r"^series 'x' has 100 points; needs at least 432 \(lookback 336 \+ horizon 96\)$",
    ) as excinfo:
        validate(frame, min_length=432, min_length_reason="lookback 336 + horizon 96")
    assert len(problems_of(excinfo)) == 1


def test_constant_series_is_refused() -> None:
    frame = pd.concat([make_frame(("ok",), n=10), make_frame(("flat",), n=10)], ignore_index=True)
    frame.loc[frame[ID_COL] == "flat", TARGET_COL] = 3.5
    with pytest.raises(DataError, match=r"^series 'flat' is constant: all 10 values of y are 3.5$"):
        validate(frame)


def test_missing_required_columns_are_listed() -> None:
    frame = make_frame(n=5).rename(columns={TARGET_COL: "value"}).drop(columns=ID_COL)
    with pytest.raises(
        DataError, match="missing required columns 'unique_id', 'y'; found 'ds', 'value'"
    ):
        validate(frame)


def test_missing_id_is_named_by_row() -> None:
    frame = make_frame(n=6)
    frame[ID_COL] = frame[ID_COL].astype(object)
    frame.loc[2, ID_COL] = None
    with pytest.raises(DataError, match="^row 2: unique_id is missing"):
        validate(frame, freq="h", gap_policy="interpolate")


def test_all_problems_are_collected_into_one_error() -> None:
    frame = pd.concat([make_frame(("a", "b"), n=12), make_frame(("c",), n=12)], ignore_index=True)
    frame.loc[3, TARGET_COL] = np.nan
    frame.loc[15, TARGET_COL] = np.inf
    frame.loc[frame[ID_COL] == "c", TARGET_COL] = 1.0
    with pytest.raises(
        DataError, match=r"^series 'a', row 3: y is NaN \(missing\) \(and 2 more\)$"
    ):
        validate(frame)
    with pytest.raises(DataError) as excinfo:
        validate(frame)
    assert problems_of(excinfo) == [
        "series 'a', row 3: y is NaN (missing)",
        "series 'b', row 15: y is inf",
        "series 'c' is constant: all 12 values of y are 1",
    ]
    assert excinfo.value.field == TARGET_COL


def test_a_flood_of_problems_is_listed_up_to_a_cap_and_counted() -> None:
    frame = make_frame(n=1500)
    frame.loc[:, TARGET_COL] = np.nan
    with pytest.raises(DataError, match=r"\(and 1499 more\)$") as excinfo:
        validate(frame)
    problems = problems_of(excinfo)
    assert len(problems) == 1001
    assert problems[-1] == "… 500 more rows where y is NaN, not listed"


def test_tz_aware_timestamps_keep_their_zone_across_dst() -> None:
    ds = pd.date_range("2024-03-30 20:00", periods=12, freq="h", tz="Europe/Berlin")
    frame = pd.DataFrame({ID_COL: "a", TIME_COL: ds, TARGET_COL: np.arange(12.0)})
    result = validate(frame.drop(index=[8]), gap_policy="interpolate")
    assert result.freq == "h"
    assert str(result.frame[TIME_COL].dtype) == "datetime64[ns, Europe/Berlin]"
    pd.testing.assert_series_equal(result.frame[TIME_COL], frame[TIME_COL], check_dtype=False)
    np.testing.assert_allclose(result.frame[TARGET_COL], np.arange(12.0))


def test_validation_of_a_thousand_series() -> None:
    """2M rows in one frame (its speed is measured by benchmarks/preprocess.py, not here)."""
    n_series, length = 1000, 2000
    ds = pd.date_range("2024-01-01", periods=length, freq="h")
    rng = np.random.default_rng(0)
    names = pd.Series([f"s{i}" for i in range(n_series)], dtype="str")
    frame = pd.DataFrame(
        {
            ID_COL: names.take(np.repeat(np.arange(n_series), length)).reset_index(drop=True),
            TIME_COL: np.tile(ds, n_series),
            TARGET_COL: rng.normal(size=n_series * length),
        }
    )
    result = validate(frame)
    assert result.n_series == n_series


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_series=st.integers(1, 4), n=st.integers(3, 40))
def test_validate_is_invariant_to_row_order(seed: int, n_series: int, n: int) -> None:
    frame = make_frame(tuple(f"s{i}" for i in range(n_series)), n=n)
    shuffled = frame.sample(frac=1.0, random_state=np.random.RandomState(seed % 2**32))
    result = validate(shuffled)
    expected = validate(frame).frame
    key = [ID_COL, TIME_COL]
    pd.testing.assert_frame_equal(
        result.frame.sort_values(key, ignore_index=True),
        expected.sort_values(key, ignore_index=True),
    )


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_interpolation_restores_a_linear_series(data: st.DataObject) -> None:
    n = data.draw(st.integers(8, 60))
    slope = data.draw(st.floats(0.01, 5)) * data.draw(st.sampled_from([-1.0, 1.0]))
    frame = pd.DataFrame(
        {
            ID_COL: "a",
            TIME_COL: pd.date_range("2024-01-01", periods=n, freq="15min"),
            TARGET_COL: 2.0 + slope * np.arange(n),
        }
    )
    start = data.draw(st.integers(1, n - 3))
    run = data.draw(st.integers(1, min(3, n - 1 - start)))
    result = validate(frame.drop(index=range(start, start + run)), gap_policy="interpolate")
    np.testing.assert_allclose(result.frame[TARGET_COL], frame[TARGET_COL], atol=1e-9)
    assert len(result.frame) == n


# ---------------------------------------------------------------------------------------------
# Synthetic plant


def test_generate_plant_is_deterministic_per_seed() -> None:
    first, again = generate_plant(seed=7), generate_plant(seed=7)
    pd.testing.assert_frame_equal(first.frame, again.frame)
    pd.testing.assert_frame_equal(first.anomalies, again.anomalies)
    other = generate_plant(seed=8)
    assert not np.allclose(first.frame[TARGET_COL], other.frame[TARGET_COL])


def test_generate_plant_series_do_not_depend_on_how_many_are_made() -> None:
    two, five = generate_plant(n_series=2, seed=3), generate_plant(n_series=5, seed=3)
    pd.testing.assert_frame_equal(two.frame, five.frame.iloc[: len(two.frame)])


@pytest.mark.parametrize(
    ("freq", "periods"), [("h", (24, 168)), ("15min", (96, 672)), ("5min", (288, 2016))]
)
def test_generate_plant_shape_and_frequency(freq: str, periods: tuple[int, int]) -> None:
    plant = generate_plant(n_series=4, length=3000, freq=freq, seed=1)
    assert plant.periods == periods
    assert len(plant.frame) == 4 * 3000
    assert plant.frame[ID_COL].unique().tolist() == [f"plant_{i:03d}" for i in range(4)]
    result = validate(plant.frame)
    assert result.freq == freq
    assert result.rows_per_series == {f"plant_{i:03d}": 3000 for i in range(4)}


def test_generate_plant_has_realistic_sensor_levels() -> None:
    frame = generate_plant(n_series=3, seed=0, n_anomalies=0, n_level_shifts=0).frame
    medians = frame.groupby(ID_COL)[TARGET_COL].median()
    assert 40 < medians["plant_000"] < 100  # temperature, degC
    assert 2 < medians["plant_001"] < 10  # pressure, bar
    assert 80 < medians["plant_002"] < 300  # flow, m3/h


def test_generate_plant_anomalies_are_labelled_inside_and_apart() -> None:
    plant = generate_plant(n_series=6, length=2016, n_anomalies=4, n_level_shifts=2, seed=5)
    labels = plant.anomalies
    assert set(labels["kind"]) <= set(ANOMALY_KINDS)
    assert not labels.duplicated([ID_COL, TIME_COL]).any()
    first, last = plant.frame[TIME_COL].min(), plant.frame[TIME_COL].max()
    margin = pd.Timedelta(hours=24)
    assert labels[TIME_COL].min() >= first + margin
    assert labels[TIME_COL].max() <= last - margin
    for _, events in labels.groupby(ID_COL):
        # one row per spike, dip and level shift; a drift labels a consecutive run of rows
        steps = events[TIME_COL].diff().dt.total_seconds().div(3600).fillna(99)
        starts = events[(steps > 1) | (events["kind"] != events["kind"].shift())]
        assert len(starts) == 6
        assert (starts["kind"] == "level_shift").sum() == 2
    is_anomaly = plant.labels()
    assert is_anomaly.dtype == bool
    assert is_anomaly.sum() == len(labels)


def test_generate_plant_spikes_and_dips_stand_out() -> None:
    plant = generate_plant(n_series=3, n_anomalies=6, n_level_shifts=0, seed=11)
    for name, series in plant.frame.groupby(ID_COL):
        y = series[TARGET_COL].to_numpy()
        residual = np.abs(y[1:-1] - (y[:-2] + y[2:]) / 2)
        typical = np.median(residual)
        events = plant.anomalies[plant.anomalies[ID_COL] == name]
        for _, row in events[events["kind"].isin(["spike", "dip"])].iterrows():
            i = int(np.flatnonzero(series[TIME_COL].to_numpy() == row[TIME_COL].to_datetime64())[0])
            jump = y[i] - (y[i - 1] + y[i + 1]) / 2
            assert abs(jump) > 5 * typical
            assert (jump > 0) == (row["kind"] == "spike")


def test_plant_labels_align_with_any_subset_frame() -> None:
    plant = generate_plant(n_series=2, seed=2)
    subset = plant.frame.iloc[::-1].iloc[100:1500]
    expected = subset.set_index([ID_COL, TIME_COL]).index.isin(
        plant.anomalies.set_index([ID_COL, TIME_COL]).index
    )
    np.testing.assert_array_equal(plant.labels(subset), expected)
    assert isinstance(plant, PlantData)


def test_generate_plant_refuses_a_length_too_short_for_its_events() -> None:
    with pytest.raises(DataError, match="length 30 is too short to place 9 anomalies"):
        generate_plant(length=30, n_anomalies=8, n_level_shifts=1)


def test_seasonal_periods_follow_the_step() -> None:
    assert seasonal_periods("h") == (24, 168)
    assert seasonal_periods("15min") == (96, 672)
    assert seasonal_periods("5min") == (288, 2016)
    assert seasonal_periods("D") == (7,)
    assert seasonal_periods("W") == ()


# ---------------------------------------------------------------------------------------------
# ETT split (../shared/data/README.md §1)

ETT_CASES = {
    # dataset: (file, rows per 30-day month, last timestamp of a day)
    "ETTh": ("ett/ETTh1.csv", 720, "23:00:00"),
    "ETTm": ("ett/ETTm1.csv", 2880, "23:45:00"),
}


@pytest.fixture(scope="module")
def ett_frames() -> dict[str, pd.DataFrame]:
    return {
        dataset: validate(read_wide(shared(path), columns=["OT"])).frame
        for dataset, (path, _, _) in ETT_CASES.items()
    }


@pytest.mark.parametrize("dataset", ["ETTh", "ETTm"])
def test_ett_split_matches_the_protocol_table(
    ett_frames: dict[str, pd.DataFrame], dataset: str
) -> None:
    frame = ett_frames[dataset]
    _, month, end_of_day = ETT_CASES[dataset]
    lookback = 336
    split = ett_split(len(frame), dataset=dataset, lookback=lookback)  # type: ignore[arg-type]
    assert split.train == slice(0, 12 * month)
    assert split.val == slice(12 * month - lookback, 16 * month)
    assert split.test == slice(16 * month - lookback, 20 * month)
    parts = split_frame(frame, split)
    assert len(parts.train) == 12 * month
    assert len(parts.val) == len(parts.test) == 4 * month + lookback
    ds = {name: getattr(parts, name)[TIME_COL] for name in ("train", "val", "test")}
    assert ds["train"].iloc[0] == pd.Timestamp("2016-07-01 00:00:00")
    assert ds["train"].iloc[-1] == pd.Timestamp(f"2017-06-25 {end_of_day}")
    # val and test start `lookback` rows early; their first target is the set's first row
    assert ds["val"].iloc[lookback] == pd.Timestamp("2017-06-26 00:00:00")
    assert ds["val"].iloc[-1] == pd.Timestamp(f"2017-10-23 {end_of_day}")
    assert ds["test"].iloc[lookback] == pd.Timestamp("2017-10-24 00:00:00")
    assert ds["test"].iloc[-1] == pd.Timestamp(f"2018-02-20 {end_of_day}")
    steps = pd.Timedelta(hours=1) * 24 / (month / 30)
    assert ds["val"].iloc[0] == pd.Timestamp("2017-06-26") - lookback * steps
    assert ds["test"].iloc[0] == pd.Timestamp("2017-10-24") - lookback * steps


def test_ett_split_slice_starts_with_lookback_336() -> None:
    hourly = ett_split(17420, dataset="ETTh", lookback=336)
    assert (hourly.val.start, hourly.test.start) == (8304, 11184)
    minutes = ett_split(69680, dataset="ETTm", lookback=336)
    assert (minutes.val.start, minutes.test.start) == (34224, 45744)


@pytest.mark.parametrize("lookback", [96, 336, 512])
def test_ett_test_windows_match_the_protocol_count(lookback: int) -> None:
    horizon = 96
    assert ett_split(17420, dataset="ETTh", lookback=lookback).n_windows("test", horizon) == (
        2881 - horizon
    )
    assert ett_split(69680, dataset="ETTm", lookback=lookback).n_windows("test", horizon) == (
        11521 - horizon
    )


def test_ett_split_refuses_a_file_with_too_few_rows() -> None:
    with pytest.raises(
        DataError, match="the ETTh split needs at least 14400 rows; the data has 9000"
    ):
        ett_split(9000, dataset="ETTh", lookback=336)
    with pytest.raises(DataError, match="the ETTm split needs at least 57600 rows"):
        ett_split(17420, dataset="ETTm", lookback=336)


def test_ett_split_refuses_a_lookback_beyond_the_training_part() -> None:
    with pytest.raises(DataError, match="lookback 9000 must be between 0 and 8640"):
        ett_split(17420, dataset="ETTh", lookback=9000)


def test_holdout_split_in_steps_and_fractions() -> None:
    steps = holdout_split(1000, val_size=100, test_size=200, lookback=50)
    assert steps == Split(slice(0, 700), slice(650, 800), slice(750, 1000), lookback=50)
    fractions = holdout_split(1000, val_size=0.1, test_size=0.2, lookback=50)
    assert fractions == steps
    assert steps.n_windows("test", 24) == 200 - 24 + 1


def test_holdout_split_refuses_a_series_too_short() -> None:
    with pytest.raises(
        DataError, match="a series of 500 rows is too short for val 100 \\+ test 100"
    ):
        holdout_split(500, val_size=100, test_size=100, lookback=336)


def test_make_split_follows_the_config() -> None:
    ett = make_split(SplitConfig(kind="ett", ett_dataset="ETTm"), length=69680, lookback=96)
    assert ett == ett_split(69680, dataset="ETTm", lookback=96)
    holdout = make_split(SplitConfig(val_size=0.1, test_size=0.1), length=2000, lookback=48)
    assert holdout == holdout_split(2000, 0.1, 0.1, 48)


def test_split_frame_applies_per_series_and_refuses_short_series() -> None:
    frame = make_frame(("a", "b"), n=100)
    parts = split_frame(frame, holdout_split(100, 10, 20, lookback=5))
    assert parts.train.groupby(ID_COL).size().tolist() == [70, 70]
    assert parts.test.groupby(ID_COL).size().tolist() == [25, 25]
    assert parts.test[TIME_COL].iloc[5] == pd.Timestamp("2024-01-01") + pd.Timedelta(hours=80)
    short = pd.concat([frame, make_frame(("c",), n=50)], ignore_index=True)
    with pytest.raises(DataError, match="series 'c' has 50 rows; the split needs 100"):
        split_frame(short, holdout_split(100, 10, 20, lookback=5))


# ---------------------------------------------------------------------------------------------
# Composition from config


def test_load_data_synthetic_uses_the_generator_settings() -> None:
    config = DataConfig(synthetic=SyntheticConfig(n_series=2, length=400, freq="15min", seed=4))
    frame = load_data(config)
    expected = generate_plant(n_series=2, length=400, freq="15min", start="2024-01-01", seed=4)
    pd.testing.assert_frame_equal(frame, expected.frame)


def test_load_data_reads_wide_and_long_files() -> None:
    wide = DataConfig(
        source="file", path=shared("ett/ETTh1.csv"), layout="wide", columns=["OT", "HUFL"]
    )
    assert load_data(wide)[ID_COL].unique().tolist() == ["OT", "HUFL"]
    long = DataConfig(
        source="file",
        path=FIXTURES / "long_bad_rows.csv",
        id_col="sensor",
        target_col="value",
        time_col="Timestamp",
    )
    assert load_data(long)[ID_COL].unique().tolist() == ["pump_1", "pump_2"]


def test_load_validated_applies_the_policies_and_window() -> None:
    config = DataConfig(
        synthetic=SyntheticConfig(n_series=2, length=300), gaps=GapConfig(policy="interpolate")
    )
    result = load_validated(config, WindowConfig(lookback=48, horizon=24))
    assert result.freq == "h"
    with pytest.raises(
        DataError,
        match=r"series 'plant_000' has 300 points; needs at least 432 \(lookback 336 \+ horizon "
        r"96\) \(and 1 more\)",
    ):
        load_validated(config, WindowConfig())
