"""Tests for pipelines/stationarity.py: ADF + KPSS verdicts (oracle O15, stationarity part), the
gate's decisions (ALGORITHMS.md §5.5 step 1), JSON reports and input errors.

Every test runs with warnings turned into errors, so a statsmodels warning leaking out of `check`
or `gate` fails the test that triggers it.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy.signal import lfilter
from statsmodels.tools.sm_exceptions import InterpolationWarning
from statsmodels.tsa.stattools import adfuller, kpss

import forecaster.files
from forecaster.config import StationarityConfig
from forecaster.errors import DataError
from pipelines import stationarity as st

pytestmark = pytest.mark.filterwarnings("error")

N = 1000
SEEDS = (0, 1, 2, 3, 4)
Series = npt.NDArray[np.float64]


def white_noise(seed: int, n: int = N) -> Series:
    return np.random.default_rng(seed).standard_normal(n)


def ar1(seed: int, n: int = N, phi: float = 0.5) -> Series:
    burn_in = 100  # start from the stationary distribution, not from 0
    return lfilter([1.0], [1.0, -phi], white_noise(seed, n + burn_in))[burn_in:]


def random_walk(seed: int, n: int = N) -> Series:
    return np.cumsum(white_noise(seed, n))


def linear_trend(seed: int, n: int = N, slope: float = 0.02) -> Series:
    return 5.0 + slope * np.arange(n) + white_noise(seed, n)


def level_shift(seed: int, n: int = N, shift: float = 1.0) -> Series:
    """White noise whose mean jumps by `shift` standard deviations halfway: inconclusive."""
    return white_noise(seed, n) + shift * (np.arange(n) >= n // 2)


PROCESSES: dict[str, tuple[Callable[..., Series], str]] = {
    "white_noise": (white_noise, "stationary"),
    "ar1_phi_0.5": (ar1, "stationary"),
    "random_walk": (random_walk, "difference_stationary"),
    "linear_trend": (linear_trend, "trend_stationary"),
}


def _direct(x: Series, adf_regression: str, autolag: str | None, max_lag: int | None) -> Any:
    """ADF, KPSS(c), KPSS(ct) called straight on statsmodels (tuple results, any version)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adf = adfuller(x, maxlag=max_lag, regression=adf_regression, autolag=autolag)
        level = kpss(x, regression="c", nlags="auto")
        trend = kpss(x, regression="ct", nlags="auto")
    return adf, level, trend


