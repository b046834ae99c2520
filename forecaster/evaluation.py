"""The standard ETT evaluation protocol for any forecaster (../shared/data/README.md §1).

Every window of a split part at stride 1 is scored, the last incomplete batch included; MSE and MAE
are taken on the scale z-scored with the mean and std of the training rows (population std, as
scikit-learn's `StandardScaler` in the reference code), averaged over all windows and all horizon
steps. For ETTh with look-back `L` the test part `[11520 - L, 14400)` has `L + 2880` rows, hence
`2881 - H` windows; ETTm's has `L + 11520` rows and `11521 - H` windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from forecaster.errors import DataError, ModelError
from forecaster.metrics import mae, mae_per_step, mse, mse_per_step

if TYPE_CHECKING:  # at run time only its attributes are used: this module stays numpy-only
    from forecaster.data import Split

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Evaluation",
    "Part",
    "ProtocolMetrics",
    "TrainScale",
    "Windows",
    "evaluate_forecaster",
    "part_windows",
    "protocol_metrics",
    "test_windows",
    "train_scale",
]

FloatArray = npt.NDArray[np.float64]
Part = Literal["train", "val", "test"]
PARTS: tuple[Part, ...] = ("train", "val", "test")
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class Windows:
    """All windows of one split part at stride 1, in the units of the series.

    Attributes:
        inputs: `[N, L]` look-back values (read-only views into the series).
        targets: `[N, H]` values to forecast (read-only views).
        origins: `[N]` row (position in the series) of each window's first target; its inputs are
            rows `origins - L .. origins - 1` and its targets rows `origins .. origins + H - 1`.
        part: the split part the windows come from.
    """

    inputs: FloatArray
    targets: FloatArray
    origins: npt.NDArray[np.int64]
    part: Part

    @property
    def n_windows(self) -> int:
        """`N`, the number of windows."""
        return int(self.origins.shape[0])

    @property
    def lookback(self) -> int:
        """`L`, the input length."""
        return int(self.inputs.shape[1])

    @property
    def horizon(self) -> int:
        """`H`, the number of target steps."""
        return int(self.targets.shape[1])


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(f"{name}: {value!r} is not an integer >= {minimum}", field=name)
    return int(value)


def _part_rows(split: Split, part: Part) -> slice:
    if part not in PARTS:
        raise DataError(f"part: {part!r} is not one of {', '.join(PARTS)}", field="part")
    rows: slice = getattr(split, part)
    return rows


def _series(values: npt.ArrayLike, needed: slice, split: Split) -> FloatArray:
    """`values` as a 1-D float64 array, long enough for the split, finite where it is used."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"values: not a numeric array ({exc})", field="values") from exc
    if arr.ndim != 1:
        raise DataError(
            f"values: expected a 1-D series in its original units, got shape {arr.shape}",
            field="values",
        )
    stop = max(needed.stop, split.train.stop)
    if arr.shape[0] < stop:
        raise DataError(
            f"values: the series has {arr.shape[0]} rows; the split reaches row {stop}",
            field="values",
        )
    for rows in (split.train, needed):
        bad = np.flatnonzero(~np.isfinite(arr[rows]))
        if bad.size:
            row = rows.start + int(bad[0])
            raise DataError(
                f"values, row {row}: {arr[row]} is not finite ({bad.size} such rows in "
                f"[{rows.start}, {rows.stop}))",
                field="values",
            )
    return arr


