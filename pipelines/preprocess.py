"""Fit per-series preprocessing on the training window -> `PreprocessingSpec` (DESIGN.md §4).

Per series: a global trend (none | OLS line | robust line), seasonal profiles from one STL or MSTL
decomposition of the detrended series (periods from the config or `detect_periods`), and scaling
of the (differenced) residual. Applying and inverting is `forecaster.transform` (numpy only), which
this module also uses to compute the residual, so fitting and serving share one code path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from statsmodels.tsa.seasonal import MSTL, STL

from forecaster.config import PreprocessConfig
from forecaster.errors import DataError
from forecaster.transform import (
    PreprocessingSpec,
    ScalingParams,
    SeasonalityParams,
    SeasonalProfile,
    SeriesTransform,
    Transformed,
    TrendParams,
    components,
    format_timestamp,
    timestamps_to_ns,
    transform,
)

__all__ = [
    "ACF_THRESHOLD",
    "MIN_RELATIVE_SCALE",
    "STL_INNER_ITER",
    "STL_OUTER_ITER",
    "apply_preprocessor",
    "detect_periods",
    "fit_preprocessor",
    "fit_series",
    "residuals",
    "stl_options",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
TrendKind = Literal["none", "linear", "robust"]
SeasonalityKind = Literal["none", "stl", "mstl"]
ScalingKind = Literal["standard", "robust"]

ACF_THRESHOLD = 0.2
"""A candidate period is kept when the autocorrelation at its lag is at least this."""

# Robust STL with the iteration counts Cleveland et al. (1990, §4) recommend when robustness is
# needed: a sixth of the cost of statsmodels' robust defaults (2 and 15), with the same seasonal
# profile on data with outliers. See `stl_options` for the LOESS jumps.
STL_INNER_ITER = 1
STL_OUTER_ITER = 5

MIN_RELATIVE_SCALE = 1e-9
"""A scale at or below this times max |y| is zero spread: the series is constant or explained."""

# Natural cycles of industrial data: hour, day, week, year (365 days).
_CYCLES_S = (3_600, 86_400, 7 * 86_400, 365 * 86_400)
_IQR_TO_SIGMA = 0.7413  # 1 / 1.349: the IQR of a normal distribution is 1.349 sigma


def stl_options(period: int) -> dict[str, bool | int]:
    """Keyword arguments of statsmodels' `STL` as fitted here: robust, with R's `stl` jumps.

    statsmodels evaluates every LOESS at every point (jumps of 1); R's `stl` evaluates every
    tenth of a window and interpolates, which is about 3x faster for an hourly daily period and
    moves the seasonal profile by far less than its estimation error. The windows are
    statsmodels' defaults for `period` (seasonal 7). Use with
    `STL(x, period=period, **stl_options(period)).fit(inner_iter=STL_INNER_ITER,
    outer_iter=STL_OUTER_ITER)`.
    """
    seasonal = 7
    trend = math.ceil(1.5 * period / (1 - 1.5 / seasonal))
    trend += trend % 2 == 0
    low_pass = period + 1 + (period % 2)
    return {
        "robust": True,
        "seasonal_jump": math.ceil(seasonal / 10),
        "trend_jump": math.ceil(trend / 10),
        "low_pass_jump": math.ceil(low_pass / 10),
    }


def _candidate_periods(step_s: float) -> tuple[int, ...]:
    """Periods (in steps) of the natural cycles that are a whole number >= 2 of steps."""
    found = []
    for cycle in _CYCLES_S:
        ratio = cycle / step_s
        period = round(ratio)
        if period >= 2 and abs(ratio - period) < 1e-9 * ratio:
            found.append(period)
    return tuple(found)


def _ols_line(y: FloatArray) -> tuple[float, float]:
    """Intercept and slope of the least-squares line over `t = 0..n-1`."""
    n = y.shape[0]
    if n < 2:
        return float(y.mean()), 0.0
    t_centred = np.arange(n, dtype=np.float64) - (n - 1) / 2
    mean = float(y.mean())
    slope = float(t_centred @ (y - mean) / (t_centred @ t_centred))
    return mean - slope * (n - 1) / 2, slope


def _robust_line(y: FloatArray, period: int) -> tuple[float, float]:
    """Theil-Sen-type line: median of slopes between points a fixed separation apart.

    The separation is half the series, cut to a whole number of seasonal periods when one fits,
    so every pair shares its phase and seasonality cannot bias the slope. Each point enters at most
    two pairs, so up to a quarter of the points can be outliers. O(n), unlike the O(n²) all-pairs
    estimator.
    """
    n = y.shape[0]
    gap = n // 2
    if 0 < period <= gap:
        gap -= gap % period
    slope = float(np.median((y[gap:] - y[:-gap]) / gap))
    intercept = float(np.median(y - slope * np.arange(n, dtype=np.float64)))
    return intercept, slope


def _phase_means(x: FloatArray, period: int) -> FloatArray:
    """`[period]` mean of `x` at each phase `t mod period`, `t = 0..n-1`."""
    phase = np.arange(x.shape[0]) % period
    return np.bincount(phase, weights=x, minlength=period) / np.bincount(phase, minlength=period)


def _autocorrelation(x: FloatArray, max_lag: int) -> FloatArray:
    """`[max_lag + 1]` sample autocorrelation of `x` (the standard, biased estimator)."""
    size = 1 << (2 * x.shape[0] - 1).bit_length()  # zero padding: linear, not circular
    spectrum = np.fft.rfft(x - x.mean(), size)
    sums = np.fft.irfft(spectrum.real**2 + spectrum.imag**2, size)[: max_lag + 1]
    return sums / sums[0] if sums[0] > 0.0 else np.zeros(max_lag + 1)


def _seasonal_lags(
    acf: FloatArray, lags: npt.NDArray[np.int_], threshold: float
) -> npt.NDArray[np.bool_]:
    """Which lags look like a seasonal period: the autocorrelation reaches `threshold` there and
    has risen by `threshold` from its lowest value at a shorter lag (a persistent, non-seasonal
    series only decays)."""
    trough = np.minimum.accumulate(acf[1:])  # trough[j] = min(acf[1 .. j + 1])
    return (acf[lags] >= threshold) & (acf[lags] - trough[lags - 2] >= threshold)


def _explained_share(x: FloatArray, period: int) -> float:
    """Share of the variance of `x` its phase means explain, adjusted for their `period` dof."""
    n = x.shape[0]
    centred = x - x.mean()
    left = centred - _phase_means(centred, period)[np.arange(n) % period]
    return 1.0 - float(left @ left) / float(centred @ centred) * (n - 1) / (n - period)


def _acf_period(x: FloatArray, threshold: float) -> int | None:
    """The period of the seasonal autocorrelation peaks of `x` (more than three cycles), if any."""
    n = x.shape[0]
    max_lag = (n - 1) // 3  # not 2: spurious long cycles of persistent noise are rarer
    if max_lag < 3:
        return None
    acf = _autocorrelation(x, max_lag + 1)
    lags = np.arange(2, max_lag + 1)
    is_peak = (
        (acf[lags] > acf[lags - 1])
        & (acf[lags] >= acf[lags + 1])
        & _seasonal_lags(acf, lags, threshold)
    )
    if not is_peak.any():
        return None
    peaks = lags[is_peak]
    # Multiples of the period peak about as high: take the shortest of the high peaks. A peak is
    # flat over a few lags, so pin the period down by the variance its profile explains nearby.
    first = int(peaks[acf[peaks] >= 0.9 * acf[peaks].max()][0])
    near = range(max(2, int(first * 0.9)), min(max_lag, int(np.ceil(first * 1.1))) + 1)
    shares = [_explained_share(x, period) for period in near]
    best = int(np.argmax(shares))
    return near[best] if shares[best] >= threshold else None


def detect_periods(
    y: npt.ArrayLike, step_s: float, *, threshold: float = ACF_THRESHOLD
) -> tuple[int, ...]:
    """Seasonal periods (in steps) of a series sampled every `step_s` seconds, shortest first.

    Candidates are the hour, day, week and year in steps (hourly data: 24, 168, 8760; 15-min: 4,
    96, 672, …) that fit more than two full cycles in the series. On the series minus its
    least-squares line, and minus the phase means of every period already kept, a candidate is
    kept when the sample autocorrelation at its lag is at least `threshold` (0.2 by default) and
    has risen by `threshold` from its lowest value at a shorter lag. The rise rejects the slow
    decay of a persistent, non-seasonal series; removing the kept periods first rejects a weekly
    period that only repeats the daily one; the standard (biased) estimator shrinks long lags, so
    a period with few cycles in the window needs a stronger correlation.

    When no natural cycle fits (an unusual step, or a short series), the shortest
    autocorrelation peak (with more than three cycles) within 10% of the highest that passes the
    same tests is taken, moved within ±10% to the period whose phase means explain most variance,
    and kept if they explain at least `threshold` of it (adjusted for the period's degrees of
    freedom). Persistent noise and random walks can still show spurious long cycles there: give
    `periods` in the config where the step is unusual.

    Args:
        y: `[n]` finite values.
        step_s: sampling step in seconds.
        threshold: minimum autocorrelation, and minimum rise, at a kept period's lag.
    """
    x = np.asarray(y, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"y must be 1-D, got shape {x.shape}", field="y")
    n = x.shape[0]
    if n < 4:
        return ()
    intercept, slope = _ols_line(x)
    x = x - (intercept + slope * np.arange(n, dtype=np.float64))
    candidates = [period for period in _candidate_periods(step_s) if 2 * period < n]
    if not candidates:
        peak = _acf_period(x, threshold)
        return () if peak is None else (peak,)
    found: list[int] = []
    for period in candidates:
        acf = _autocorrelation(x, period)
        if _seasonal_lags(acf, np.array([period]), threshold)[0]:
            found.append(period)
            x = x - _phase_means(x, period)[np.arange(n) % period]
    return tuple(found)


def _fit_trend(y: FloatArray, kind: TrendKind, periods: tuple[int, ...]) -> TrendParams:
    if kind == "none":
        return TrendParams()
    if kind == "linear":
        intercept, slope = _ols_line(y)
    else:
        intercept, slope = _robust_line(y, max(periods, default=0))
    return TrendParams(kind=kind, intercept=intercept, slope=slope)


def _fit_seasonality(
    x: FloatArray, kind: SeasonalityKind, periods: tuple[int, ...]
) -> SeasonalityParams:
    """One STL/MSTL decomposition of `x`; keep each seasonal component's mean by phase."""
    if kind == "none" or not periods:
        return SeasonalityParams()
    if kind == "stl":
        fit = STL(x, period=periods[0], **stl_options(periods[0])).fit(
            inner_iter=STL_INNER_ITER, outer_iter=STL_OUTER_ITER
        )
    else:
        # MSTL shares one set of STL options: the shortest period's jumps suit every window.
        stl_kwargs = {
            **stl_options(periods[0]),
            "inner_iter": STL_INNER_ITER,
            "outer_iter": STL_OUTER_ITER,
        }
        fit = MSTL(x, periods=periods, stl_kwargs=stl_kwargs).fit()
    seasonal = np.asarray(fit.seasonal, dtype=np.float64).reshape(x.shape[0], -1)  # [n, k]
    profiles = []
    for column, period in enumerate(periods):
        means = _phase_means(seasonal[:, column], period)
        profiles.append(SeasonalProfile(period=period, values=tuple(means - means.mean())))
    return SeasonalityParams(kind=kind, profiles=tuple(profiles))