def _assert_json_plain(value: Any, where: str = "$") -> None:
    """Only dict/list/str/int/float/bool/None, no numpy scalars (np.float64 subclasses float)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            _assert_json_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_json_plain(item, f"{where}[{i}]")
    else:
        assert type(value) in (str, int, float, bool, type(None)), f"{where}: {type(value)}"


def _roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, allow_nan=False))


# --- check: verdicts -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("process", list(PROCESSES))
def test_check_verdict_on_known_process(process: str, seed: int) -> None:
    make, expected = PROCESSES[process]
    report = st.check(make(seed))
    assert report.verdict == expected, report.reason
    assert report.is_stationary == (expected == "stationary")
    assert report.n_obs == N


def test_check_verdict_rates_over_many_seeds() -> None:
    """Each test has size alpha, so single seeds can fail; the reading must hold for most."""
    seeds = range(100, 140)
    for process, (make, expected) in PROCESSES.items():
        hits = sum(st.check(make(seed, n=500)).verdict == expected for seed in seeds)
        assert hits / len(seeds) >= 0.8, f"{process}: {hits}/{len(seeds)} read as {expected}"


@pytest.mark.parametrize("seed", SEEDS)
def test_adf_with_constant_only_misreads_trend_as_difference_stationary(seed: int) -> None:
    """Why `check` defaults to ADF('ct'): ADF('c') cannot reject a unit root on a linear trend."""
    x = linear_trend(seed)
    assert st.check(x, adf_regression="c").verdict == "difference_stationary"
    assert st.check(x, adf_regression="ct").verdict == "trend_stationary"


def test_check_marks_level_shift_inconclusive() -> None:
    report = st.check(level_shift(0))
    assert report.verdict == "inconclusive"
    assert report.adf.rejects(0.05)
    assert report.kpss_level.rejects(0.05)
    assert report.kpss_trend.rejects(0.05)
    assert "inconclusive" in report.reason


def test_check_marks_deterministic_series_inconclusive_without_leaking_warnings() -> None:
    x = np.sin(0.3 * np.arange(500))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = st.check(x)
    assert caught == []
    assert report.verdict == "inconclusive"
    assert report.adf.note is not None
    assert "rank-deficient" in report.adf.note
    assert "looks deterministic" in report.reason


def test_check_reason_states_each_test_and_verdict() -> None:
    report = st.check(random_walk(0))
    assert report.reason.startswith("ADF(ct) does not reject a unit root (p=")
    assert "KPSS(c) rejects level stationarity (p<0.01)" in report.reason
    assert report.reason.endswith("→ difference_stationary")


# --- check: values equal statsmodels ---------------------------------------------------------


@pytest.mark.parametrize(
    ("adf_regression", "autolag", "max_lag"),
    [("ct", "AIC", None), ("c", "AIC", None), ("ct", "BIC", 10), ("c", None, 6)],
)
@pytest.mark.parametrize("process", ["ar1_phi_0.5", "random_walk"])
def test_check_values_equal_direct_statsmodels_calls(
    process: str, adf_regression: str, autolag: str | None, max_lag: int | None
) -> None:
    x = PROCESSES[process][0](3)
    report = st.check(x, adf_regression=adf_regression, autolag=autolag, max_lag=max_lag)
    adf, level, trend = _direct(x, adf_regression, autolag, max_lag)

    assert report.adf.name == "ADF"
    assert report.adf.regression == adf_regression
    assert report.adf.statistic == pytest.approx(adf[0], rel=1e-12)
    assert report.adf.pvalue == pytest.approx(adf[1], rel=1e-12, abs=1e-300)
    assert report.adf.lags == adf[2]
    assert report.adf.n_obs == adf[3]
    assert report.adf.critical_values == pytest.approx(adf[4], rel=1e-12)
    if max_lag is not None and autolag is None:
        assert report.adf.lags == max_lag

    for result, direct, regression in (
        (report.kpss_level, level, "c"),
        (report.kpss_trend, trend, "ct"),
    ):
        assert (result.name, result.regression) == ("KPSS", regression)
        assert result.statistic == pytest.approx(direct[0], rel=1e-12)
        assert result.pvalue == pytest.approx(direct[1], rel=1e-12)
        assert result.lags == direct[2]
        assert result.n_obs == len(x)
        assert result.critical_values == pytest.approx(direct[3], rel=1e-12)


def test_check_runs_adf_once_and_kpss_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            regression = kwargs.get("regression", args[1] if len(args) > 1 else None)
            calls.append(f"{name}({regression})")
            return func(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(st, "_adf", counting("adf", st._adf))
    monkeypatch.setattr(st, "adfuller", counting("adfuller", adfuller))
    monkeypatch.setattr(st, "kpss", counting("kpss", kpss))
    st.check(white_noise(0))
    assert sorted(calls) == ["adf(ct)", "kpss(c)", "kpss(ct)"]  # no statsmodels ADF


def test_check_does_not_modify_its_input() -> None:
    x = random_walk(0)
    before = x.copy()
    st.check(x)
    np.testing.assert_array_equal(x, before)


def test_check_accepts_a_plain_list() -> None:
    x = white_noise(0)
    assert st.check(list(x)) == st.check(x)


# --- the fast ADF equals statsmodels' adfuller ----------------------------------------------

ADF_CASES = 210  # 30 of each kind
ADF_KINDS = ("white_noise", "ar1_0.3", "ar1_0.9", "ar1_0.99", "random_walk", "trend", "seasonal")


def _adf_case(i: int) -> tuple[Series, str, str | None, int | None]:
    """Case `i`: a random series (kind by `i`, length 30..3000) and the ADF settings to test."""
    rng = np.random.default_rng(1000 + i)
    n = int(rng.integers(30, 3001))
    kind = ADF_KINDS[i % len(ADF_KINDS)]
    e = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    t = np.arange(n)
    if kind.startswith("ar1"):
        x = lfilter([1.0], [1.0, -float(kind[4:])], e)
    elif kind == "random_walk":
        x = np.cumsum(e)
    elif kind == "trend":
        x = rng.normal(0, 100) + rng.normal(0, 0.1) * t * e.std() + e
    elif kind == "seasonal":
        x = 3.0 * e.std() * np.sin(2 * np.pi * t / rng.choice([7, 12, 24])) + e
    else:
        x = e
    regression = ("c", "ct", "c", "ct", "n")[(i // len(ADF_KINDS)) % 5]
    autolag = ("AIC", "BIC", None)[i % 3]
    largest = n // 2 - (0 if regression == "n" else len(regression)) - 1
    max_lag = None if i % 4 else int(rng.integers(0, min(largest, 40) + 1))
    return x, regression, autolag, max_lag


def _statsmodels_adf(x: Series, regression: str, autolag: str | None, max_lag: int | None) -> Any:
    with st._single_threaded_blas():  # ~5x faster on a busy machine, as in `check`
        return adfuller(
            x, maxlag=max_lag, regression=regression, autolag=autolag, **st._TUPLE_RESULT
        )


def _fast_adf_only(monkeypatch: pytest.MonkeyPatch, *args: Any) -> Any:
    """`st._adf(*args)`, failing if it falls back to statsmodels."""

    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("the fast ADF fell back to statsmodels")

    with monkeypatch.context() as patch, st._single_threaded_blas():
        patch.setattr(st, "adfuller", forbidden)
        return st._adf(*args)


@pytest.mark.parametrize("i", range(ADF_CASES))
def test_fast_adf_equals_adfuller_on_random_series(
    i: int, monkeypatch: pytest.MonkeyPatch, record_property: Callable[[str, Any], None]
) -> None:
    """Same lags, observations and critical values; statistic and p-value to 1e-8.

    The differences (p-values: < 1e-9 here, up to 6e-9 over 4,000 more cases, at noise of scale
    1e-3 next to a trend column up to 3000) are statsmodels' rounding: its SVD-based OLS is not
    column-scale invariant, and a 40-digit reference agrees with `st._adf` to ~1e-15 there.
    """
    x, regression, autolag, max_lag = _adf_case(i)
    stat, pvalue, lags, nobs, critical, icbest = _fast_adf_only(
        monkeypatch, x, regression, autolag, max_lag
    )
    expected = _statsmodels_adf(x, regression, autolag, max_lag)
    if autolag is None:
        assert icbest is None
    else:  # the best information criterion, from statsmodels' own OLS results
        assert icbest == pytest.approx(expected[5], rel=1e-9)
        if lags != expected[2]:
            # Two lags whose criteria tie to rounding: both choices are right. Report it, and
            # check the rest against statsmodels' fit at the lag chosen here.
            record_property("adf_lag_tie", (len(x), regression, autolag, lags, expected[2]))
            print(f"case {i}: {autolag} tie, lag {lags} here, {expected[2]} in statsmodels")
            expected = _statsmodels_adf(x, regression, None, lags)
    assert lags == expected[2]
    assert nobs == expected[3]
    assert stat == pytest.approx(expected[0], rel=1e-8)
    assert pvalue == pytest.approx(expected[1], rel=1e-8, abs=1e-300)
    assert critical == expected[4]


def test_fast_adf_cases_cover_the_requested_grid() -> None:
    cases = [_adf_case(i) for i in range(ADF_CASES)]
    lengths = [len(x) for x, *_ in cases]
    assert min(lengths) < 200
    assert max(lengths) > 2500
    for regression in ("c", "ct"):
        for autolag in ("AIC", "BIC", None):
            settings = {
                (max_lag is None) for _, r, a, max_lag in cases if (r, a) == (regression, autolag)
            }
            assert settings == {True, False}, (regression, autolag)


@pytest.mark.parametrize("max_lag", [0, 1])
@pytest.mark.parametrize("autolag", ["AIC", None])
def test_fast_adf_with_few_lags_equals_adfuller(
    max_lag: int, autolag: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = ar1(0, n=st.MIN_OBS)
    fast = _fast_adf_only(monkeypatch, x, "ct", autolag, max_lag)
    expected = _statsmodels_adf(x, "ct", autolag, max_lag)
    assert fast[2:5] == tuple(expected[2:5])
    assert fast[0] == pytest.approx(expected[0], rel=1e-10)


@pytest.mark.parametrize(
    ("x", "autolag", "max_lag", "why"),
    [
        (np.sin(0.3 * np.arange(500)), "AIC", None, "exact recurrence, rank-deficient"),
        (np.sin(0.3 * np.arange(500)) + 1e-9 * white_noise(0, 500), "AIC", None, "near recurrence"),
        (1e9 + white_noise(0), "BIC", None, "level far above the noise"),
        (np.arange(500.0) ** 2, None, 0, "Δx fitted exactly by constant and trend"),
        (ar1(0), "t-stat", None, "lag search by t-statistic"),
    ],
)
def test_fast_adf_defers_to_statsmodels_where_it_cannot_match(
    x: Series, autolag: str | None, max_lag: int | None, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return adfuller(*args, **kwargs)

    monkeypatch.setattr(st, "adfuller", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' rank-deficiency warnings
        with st._single_threaded_blas():
            fast = st._adf(x, "ct", autolag, max_lag)
        expected = _statsmodels_adf(x, "ct", autolag, max_lag)
    assert calls == [1], why
    assert fast == (*expected[:5], expected[5] if autolag else None)


# --- check: KPSS clipping and warnings -------------------------------------------------------


def test_kpss_clipped_small_pvalue_gets_note_and_upper_bound() -> None:
    x = random_walk(0)
    with warnings.catch_warnings(record=True) as caught:  # what `check` must contain
        warnings.simplefilter("always")
        kpss(x, regression="c", nlags="auto")
    assert any(
        issubclass(w.category, InterpolationWarning) and "smaller" in str(w.message) for w in caught
    )
    report = st.check(x)
    assert report.kpss_level.pvalue == 0.01
    assert report.kpss_level.pvalue_bound == "upper"
    assert report.kpss_level.note == (
        "p-value is outside the table range; actual p-value is smaller than 0.01"
    )
    assert report.kpss_level.format_pvalue() == "p<0.01"


def test_kpss_clipped_large_pvalue_gets_note_and_lower_bound() -> None:
    report = st.check(white_noise(0))
    assert report.kpss_level.pvalue == 0.1
    assert report.kpss_level.pvalue_bound == "lower"
    assert report.kpss_level.note == (
        "p-value is outside the table range; actual p-value is greater than 0.1"
    )
    assert report.kpss_level.format_pvalue() == "p>0.1"


def test_kpss_unclipped_pvalue_has_no_note() -> None:
    report = st.check(white_noise(10))  # seed 10: KPSS(c) p ≈ 0.055, inside the table
    assert 0.01 < report.kpss_level.pvalue < 0.1
    assert report.kpss_level.note is None
    assert report.kpss_level.pvalue_bound is None
    assert report.adf.note is None


def test_check_leaks_no_warning_when_kpss_clips() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = st.check(random_walk(1))
    assert report.kpss_level.pvalue_bound == "upper"
    assert caught == []


@pytest.mark.parametrize(
    ("pvalue", "bound", "alpha", "expected"),
    [
        (0.01, "upper", 0.05, True),
        (0.01, "upper", 0.01, True),
        (0.01, "upper", 0.005, None),
        (0.1, "lower", 0.05, False),
        (0.1, "lower", 0.1, False),
        (0.1, "lower", 0.2, None),
        (0.04, None, 0.05, True),
        (0.06, None, 0.05, False),
    ],
)
def test_test_result_rejects_respects_clipping(
    pvalue: float, bound: Any, alpha: float, expected: bool | None
) -> None:
    result = st.TestResult("KPSS", "c", 1.0, pvalue, 3, 100, {"5%": 0.463}, None, bound)
    assert result.rejects(alpha) is expected


def test_check_is_inconclusive_when_clipped_kpss_cannot_decide_at_alpha() -> None:
    report = st.check(white_noise(0), alpha=0.2)  # KPSS(c) says only p > 0.1
    assert report.verdict == "inconclusive"
    assert "KPSS(c) cannot be compared with alpha=0.2 (p>0.1)" in report.reason


# --- check: bad input ------------------------------------------------------------------------


def test_check_rejects_nan() -> None:
    x = white_noise(0)
    x[[17, 40]] = np.nan
    with pytest.raises(DataError, match=r"2 non-finite value\(s\), first NaN at index 17"):
        st.check(x)


def test_check_rejects_inf() -> None:
    x = white_noise(0)
    x[5] = -np.inf
    with pytest.raises(DataError, match="first inf at index 5"):
        st.check(x)


def test_check_rejects_too_short_series_saying_what_is_needed() -> None:
    with pytest.raises(DataError, match=f"too short.*19 points, at least {st.MIN_OBS}"):
        st.check(white_noise(0, n=19))


def test_check_accepts_minimum_length() -> None:
    assert st.check(white_noise(0, n=st.MIN_OBS)).n_obs == st.MIN_OBS


def test_check_rejects_constant_series() -> None:
    with pytest.raises(DataError, match="constant.*equal 3.5"):
        st.check(np.full(200, 3.5))


def test_check_rejects_two_dimensional_input() -> None:
    with pytest.raises(DataError, match=r"expected a 1-D series, got shape \(100, 2\)"):
        st.check(np.zeros((100, 2)))


def test_check_rejects_non_numeric_input() -> None:
    with pytest.raises(DataError, match="not numeric"):
        st.check(["a"] * 50)


def test_check_rejects_degenerate_adf_statistic(monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_adf(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return (np.nan, np.nan, 0, 99, {"1%": -4.0, "5%": -3.4, "10%": -3.1}, 0.0)

    monkeypatch.setattr(st, "_adf", nan_adf)
    with pytest.raises(DataError, match="ADF regression is degenerate"):
        st.check(white_noise(0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha: 0.0 is not in"),
        ({"alpha": 1.5}, "alpha: 1.5 is not in"),
        ({"adf_regression": "n"}, "adf_regression: 'n'"),
        ({"max_lag": 200}, r"max_lag: 200 is not in \[0, 47\] for 100 points"),
        ({"max_lag": -1}, "max_lag: -1"),
    ],
)
def test_check_rejects_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        st.check(white_noise(0, n=100), **kwargs)


# --- gate ------------------------------------------------------------------------------------


def _set(make: Callable[..., Series], names: tuple[str, ...] = ("pump_1", "pump_2", "pump_3")):
    return {name: make(seed) for seed, name in enumerate(names)}


def test_gate_white_noise_set_trains_with_feedback_without_differencing() -> None:
    decision = st.gate(_set(white_noise), StationarityConfig())
    assert (decision.method, decision.differences) == ("feedback", 0)
    assert decision.pass_fraction == 1.0
    assert decision.failing == []
    assert all(len(reports) == 1 for reports in decision.reports.values())
    assert decision.reason == "all 3 series stationary at d=0 → feedback with d=0"


def test_gate_ar1_set_trains_with_feedback_without_differencing() -> None:
    decision = st.gate(_set(ar1), StationarityConfig())
    assert (decision.method, decision.differences) == ("feedback", 0)


def test_gate_random_walk_set_is_differenced_once_then_feedback() -> None:
    decision = st.gate(_set(random_walk), StationarityConfig(remedy="difference", d_max=1))
    assert (decision.method, decision.differences) == ("feedback", 1)
    assert decision.pass_fraction == 1.0
    for reports in decision.reports.values():
        assert [r.verdict for r in reports] == ["difference_stationary", "stationary"]
        assert reports[1].n_obs == N - 1
    assert decision.reason.startswith("3 of 3 series not stationary at d=0 (pump_1: ")
    assert decision.reason.endswith("after differencing once all 3 pass → feedback with d=1")


def test_gate_differenced_reports_equal_check_on_differenced_series() -> None:
    series = _set(random_walk)
    decision = st.gate(series, StationarityConfig(d_max=1))
    for name, x in series.items():
        assert decision.reports[name][1] == st.check(np.diff(x))


def test_gate_twice_integrated_set_needs_d_2() -> None:
    series = {name: np.cumsum(x) for name, x in _set(random_walk).items()}
    once = st.gate(series, StationarityConfig(d_max=1))
    assert (once.method, once.differences) == ("bptt", 0)
    assert "after differencing once 3 of 3 still not stationary" in once.reason
    assert once.reason.endswith("still failing at d_max=1 → bptt")
    twice = st.gate(series, StationarityConfig(d_max=2))
    assert (twice.method, twice.differences) == ("feedback", 2)
    assert twice.reason.endswith("after differencing twice all 3 pass → feedback with d=2")
    assert all(len(reports) == 3 for reports in twice.reports.values())


def test_gate_random_walk_with_d_max_0_falls_back_to_bptt() -> None:
    decision = st.gate(_set(random_walk), StationarityConfig(d_max=0))
    assert (decision.method, decision.differences) == ("bptt", 0)
    assert decision.pass_fraction == 0.0
    assert decision.failing == ["pump_1", "pump_2", "pump_3"]
    assert all(len(reports) == 1 for reports in decision.reports.values())
    assert decision.reason.endswith("d_max=0 allows no differencing → bptt")


def test_gate_random_walk_in_strict_mode_refuses() -> None:
    decision = st.gate(_set(random_walk), StationarityConfig(d_max=0, strict=True))
    assert (decision.method, decision.differences) == ("refuse", 0)
    assert decision.reason.endswith("strict mode → refuse")


def test_gate_remedy_none_falls_back_to_bptt_without_differencing() -> None:
    decision = st.gate(_set(random_walk), StationarityConfig(remedy="none", d_max=2))
    assert decision.method == "bptt"
    assert all(len(reports) == 1 for reports in decision.reports.values())
    assert decision.reason.endswith("remedy 'none' → bptt")


def test_gate_logs_a_warning_when_falling_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pipelines.stationarity"):
        st.gate(_set(random_walk), StationarityConfig(d_max=0))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "→ bptt" in caplog.records[0].getMessage()


def _mixed() -> dict[str, Series]:
    return {"pump_1": white_noise(0), "pump_2": random_walk(1), "pump_3": white_noise(2)}


def test_gate_mixed_set_passes_when_fraction_reaches_min_pass_fraction() -> None:
    decision = st.gate(_mixed(), StationarityConfig(remedy="none", min_pass_fraction=0.6))
    assert (decision.method, decision.differences) == ("feedback", 0)
    assert decision.pass_fraction == pytest.approx(2 / 3)
    assert decision.failing == ["pump_2"]
    assert "1 of 3 series not stationary at d=0 (pump_2: difference_stationary" in decision.reason
    assert "pass fraction 0.67 ≥ min_pass_fraction 0.6 → feedback with d=0" in decision.reason


def test_gate_pass_fraction_equal_to_min_pass_fraction_passes() -> None:
    series = {"pump_1": white_noise(0), "pump_2": random_walk(1)}
    decision = st.gate(series, StationarityConfig(remedy="none", min_pass_fraction=0.5))
    assert (decision.method, decision.pass_fraction) == ("feedback", 0.5)


def test_gate_mixed_set_fails_below_min_pass_fraction() -> None:
    decision = st.gate(_mixed(), StationarityConfig(remedy="none", min_pass_fraction=0.7))
    assert decision.method == "bptt"
    assert decision.pass_fraction == pytest.approx(2 / 3)
    assert "pass fraction 0.67 < min_pass_fraction 0.7" in decision.reason


def test_gate_mixed_set_requiring_all_is_differenced_as_a_whole() -> None:
    decision = st.gate(_mixed(), StationarityConfig(min_pass_fraction=1.0, d_max=1))
    assert (decision.method, decision.differences) == ("feedback", 1)
    assert all(len(reports) == 2 for reports in decision.reports.values())
    assert decision.reports["pump_1"][1].verdict == "stationary"  # differenced white noise


def test_gate_reason_names_the_failing_series_and_their_tests() -> None:
    decision = st.gate(_mixed(), StationarityConfig(d_max=1))
    report = decision.reports["pump_2"][0]
    assert decision.reason.startswith(
        "1 of 3 series not stationary at d=0 (pump_2: difference_stationary, "
        f"ADF p={report.adf.pvalue:.3g}, KPSS(c) p<0.01, KPSS(ct) p<0.01); "
    )
    assert "pump_1" not in decision.reason
    assert "pump_3" not in decision.reason


def test_gate_reason_hints_at_detrending_for_trend_stationary_residuals() -> None:
    decision = st.gate({"pump_1": linear_trend(0)}, StationarityConfig(d_max=1))
    assert (decision.method, decision.differences) == ("feedback", 1)
    assert "pump_1: trend_stationary" in decision.reason
    assert "see preprocess.trend" in decision.reason


def test_gate_treats_inconclusive_as_failure_by_default() -> None:
    series = {"pump_1": white_noise(1), "pump_2": level_shift(0)}
    decision = st.gate(series, StationarityConfig(remedy="none"))
    assert decision.reports["pump_2"][0].verdict == "inconclusive"
    assert decision.method == "bptt"
    assert decision.failing == ["pump_2"]
    assert "pump_2: inconclusive" in decision.reason


def test_gate_accepts_inconclusive_when_configured() -> None:
    series = {"pump_1": white_noise(1), "pump_2": level_shift(0)}
    decision = st.gate(series, StationarityConfig(remedy="none", allow_inconclusive=True))
    assert (decision.method, decision.differences) == ("feedback", 0)
    assert decision.pass_fraction == 1.0
    assert decision.reason == (
        "all 2 series pass at d=0 (1 inconclusive counted as passing) → feedback with d=0"
    )


def test_gate_records_its_config() -> None:
    config = StationarityConfig(alpha=0.01, d_max=2, min_pass_fraction=0.5)
    decision = st.gate(_set(white_noise), config)
    assert decision.config == config.model_dump()
    assert all(r.alpha == 0.01 for reports in decision.reports.values() for r in reports)


def test_gate_rejects_an_empty_set() -> None:
    with pytest.raises(DataError, match="at least one series"):
        st.gate({}, StationarityConfig())


def test_gate_error_names_the_series() -> None:
    series = _set(white_noise)
    series["pump_2"][3] = np.nan
    with pytest.raises(DataError, match="series 'pump_2': 1 non-finite value") as info:
        st.gate(series, StationarityConfig())
    assert info.value.field == "pump_2"


def test_gate_error_names_the_differencing_order() -> None:
    series = {"short": random_walk(0, n=st.MIN_OBS)}
    with pytest.raises(DataError, match="series 'short' differenced once: too short.*19 points"):
        st.gate(series, StationarityConfig(d_max=1))


# --- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", list(PROCESSES))
def test_report_json_round_trip(process: str) -> None:
    report = st.check(PROCESSES[process][0](0))
    data = report.to_dict()
    _assert_json_plain(data)
    assert st.StationarityReport.from_dict(_roundtrip(data)) == report


def test_decision_json_round_trip() -> None:
    decision = st.gate(_mixed(), StationarityConfig(d_max=1))
    data = decision.to_dict()
    _assert_json_plain(data)
    assert data["schema_version"] == st.SCHEMA_VERSION
    assert data["reports"]["pump_2"][0]["verdict"] == "difference_stationary"
    assert st.GateDecision.from_dict(_roundtrip(data)) == decision


def test_report_from_dict_names_a_missing_key() -> None:
    data = st.check(white_noise(0)).to_dict()
    del data["kpss_trend"]
    with pytest.raises(DataError, match="stationarity report: missing key.*kpss_trend"):
        st.StationarityReport.from_dict(data)


def test_report_from_dict_rejects_an_unknown_verdict() -> None:
    data = st.check(white_noise(0)).to_dict()
    data["verdict"] = "stationaryish"
    with pytest.raises(DataError, match="unknown verdict 'stationaryish'"):
        st.StationarityReport.from_dict(data)


def test_decision_from_dict_rejects_an_unknown_method() -> None:
    data = st.gate(_set(white_noise), StationarityConfig()).to_dict()
    data["method"] = "magic"
    with pytest.raises(DataError, match="unknown method 'magic'"):
        st.GateDecision.from_dict(data)


def test_reports_and_decisions_are_frozen() -> None:
    decision = st.gate({"pump_1": white_noise(0)}, StationarityConfig())
    with pytest.raises(FrozenInstanceError):
        decision.method = "bptt"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        decision.reports["pump_1"][0].verdict = "inconclusive"  # type: ignore[misc]


def test_save_report_writes_valid_json(tmp_path: Path) -> None:
    decision = st.gate(_mixed(), StationarityConfig(d_max=1))
    path = st.save_report(decision, tmp_path / "run" / "stationarity.json")
    assert path == tmp_path / "run" / "stationarity.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert st.GateDecision.from_dict(data) == decision
    assert [p.name for p in path.parent.iterdir()] == ["stationarity.json"]


def test_save_report_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "stationarity.json"
    path.write_text("old", encoding="utf-8")
    decision = st.gate(_set(white_noise), StationarityConfig())
    st.save_report(decision, path)
    assert json.loads(path.read_text(encoding="utf-8"))["method"] == "feedback"
    assert [p.name for p in tmp_path.iterdir()] == ["stationarity.json"]


def test_save_report_leaves_old_file_intact_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stationarity.json"
    path.write_text('{"old": true}', encoding="utf-8")
    decision = st.gate(_set(white_noise), StationarityConfig())

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(forecaster.files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        st.save_report(decision, path)
    assert path.read_text(encoding="utf-8") == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["stationarity.json"]