def part_windows(
    values: npt.ArrayLike, split: Split, horizon: int, *, part: Part = "test"
) -> Windows:
    """Every window of `split.lookback` inputs and `horizon` targets inside one part, stride 1.

    The targets of every window lie inside the part, so `N = split.n_windows(part, horizon)`:
    for the ETT test part with look-back `L`, `(L + 2880) - L - H + 1 = 2881 - H` (hourly).

    Args:
        values: `[T]` the series in its original units (a 1-D array), at least as long as the
            split reaches; its train rows and the part's rows must be finite.
        split: the chronological split (`val`/`test` start `lookback` rows early).
        horizon: `H >= 1` target steps per window.
        part: which part to window (default `test`).

    Raises:
        DataError: bad shape, too short, a non-finite value, or no window fits in the part.
    """
    horizon = _check_int(horizon, "horizon", 1)
    lookback = _check_int(split.lookback, "lookback", 1)
    rows = _part_rows(split, part)
    arr = _series(values, rows, split)
    n_windows = split.n_windows(part, horizon)
    if n_windows < 1:
        raise DataError(
            f"the {part} part has {rows.stop - rows.start} rows, too few for one window of "
            f"lookback {lookback} + horizon {horizon}",
            field="horizon",
        )
    windows = sliding_window_view(arr[rows], lookback + horizon)  # [N, L + H], read-only
    origins = rows.start + lookback + np.arange(n_windows, dtype=np.int64)
    return Windows(
        inputs=windows[:, :lookback],
        targets=windows[:, lookback:],
        origins=origins,
        part=part,
    )


def test_windows(values: npt.ArrayLike, split: Split, horizon: int) -> Windows:
    """All test windows of the protocol: `part_windows(values, split, horizon, part="test")`."""
    return part_windows(values, split, horizon, part="test")


# pytest would otherwise collect `test_windows` as a test in any test module that imports it.
test_windows.__test__ = False  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TrainScale:
    """Mean and population std of the training rows: the protocol's z-score."""

    mean: float
    std: float

    def zscore(self, values: npt.ArrayLike) -> FloatArray:
        """`(values - mean) / std`, any shape."""
        return (np.asarray(values, dtype=np.float64) - self.mean) / self.std


def train_scale(values: npt.ArrayLike, split: Split) -> TrainScale:
    """The z-score fitted on `values[split.train]` (mean and `ddof = 0` std).

    Raises:
        DataError: the series is too short, has a non-finite training value, or a constant
            training part (std 0).
    """
    arr = _series(values, split.train, split)
    train = arr[split.train]
    scale = TrainScale(mean=float(train.mean()), std=float(train.std()))
    if not scale.std > 0:
        raise DataError(
            f"values: the training rows [{split.train.start}, {split.train.stop}) are constant "
            f"(std {scale.std}); the protocol's z-score is undefined",
            field="values",
        )
    return scale


class ProtocolMetrics(TypedDict):
    """MSE and MAE on the z-scored scale, overall (`float`) and per horizon step (`[H]`)."""

    mse: float
    mae: float
    mse_per_step: FloatArray
    mae_per_step: FloatArray
    n_windows: int


def protocol_metrics(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, train_mean: float, train_std: float
) -> ProtocolMetrics:
    """MSE and MAE of `[N, H]` forecasts after z-scoring both sides with the training statistics.

    Args:
        y_true: `[N, H]` actual values in the original units.
        y_pred: `[N, H]` forecasts in the original units.
        train_mean: mean of the training rows.
        train_std: std of the training rows (> 0).

    Raises:
        DataError: shapes differ, a value is not finite, or `train_std` is not a positive number.
    """
    if not (np.isfinite(train_mean) and np.isfinite(train_std) and train_std > 0):
        raise DataError(
            f"train_mean {train_mean}, train_std {train_std}: need finite values and std > 0",
            field="train_std",
        )
    scale = TrainScale(mean=float(train_mean), std=float(train_std))
    truth, pred = scale.zscore(y_true), scale.zscore(y_pred)
    return ProtocolMetrics(
        mse=mse(truth, pred),
        mae=mae(truth, pred),
        mse_per_step=mse_per_step(truth, pred),
        mae_per_step=mae_per_step(truth, pred),
        n_windows=int(truth.shape[0]),
    )


