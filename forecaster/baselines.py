"""Baseline forecasters on one interface: `[N, L]` history windows -> `[N, H]` forecasts.

Each baseline is a function `(inputs, horizon, ...) -> forecasts`, in the units of its inputs;
`baseline(name, horizon, season=...)` binds the arguments into the `forecast_fn(inputs) -> [N, H]`
that `forecaster.evaluation.evaluate_forecaster` calls. The numpy baselines need nothing else; the
statistical ones (AutoETS, AutoARIMA) use the optional package statsforecast (the `stats` extra),
imported only when called, so this module never requires it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from forecaster.errors import DataError, ModelError

__all__ = [
    "BASELINES",
    "BaselineName",
    "ForecastFn",
    "StatsModelName",
    "baseline",
    "repeat_last",
    "seasonal_naive",
    "statsforecast_forecast",
    "window_mean",
]

FloatArray = npt.NDArray[np.float64]
ForecastFn = Callable[[FloatArray], FloatArray]
"""`forecast_fn(inputs [N, L]) -> forecasts [N, H]`, both in the units of the series."""

StatsModelName = Literal["auto_ets", "auto_arima"]
BaselineName = Literal["repeat_last", "seasonal_naive", "window_mean", "auto_ets", "auto_arima"]
BASELINES: tuple[str, ...] = get_args(BaselineName)


def _check_horizon(horizon: int) -> int:
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 1:
        raise ModelError(f"horizon: {horizon!r} is not an integer >= 1", field="horizon")
    return int(horizon)


def _check_season(season: int) -> int:
    if isinstance(season, bool) or not isinstance(season, int | np.integer) or season < 1:
        raise ModelError(f"season: {season!r} is not an integer >= 1", field="season")
    return int(season)


def _windows(inputs: npt.ArrayLike, min_lookback: int = 1) -> FloatArray:
    """`inputs` as a finite float64 `[N, L]` array with `L >= min_lookback`."""
    try:
        arr = np.asarray(inputs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"inputs: not a numeric array ({exc})", field="inputs") from exc
    if arr.ndim != 2:
        raise DataError(
            f"inputs: expected a 2-D [N, L] array of history windows, got shape {arr.shape}",
            field="inputs",
        )
    if arr.shape[1] < min_lookback:
        raise DataError(
            f"inputs: windows of {arr.shape[1]} steps are too short; this baseline needs at "
            f"least {min_lookback}",
            field="inputs",
        )
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        window, step = (int(i) for i in bad[0])
        raise DataError(
            f"inputs: {len(bad)} non-finite value(s); first at window {window}, step {step}: "
            f"{arr[window, step]}",
            field="inputs",
        )
    return arr


def seasonal_naive(inputs: npt.ArrayLike, horizon: int, season: int) -> FloatArray:
    """Seasonal naive: step `h` (1-based) repeats the input `m` steps before it, `m = season`.

    `y_hat[L + h] = x[L - m + ((h - 1) mod m)]`: the last full season of the window, repeated.

    Args:
        inputs: `[N, L]` history windows with `L >= season`.
        horizon: steps to forecast, `H >= 1`.
        season: the period `m >= 1` in steps (1 is `repeat_last`).

    Returns:
        `[N, H]` forecasts in the units of `inputs`.
    """
    horizon = _check_horizon(horizon)
    season = _check_season(season)
    arr = _windows(inputs, min_lookback=season)
    lookback = arr.shape[1]
    columns = lookback - season + np.arange(horizon) % season  # [H]
    return arr[:, columns]


def repeat_last(inputs: npt.ArrayLike, horizon: int) -> FloatArray:
    """Naive (random-walk) forecast: each step repeats the last input. `[N, L] -> [N, H]`."""
    return seasonal_naive(inputs, horizon, 1)


def window_mean(inputs: npt.ArrayLike, horizon: int) -> FloatArray:
    """Every step is the mean of the `L` values of its window. `[N, L] -> [N, H]`."""
    horizon = _check_horizon(horizon)
    arr = _windows(inputs)
    return np.repeat(arr.mean(axis=1, keepdims=True), horizon, axis=1)


def statsforecast_forecast(
    inputs: npt.ArrayLike,
    horizon: int,
    *,
    model: StatsModelName = "auto_ets",
    season: int = 1,
) -> FloatArray:
    """AutoETS or AutoARIMA from statsforecast (optional), fitted afresh on each window.

    One model selection and fit per window, so this is slow: about 0.2 s a window for AutoETS
    with `season = 24` and `L = 336` on one CPU core, and seconds for seasonal AutoARIMA.

    Args:
        inputs: `[N, L]` history windows.
        horizon: steps to forecast, `H >= 1`.
        model: `auto_ets` (statsforecast's AutoETS) or `auto_arima` (AutoARIMA).
        season: the seasonal period in steps given as `season_length` (1: non-seasonal).

    Returns:
        `[N, H]` point forecasts (the models' `mean`).

    Raises:
        ModelError: statsforecast is not installed, the model name is unknown, or a fit returned
            non-finite forecasts.
    """
    horizon = _check_horizon(horizon)
    season = _check_season(season)
    if model not in get_args(StatsModelName):
        raise ModelError(
            f"model: {model!r} is not a statsforecast baseline; valid: "
            + ", ".join(get_args(StatsModelName)),
            field="model",
        )
    arr = _windows(inputs)
    try:
        from statsforecast.models import AutoARIMA, AutoETS
    except ImportError as exc:
        raise ModelError(
            f"the {model} baseline needs the optional package statsforecast, which is not "
            "installed: pip install 'forecaster[stats]' (or pip install statsforecast)",
            field="model",
        ) from exc
    out = np.empty((arr.shape[0], horizon), dtype=np.float64)
    for i, window in enumerate(arr):
        estimator = (
            AutoETS(season_length=season)
            if model == "auto_ets"
            else AutoARIMA(season_length=season)
        )
        out[i] = np.asarray(estimator.forecast(y=window, h=horizon)["mean"], dtype=np.float64)
        if not np.isfinite(out[i]).all():
            raise ModelError(
                f"{model} (season {season}) returned non-finite forecasts for window {i}",
                field="model",
            )
    return out


def baseline(name: BaselineName, horizon: int, *, season: int = 1) -> ForecastFn:
    """The named baseline as a `forecast_fn(inputs [N, L]) -> [N, H]`.

    Args:
        name: one of `BASELINES`.
        horizon: steps to forecast, `H >= 1`.
        season: the period in steps for `seasonal_naive`, `auto_ets` and `auto_arima`; must be 1
            for the others, which have none.

    Raises:
        ModelError: unknown name, bad horizon or season, or a season given to a baseline without.
    """
    horizon = _check_horizon(horizon)
    season = _check_season(season)
    if name not in BASELINES:
        raise ModelError(
            f"baseline: unknown name {name!r}; valid: {', '.join(BASELINES)}", field="baseline"
        )
    if name in ("repeat_last", "window_mean"):
        if season != 1:
            raise ModelError(
                f"season: {name} has no season, got {season}; use seasonal_naive", field="season"
            )
        return partial(repeat_last if name == "repeat_last" else window_mean, horizon=horizon)
    if name == "seasonal_naive":
        return partial(seasonal_naive, horizon=horizon, season=season)
    stats_model: StatsModelName = "auto_ets" if name == "auto_ets" else "auto_arima"
    return partial(statsforecast_forecast, horizon=horizon, model=stats_model, season=season)
