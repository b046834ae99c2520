"""Point and interval forecast metrics as pure numpy functions over `[N, H]` arrays.

`N` is the number of forecast windows and `H` the horizon. Each metric averages over every window
and every horizon step; its `*_per_step` variant averages over windows only and returns `[H]`.
Inputs must be finite and of equal shape: a NaN never silently drops out of an average.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from forecaster.errors import DataError

__all__ = [
    "coverage",
    "coverage_per_step",
    "interval_width",
    "interval_width_per_step",
    "mae",
    "mae_per_step",
    "mase",
    "mase_per_step",
    "mse",
    "mse_per_step",
    "smape",
    "smape_per_step",
]

FloatArray = npt.NDArray[np.float64]


def _finite_2d(values: npt.ArrayLike, name: str) -> FloatArray:
    """`values` as a float64 `[N, H]` array with N, H >= 1 and every entry finite."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: not a numeric array ({exc})", field=name) from exc
    if arr.ndim != 2:
        raise DataError(
            f"{name}: expected a 2-D [N, H] array (windows x horizon steps), got shape "
            f"{arr.shape}; wrap a single forecast as y[None, :]",
            field=name,
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name}: shape {arr.shape} has no values to score", field=name)
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        window, step = (int(i) for i in bad[0])
        raise DataError(
            f"{name}: {len(bad)} non-finite value(s); first at window {window}, step {step}: "
            f"{arr[window, step]}",
            field=name,
        )
    return arr


def _mean_over_windows(values: npt.NDArray[np.float64 | np.bool_]) -> FloatArray:
    """`[N, H] -> [H]` mean over the windows."""
    return np.asarray(values.mean(axis=0), dtype=np.float64)


def _pair(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, pred_name: str = "y_pred"
) -> tuple[FloatArray, FloatArray]:
    truth = _finite_2d(y_true, "y_true")
    pred = _finite_2d(y_pred, pred_name)
    if truth.shape != pred.shape:
        raise DataError(
            f"{pred_name}: shape {pred.shape} does not match y_true's {truth.shape}",
            field=pred_name,
        )
    return truth, pred