@dataclass(frozen=True)
class Evaluation:
    """The protocol's result for one forecaster on one split part.

    Attributes:
        metrics: MSE/MAE on the z-scored scale, overall and per horizon step.
        part: the split part scored.
        lookback: `L`.
        horizon: `H`.
        n_windows: windows in the part (`split.n_windows(part, horizon)`).
        n_evaluated: windows forecast and scored; equal to `n_windows` (nothing is dropped).
        n_batches: calls made to the forecaster.
        batch_size: the batch size asked for (every call but the last gets this many rows).
        last_batch_size: rows in the final call (smaller than `batch_size` when `N` is not a
            multiple of it; it is scored like the others).
        scale: the training mean and std used for the z-score.
    """

    metrics: ProtocolMetrics
    part: Part
    lookback: int
    horizon: int
    n_windows: int
    n_evaluated: int
    n_batches: int
    batch_size: int
    last_batch_size: int
    scale: TrainScale


def evaluate_forecaster(
    forecast_fn: Callable[..., npt.ArrayLike],
    values: npt.ArrayLike,
    split: Split,
    horizon: int,
    *,
    part: Part = "test",
    batch_size: int = DEFAULT_BATCH_SIZE,
    with_origins: bool = False,
) -> Evaluation:
    """Score `forecast_fn` on every window of a split part with the standard protocol.

    Args:
        forecast_fn: `inputs [b, L] -> forecasts [b, H]`, both in the original units; it gets a
            fresh contiguous copy of each batch. With `with_origins`, it is called as
            `forecast_fn(inputs, origins)`, `origins` `[b]` the rows of the windows' first targets,
            so that a forecaster can look up the windows' timestamps (a fitted `SeriesTransform`
            needs them for its trend and seasonal profile).
        values: `[T]` the series in its original units.
        split: the chronological split; its train rows give the z-score.
        horizon: `H >= 1`.
        part: the part to score (default `test`).
        batch_size: windows per call, `>= 1`; the last batch may be smaller and is kept.
        with_origins: pass each batch's `origins` as the second argument of `forecast_fn`.

    Raises:
        DataError: bad series, split or arguments (see `part_windows`).
        ModelError: `forecast_fn` returned the wrong shape or a non-finite forecast.
    """
    batch_size = _check_int(batch_size, "batch_size", 1)
    windows = part_windows(values, split, horizon, part=part)
    scale = train_scale(values, split)
    n, h = windows.n_windows, windows.horizon
    forecasts = np.empty((n, h), dtype=np.float64)
    n_batches = n_evaluated = last = 0
    for start in range(0, n, batch_size):
        batch = np.ascontiguousarray(windows.inputs[start : start + batch_size])  # [b, L]
        last = batch.shape[0]
        if with_origins:
            origins = windows.origins[start : start + last].copy()  # [b]
            out = np.asarray(forecast_fn(batch, origins), dtype=np.float64)
        else:
            out = np.asarray(forecast_fn(batch), dtype=np.float64)
        if out.shape != (last, h):
            raise ModelError(
                f"forecast_fn returned shape {out.shape} for a batch of {last} windows; "
                f"expected ({last}, {h}) = (batch, horizon)",
                field="forecast_fn",
            )
        bad = np.argwhere(~np.isfinite(out))
        if bad.size:
            row, step = (int(i) for i in bad[0])
            raise ModelError(
                f"forecast_fn returned {len(bad)} non-finite value(s); first for the window with "
                f"origin row {int(windows.origins[start + row])}, step {step}: {out[row, step]}",
                field="forecast_fn",
            )
        forecasts[start : start + last] = out
        n_batches += 1
        n_evaluated += last
    return Evaluation(
        metrics=protocol_metrics(windows.targets, forecasts, scale.mean, scale.std),
        part=part,
        lookback=windows.lookback,
        horizon=h,
        n_windows=n,
        n_evaluated=n_evaluated,
        n_batches=n_batches,
        batch_size=batch_size,
        last_batch_size=last,
        scale=scale,
    )