def _fit_scaling(
    w: FloatArray, kind: ScalingKind, magnitude: float, series_id: str, difference: int
) -> ScalingParams:
    if kind == "standard":
        center, scale = float(w.mean()), float(w.std())
    else:
        q25, center, q75 = (float(q) for q in np.quantile(w, [0.25, 0.5, 0.75]))
        scale = (q75 - q25) * _IQR_TO_SIGMA
    if not scale > MIN_RELATIVE_SCALE * magnitude:
        what = "residual" + (f" differenced {difference}x" if difference else "")
        hint = (
            "; robust scaling uses the interquartile range, so more than half the values are"
            " equal: try scaling 'standard'"
            if kind == "robust"
            else "; the series is constant or fully explained by trend and seasonality"
        )
        raise DataError(
            f"series {series_id!r}: the {what} has zero spread ({kind} scale {scale:.3g}){hint}",
            field="y",
        )
    return ScalingParams(kind=kind, center=center, scale=scale)


def _training_grid(values: FloatArray, ns: npt.NDArray[np.int64], series_id: str) -> int:
    """Check a training window: finite values on a regular grid; return the step in ns."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise DataError(f"series {series_id!r}, row {row}: y is {values[row]}", field="y")
    steps = np.diff(ns)
    step = int(steps[0])
    wrong = np.flatnonzero(steps != step)
    if step <= 0 or wrong.size:
        row = 1 if step <= 0 else int(wrong[0]) + 1
        raise DataError(
            f"series {series_id!r}, row {row}: timestamp {format_timestamp(ns[row])} follows "
            f"{format_timestamp(ns[row - 1])}; preprocessing needs sorted timestamps on a regular "
            "grid (sort, deduplicate and regularise gaps first)",
            field="ds",
        )
    return step


def _resolve_periods(
    values: FloatArray, step_s: float, config: PreprocessConfig, series_id: str
) -> tuple[int, ...]:
    if config.seasonality == "none":
        return ()
    if config.periods is None:
        periods = detect_periods(values, step_s)
    else:
        periods = tuple(sorted(set(config.periods)))
        n = values.shape[0]
        for period in periods:
            if 2 * period >= n:
                raise DataError(
                    f"series {series_id!r}: seasonal period {period} needs more than {2 * period} "
                    f"training points (two full cycles), got {n}",
                    field="preprocess.periods",
                )
    return periods[:1] if config.seasonality == "stl" else periods


def fit_series(
    y: npt.ArrayLike,
    ds: npt.ArrayLike,
    config: PreprocessConfig,
    *,
    series_id: str = "series",
) -> SeriesTransform:
    """Fit the preprocessing of one series on its training window.

    Args:
        y: `[n]` finite training values.
        ds: `[n]` timestamps (`datetime64`, any unit), sorted and evenly spaced; the first is
            the anchor (`t = 0`) and the spacing the step.
        config: what to fit.
        series_id: the name used in error messages and logs.

    Raises:
        DataError: a non-finite value, irregular or unsorted timestamps, too few points for the
            periods or the differencing order, or a residual with zero spread.
    """
    values = np.asarray(y, dtype=np.float64)
    ns = timestamps_to_ns(ds, series_id=series_id)
    n, d = ns.shape[0], config.difference
    if values.shape != (n,):
        raise DataError(
            f"series {series_id!r}: y has shape {values.shape} but ds has {n} timestamps",
            field="y",
        )
    if n < d + 2:
        raise DataError(
            f"series {series_id!r}: {n} training points are too few (need at least {d + 2} "
            f"for differencing of order {d})",
            field="y",
        )
    step_ns = _training_grid(values, ns, series_id)
    step_s = step_ns / 1e9
    periods = _resolve_periods(values, step_s, config, series_id)
    base = SeriesTransform(
        anchor=format_timestamp(ns[0]),
        step_s=step_s,
        n_train=n,
        trend=_fit_trend(values, config.trend, periods),
        difference=d,
    )
    detrended = values - components(base, ds, series_id=series_id).trend
    seasonality = _fit_seasonality(detrended, config.seasonality, periods)
    if config.seasonality != "none" and not seasonality.profiles:
        logger.debug("series %r: no seasonal period detected; seasonality skipped", series_id)
    # Default scaling (0, 1) leaves transform's output as the differenced residual, exactly.
    unscaled = base.model_copy(update={"seasonality": seasonality})
    w = transform(unscaled, values, ds, series_id=series_id).values
    magnitude = float(np.max(np.abs(values)))
    scaling = _fit_scaling(w, config.scaling, magnitude, series_id, d)
    return unscaled.model_copy(update={"scaling": scaling})


def _series_rows(frame: pd.DataFrame) -> list[tuple[str, npt.NDArray[np.intp]]]:
    """`(unique_id, positional rows)` per series, in order of first appearance."""
    missing = [col for col in ("unique_id", "ds", "y") if col not in frame.columns]
    if missing:
        raise DataError(
            f"frame is missing column(s) {', '.join(map(repr, missing))}; "
            f"it has {', '.join(map(repr, frame.columns))}",
            field=missing[0],
        )
    if frame.empty:
        raise DataError("frame has no rows", field="y")
    codes, uniques = pd.factorize(frame["unique_id"], sort=False)
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise DataError(f"row {row}: unique_id is missing", field="unique_id")
    order = np.argsort(codes, kind="stable")
    ends = np.cumsum(np.bincount(codes, minlength=len(uniques)))
    return [(str(uid), rows) for uid, rows in zip(uniques, np.split(order, ends[:-1]), strict=True)]


def _frame_timestamps(frame: pd.DataFrame) -> npt.NDArray[np.datetime64]:
    """The `ds` column as naive `datetime64[ns]` (tz-aware timestamps converted to UTC)."""
    column = frame["ds"]
    if not pd.api.types.is_datetime64_any_dtype(column):
        raise DataError(f"column 'ds' has dtype {column.dtype}, expected datetime64", field="ds")
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        column = column.dt.tz_convert("UTC").dt.tz_localize(None)
    return column.to_numpy().astype("datetime64[ns]")


def _frame_values(frame: pd.DataFrame) -> FloatArray:
    try:
        return frame["y"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"column 'y' of dtype {frame['y'].dtype} is not numeric", field="y"
        ) from exc


def fit_preprocessor(
    frame: pd.DataFrame,
    config: PreprocessConfig,
    *,
    train_rows: int | Mapping[str, int] | None = None,
) -> PreprocessingSpec:
    """Fit every series of a long frame (`unique_id`, `ds`, `y`) on its training rows.

    Args:
        frame: long format, each series sorted by `ds` on a regular grid; not modified.
        config: what to fit (the same for every series).
        train_rows: the first `train_rows` rows of each series are the training window (a
            mapping gives one count per `unique_id`); `None` fits on all rows.

    Raises:
        DataError: as `fit_series`, naming the series and the row within it; a missing column.
    """
    start = time.perf_counter()
    groups = _series_rows(frame)
    values, ds = _frame_values(frame), _frame_timestamps(frame)
    specs: dict[str, SeriesTransform] = {}
    unseasonal: list[str] = []
    for uid, rows in groups:
        count = _train_count(train_rows, uid, rows.shape[0])
        spec = fit_series(values[rows[:count]], ds[rows[:count]], config, series_id=uid)
        if config.seasonality != "none" and spec.seasonality.kind == "none":
            unseasonal.append(uid)
        specs[uid] = spec
    if unseasonal:
        shown = ", ".join(repr(uid) for uid in unseasonal[:5])
        logger.warning(
            "no seasonal period detected for %d of %d series (%s%s); they are not deseasonalised",
            len(unseasonal),
            len(specs),
            shown,
            ", …" if len(unseasonal) > 5 else "",
        )
    logger.info(
        "fitted preprocessing of %d series (trend %s, seasonality %s, scaling %s, difference %d)"
        " in %.2f s",
        len(specs),
        config.trend,
        config.seasonality,
        config.scaling,
        config.difference,
        time.perf_counter() - start,
    )
    return PreprocessingSpec(series=specs)


def _train_count(train_rows: int | Mapping[str, int] | None, uid: str, available: int) -> int:
    if train_rows is None:
        return available
    if isinstance(train_rows, Mapping):
        if uid not in train_rows:
            raise DataError(f"train_rows has no entry for series {uid!r}", field="train_rows")
        count = train_rows[uid]
    else:
        count = train_rows
    if not 1 <= count <= available:
        raise DataError(
            f"series {uid!r}: train_rows {count} is not between 1 and its {available} rows",
            field="train_rows",
        )
    return count


def _transform_frame(
    spec: PreprocessingSpec, frame: pd.DataFrame
) -> Iterator[tuple[str, npt.NDArray[np.intp], Transformed]]:
    groups = _series_rows(frame)
    values, ds = _frame_values(frame), _frame_timestamps(frame)
    for uid, rows in groups:
        yield uid, rows, transform(spec.for_series(uid), values[rows], ds[rows], series_id=uid)


def apply_preprocessor(spec: PreprocessingSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Transform every series of a long frame; return a new frame, the input is not modified.

    The result has the input's columns with `y` replaced by the model input and a `residual`
    column (`y - trend - seasonal` in the units of `y`: what the stationarity gate tests). Rows are
    grouped by series in order of first appearance; with differencing of order `d` the first `d`
    rows of each series are dropped (`transform(...).initial` keeps their residuals).
    """
    kept: list[npt.NDArray[np.intp]] = []
    model_input: list[FloatArray] = []
    residual: list[FloatArray] = []
    for _, rows, result in _transform_frame(spec, frame):
        kept.append(rows[result.difference :])
        model_input.append(result.values)
        residual.append(result.residual[result.difference :])
    out = frame.iloc[np.concatenate(kept)].reset_index(drop=True)
    out["y"] = np.concatenate(model_input)
    out["residual"] = np.concatenate(residual)
    return out


def residuals(spec: PreprocessingSpec, frame: pd.DataFrame) -> dict[str, FloatArray]:
    """Per series, `[n]` residual `y - trend - seasonal` (before differencing and scaling)."""
    return {uid: result.residual for uid, _, result in _transform_frame(spec, frame)}