def mse_per_step(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> FloatArray:
    """`[H]` mean squared error of each horizon step over the `N` windows of `[N, H]` inputs."""
    truth, pred = _pair(y_true, y_pred)
    return _mean_over_windows((truth - pred) ** 2)


def mse(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean squared error `mean((y - y_hat)^2)` over all windows and steps of `[N, H]` inputs.

    Raises:
        DataError: shapes differ, an input is not 2-D or empty, or a value is not finite.
    """
    return float(np.mean(mse_per_step(y_true, y_pred)))


def mae_per_step(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> FloatArray:
    """`[H]` mean absolute error of each horizon step over the `N` windows of `[N, H]` inputs."""
    truth, pred = _pair(y_true, y_pred)
    return _mean_over_windows(np.abs(truth - pred))


def mae(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean absolute error `mean(|y - y_hat|)` over all windows and steps of `[N, H]` inputs.

    Raises:
        DataError: shapes differ, an input is not 2-D or empty, or a value is not finite.
    """
    return float(np.mean(mae_per_step(y_true, y_pred)))


def _mase_scale(y_train: npt.ArrayLike, season: int, n_windows: int) -> FloatArray:
    """`[N, 1]` in-sample mean absolute seasonal difference of the training series."""
    if isinstance(season, bool) or not isinstance(season, int | np.integer) or season < 1:
        raise DataError(f"season: {season!r} is not an integer >= 1", field="season")
    try:
        history = np.asarray(y_train, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"y_train: not a numeric array ({exc})", field="y_train") from exc
    if history.ndim == 1:
        history = history[None, :]
    elif history.ndim != 2 or history.shape[0] != n_windows:
        raise DataError(
            f"y_train: expected a 1-D [T] series or a 2-D [N, T] array with N = {n_windows} "
            f"(one history per window), got shape {history.shape}",
            field="y_train",
        )
    if history.shape[1] <= season:
        raise DataError(
            f"y_train: {history.shape[1]} values are too few for season {season} "
            f"(need at least {season + 1})",
            field="y_train",
        )
    bad = np.argwhere(~np.isfinite(history))
    if bad.size:
        row, col = (int(i) for i in bad[0])
        raise DataError(
            f"y_train: {len(bad)} non-finite value(s); first at [{row}, {col}]: "
            f"{history[row, col]}",
            field="y_train",
        )
    scale = np.mean(np.abs(history[:, season:] - history[:, :-season]), axis=1)
    flat = np.flatnonzero(scale == 0)
    if flat.size:
        raise DataError(
            f"y_train: MASE is undefined because the in-sample seasonal naive error at season "
            f"{season} is 0 (a series periodic with period {season}, e.g. constant; row "
            f"{int(flat[0])})",
            field="y_train",
        )
    return np.asarray(scale[:, None], dtype=np.float64)


def mase_per_step(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, y_train: npt.ArrayLike, season: int
) -> FloatArray:
    """`[H]` MASE of each horizon step (see `mase`), averaged over the `N` windows."""
    truth, pred = _pair(y_true, y_pred)
    scale = _mase_scale(y_train, season, truth.shape[0])
    return _mean_over_windows(np.abs(truth - pred) / scale)


def mase(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, y_train: npt.ArrayLike, season: int
) -> float:
    """MASE (Hyndman & Koehler 2006): `mean(|y - y_hat|) / mean(|y_t - y_{t-m}|)` in-sample.

    The scale is the mean absolute error of the seasonal naive forecast with period `m = season`
    on the training series (`m = 1`: the naive one-step forecast). With a 2-D `y_train`, each
    window is scaled by its own history and the scaled errors are averaged over all windows.

    Args:
        y_true: `[N, H]` actual values.
        y_pred: `[N, H]` forecasts.
        y_train: `[T]` training series shared by all windows, or `[N, T]` one history per window.
        season: the seasonal period `m >= 1` in steps (e.g. 24 for hourly data with a daily cycle).

    Raises:
        DataError: shapes differ, a value is not finite, `y_train` has at most `season` values, or
            its in-sample seasonal naive error is 0 (MASE undefined).
    """
    return float(np.mean(mase_per_step(y_true, y_pred, y_train, season)))


def _smape_terms(truth: FloatArray, pred: FloatArray) -> FloatArray:
    denominator = np.abs(truth) + np.abs(pred)
    # A zero denominator means both are 0, a perfect forecast whose numerator is 0 too: dividing
    # by 1 instead makes the term 0, not 0/0.
    return 200.0 * np.abs(truth - pred) / np.where(denominator == 0, 1.0, denominator)


def smape_per_step(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> FloatArray:
    """`[H]` sMAPE in percent of each horizon step (see `smape`), averaged over the `N` windows."""
    truth, pred = _pair(y_true, y_pred)
    return _mean_over_windows(_smape_terms(truth, pred))


def smape(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """sMAPE (M4 competition, Makridakis et al. 2020): `mean(200 |y - y_hat| / (|y| + |y_hat|))`.

    In percent, between 0 and 200. A term whose actual value and forecast are both exactly 0 is a
    perfect forecast and counts as 0 (the formula's 0/0 is defined that way); a term with only one
    of them 0 counts as 200.

    Raises:
        DataError: shapes differ, an input is not 2-D or empty, or a value is not finite.
    """
    return float(np.mean(smape_per_step(y_true, y_pred)))


def _interval(
    y_true: npt.ArrayLike, lower: npt.ArrayLike, upper: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    truth, low = _pair(y_true, lower, "lower")
    _, high = _pair(truth, upper, "upper")
    _check_ordered(low, high)
    return truth, low, high


def _check_ordered(low: FloatArray, high: FloatArray) -> None:
    """`DataError` at the first position where the lower bound exceeds the upper one."""
    crossed = np.argwhere(low > high)
    if crossed.size:
        window, step = (int(i) for i in crossed[0])
        raise DataError(
            f"lower > upper at {len(crossed)} position(s); first at window {window}, step {step}: "
            f"{low[window, step]} > {high[window, step]}",
            field="lower",
        )


def coverage_per_step(
    y_true: npt.ArrayLike, lower: npt.ArrayLike, upper: npt.ArrayLike
) -> FloatArray:
    """`[H]` empirical coverage of each horizon step (see `coverage`) over the `N` windows."""
    truth, low, high = _interval(y_true, lower, upper)
    return _mean_over_windows((truth >= low) & (truth <= high))


def coverage(y_true: npt.ArrayLike, lower: npt.ArrayLike, upper: npt.ArrayLike) -> float:
    """Empirical coverage: the fraction of `y` with `lower <= y <= upper` (bounds inclusive).

    Args:
        y_true: `[N, H]` actual values.
        lower: `[N, H]` lower bounds of the prediction intervals.
        upper: `[N, H]` upper bounds, `>= lower` everywhere.

    Raises:
        DataError: shapes differ, a value is not finite, or `lower > upper` somewhere.
    """
    return float(np.mean(coverage_per_step(y_true, lower, upper)))


def interval_width_per_step(lower: npt.ArrayLike, upper: npt.ArrayLike) -> FloatArray:
    """`[H]` mean width `upper - lower` of each horizon step (see `interval_width`)."""
    low = _finite_2d(lower, "lower")
    high = _finite_2d(upper, "upper")
    if low.shape != high.shape:
        raise DataError(
            f"upper: shape {high.shape} does not match lower's {low.shape}", field="upper"
        )
    _check_ordered(low, high)
    return _mean_over_windows(high - low)


def interval_width(lower: npt.ArrayLike, upper: npt.ArrayLike) -> float:
    """Mean width `mean(upper - lower)` of `[N, H]` prediction intervals, in their units.

    Raises:
        DataError: shapes differ, a value is not finite, or `lower > upper` somewhere.
    """
    return float(np.mean(interval_width_per_step(lower, upper)))
