"""Apply and invert a fitted preprocessing spec, numpy only (DESIGN.md §4; training and serving).

Per series, in this order (fitted by `pipelines/preprocess.py` on the training window):

1. trend: `intercept + slope * t`, with `t = (ds - anchor) / step` in steps, so it extends to any
   timestamp on the series' grid;
2. seasonality: a sum of profiles, each indexed by phase `t mod period` (past or future alike);
3. differencing of order `difference` (0..2) of the residual `y - trend - seasonal`;
4. scaling: `(w - center) / scale` of what the model sees, so its input has unit scale whatever
   the differencing order.

`preprocessing.json` is a `PreprocessingSpec`; its floats round-trip exactly (shortest repr).
Timestamps are naive `datetime64` on the spec's grid (tz-aware data is converted to UTC first).
This module imports neither pandas nor statsmodels nor torch: the serving image uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forecaster.errors import DataError
from forecaster.files import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "Components",
    "PreprocessingSpec",
    "ScalingParams",
    "SeasonalProfile",
    "SeasonalityParams",
    "SeriesTransform",
    "TransformBatch",
    "Transformed",
    "TransformedBatch",
    "TrendParams",
    "components",
    "format_timestamp",
    "future_timestamps",
    "inverse_forecast",
    "inverse_forecast_steps",
    "inverse_transform",
    "shape_key",
    "steps_since_anchor",
    "timestamps_to_ns",
    "transform",
    "transform_steps",
]

FORMAT_VERSION = 1

FloatArray = npt.NDArray[np.float64]
_NAT = np.iinfo(np.int64).min
_ISO_UNITS = (("s", 10**9), ("ms", 10**6), ("us", 10**3), ("ns", 1))
_SHOWN_PROBLEMS = 5


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrendParams(_Spec):
    """Global trend `intercept + slope * t`, `t` in steps since the anchor."""

    kind: Literal["none", "linear", "robust"] = "none"
    intercept: float = 0.0
    slope: float = 0.0

    @model_validator(mode="after")
    def _none_is_zero(self) -> TrendParams:
        if self.kind == "none" and (self.intercept != 0.0 or self.slope != 0.0):
            raise ValueError("trend 'none' must have intercept 0 and slope 0")
        return self


class SeasonalProfile(_Spec):
    """One seasonal profile: `values[t mod period]`, centred to mean 0 when fitted."""

    period: int = Field(ge=2)
    values: tuple[float, ...]

    @model_validator(mode="after")
    def _one_value_per_phase(self) -> SeasonalProfile:
        if len(self.values) != self.period:
            raise ValueError(
                f"period {self.period} needs {self.period} values, got {len(self.values)}"
            )
        return self


class SeasonalityParams(_Spec):
    """The seasonal profiles and the method that produced them."""

    kind: Literal["none", "stl", "mstl"] = "none"
    profiles: tuple[SeasonalProfile, ...] = ()

    @model_validator(mode="after")
    def _profiles_match_kind(self) -> SeasonalityParams:
        count = len(self.profiles)
        if self.kind == "none" and count:
            raise ValueError("seasonality 'none' takes no profiles")
        if self.kind == "stl" and count != 1:
            raise ValueError(f"seasonality 'stl' takes exactly one profile, got {count}")
        if self.kind == "mstl" and count == 0:
            raise ValueError("seasonality 'mstl' needs at least one profile")
        periods = [p.period for p in self.profiles]
        if len(set(periods)) != count:
            raise ValueError(f"seasonal periods must be distinct, got {periods}")
        return self


class ScalingParams(_Spec):
    """Affine scaling `(w - center) / scale` of the (differenced) residual."""

    kind: Literal["standard", "robust"] = "standard"
    center: float = 0.0
    scale: float = Field(1.0, gt=0)


class SeriesTransform(_Spec):
    """Everything needed to transform one series and invert it, at any timestamp on its grid."""

    anchor: str = Field(description="naive ISO timestamp of the first training point (t = 0)")
    step_s: float = Field(gt=0, description="sampling step in seconds")
    n_train: int = Field(ge=1, description="training points the spec was fitted on")
    trend: TrendParams = TrendParams()
    seasonality: SeasonalityParams = SeasonalityParams()
    scaling: ScalingParams = ScalingParams()
    difference: int = Field(0, ge=0, le=2)

    @field_validator("anchor")
    @classmethod
    def _anchor_is_naive_iso(cls, value: str) -> str:
        try:
            with warnings.catch_warnings():
                # numpy only warns on a timezone suffix; a naive grid must not silently shift.
                warnings.simplefilter("error")
                parsed = np.datetime64(value, "ns")
        except (ValueError, DeprecationWarning, UserWarning) as exc:
            raise ValueError(f"anchor {value!r} is not a naive ISO timestamp") from exc
        if np.isnat(parsed):
            raise ValueError("anchor must not be NaT")
        return value

    @field_validator("step_s")
    @classmethod
    def _step_whole_ns(cls, value: float) -> float:
        if round(value * 1e9) < 1:
            raise ValueError(f"step_s {value} is shorter than 1 ns")
        return value

    @property
    def anchor_ns(self) -> int:
        """The anchor as integer nanoseconds since the epoch."""
        return int(np.datetime64(self.anchor, "ns").astype(np.int64))

    @property
    def step_ns(self) -> int:
        """The step as integer nanoseconds."""
        return round(self.step_s * 1e9)


class PreprocessingSpec(_Spec):
    """The content of `preprocessing.json`: one `SeriesTransform` per `unique_id`."""

    format_version: Literal[1] = FORMAT_VERSION
    series: dict[str, SeriesTransform]

    def for_series(self, unique_id: str) -> SeriesTransform:
        """The transform of one series; `DataError` naming the known ids if it is absent."""
        try:
            return self.series[unique_id]
        except KeyError:
            known = ", ".join(repr(k) for k in list(self.series)[:10])
            more = ", …" if len(self.series) > 10 else ""
            raise DataError(
                f"series {unique_id!r} has no preprocessing; known series: {known}{more}",
                field="unique_id",
            ) from None

    def to_json(self, *, indent: int | None = None) -> str:
        """Serialise; floats are written in their shortest exactly-round-tripping form."""
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<json>") -> PreprocessingSpec:
        """Parse and validate; `DataError` naming `source` and the offending field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise _spec_error(exc, source) from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, then rename); return the path."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PreprocessingSpec:
        """Read a `preprocessing.json`; `DataError` naming the file and field on any problem."""
        path = Path(path)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"preprocessing file not found: {path}") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_json(text, source=str(path))


def _spec_error(exc: ValidationError, source: str) -> DataError:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "json_invalid":
            problems.append(f"{source}: not valid JSON: {err['msg']}")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict | list | tuple) else f" {value!r}"
        hint = ""
        if err["loc"] == ("format_version",):
            hint = f" (this version reads format {FORMAT_VERSION} only)"
        problems.append(f"{source}: {key}:{shown} {err['msg']}{hint}")
    shown_problems = "; ".join(problems[:_SHOWN_PROBLEMS])
    more = len(problems) - _SHOWN_PROBLEMS
    message = (
        problems[0]
        if len(problems) == 1
        else f"{len(problems)} problems: {shown_problems}"
        + (f"; … ({more} more)" if more > 0 else "")
    )
    field = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
    return DataError(message, field=field, problems=problems)


@dataclass(frozen=True)
class Transformed:
    """The output of `transform` for timestamps `ds[0..n-1]`, `d = difference`.

    Attributes:
        values: `[n - d]` model input; `values[i]` belongs to `ds[i + d]`.
        residual: `[n]` `y - trend - seasonal` in the units of `y`, before differencing and
            scaling.
        difference: the differencing order `d`.
    """

    values: FloatArray
    residual: FloatArray
    difference: int

    @property
    def initial(self) -> FloatArray:
        """`[d]` first residuals: what `inverse_transform` needs to undo the differencing."""
        return self.residual[: self.difference]

    @property
    def last_levels(self) -> FloatArray:
        """`[d]` last residuals: what `inverse_forecast` needs to continue the series."""
        return self.residual[len(self.residual) - self.difference :]


@dataclass(frozen=True)
class Components:
    """Deterministic parts of a series at given timestamps, in the units of `y` (`[n]` each)."""

    trend: FloatArray
    seasonal: FloatArray


def timestamps_to_ns(ds: npt.ArrayLike, *, series_id: str = "series") -> npt.NDArray[np.int64]:
    """`[n]` timestamps (`datetime64` of any unit, or ISO strings) as integer ns since the epoch."""
    arr = np.asarray(ds)
    if arr.ndim != 1:
        raise DataError(f"series {series_id!r}: ds must be 1-D, got shape {arr.shape}", field="ds")
    if arr.dtype.kind != "M":
        try:
            arr = arr.astype("datetime64[ns]")
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"series {series_id!r}: ds of dtype {arr.dtype} is not a timestamp array",
                field="ds",
            ) from exc
    ns = arr.astype("datetime64[ns]").astype(np.int64)
    nat = np.flatnonzero(ns == _NAT)
    if nat.size:
        raise DataError(f"series {series_id!r}, row {nat[0]}: timestamp is NaT", field="ds")
    return ns


def format_timestamp(value: np.datetime64 | int | np.int64) -> str:
    """Naive ISO text of a timestamp (or of integer ns), to the second unless finer is needed."""
    ns = (
        int(np.datetime64(value, "ns").astype(np.int64))
        if isinstance(value, np.datetime64)
        else int(value)
    )
    unit = next(u for u, size in _ISO_UNITS if ns % size == 0)
    return str(np.datetime_as_string(np.datetime64(ns, "ns"), unit=unit))


def steps_since_anchor(
    spec: SeriesTransform, ds: npt.ArrayLike, *, series_id: str = "series"
) -> npt.NDArray[np.int64]:
    """`(ds - anchor) / step` as integers; `DataError` for a timestamp off the grid.

    Args:
        spec: the series' transform.
        ds: `[n]` timestamps, `datetime64` of any unit (or ISO strings).
        series_id: the name used in error messages.
    """
    offset = timestamps_to_ns(ds, series_id=series_id) - spec.anchor_ns
    step = spec.step_ns
    off_grid = np.flatnonzero(offset % step)
    if off_grid.size:
        row = int(off_grid[0])
        stamp = format_timestamp(offset[row] + spec.anchor_ns)
        raise DataError(
            f"series {series_id!r}, row {row}: timestamp {stamp}"
            f" is not a whole number of {spec.step_s:g} s steps from the anchor {spec.anchor}",
            field="ds",
        )
    return offset // step


def _require_consecutive(t: npt.NDArray[np.int64], spec: SeriesTransform, series_id: str) -> None:
    gaps = np.flatnonzero(np.diff(t) != 1)
    if gaps.size:
        row = int(gaps[0]) + 1
        raise DataError(
            f"series {series_id!r}, row {row}: differencing of order {spec.difference} needs "
            f"consecutive {spec.step_s:g} s steps, but timestamp "
            f"{format_timestamp(t[row] * spec.step_ns + spec.anchor_ns)} follows "
            f"{format_timestamp(t[row - 1] * spec.step_ns + spec.anchor_ns)}",
            field="ds",
        )


def _components_at(spec: SeriesTransform, t: npt.NDArray[np.int64]) -> Components:
    """Trend and seasonal parts at steps `t [n]`: `TransformBatch.components` of one series."""
    parts = TransformBatch.stack([spec]).components(t[None, :])
    return Components(trend=parts.trend[0], seasonal=parts.seasonal[0])


def components(
    spec: SeriesTransform, ds: npt.ArrayLike, *, series_id: str = "series"
) -> Components:
    """Trend and seasonal profile at `ds` (`[n]` timestamps, any on the grid, past or future)."""
    return _components_at(spec, steps_since_anchor(spec, ds, series_id=series_id))


def _finite_values(values: npt.ArrayLike, n: int, name: str, series_id: str) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise DataError(
            f"series {series_id!r}: {name} must have shape ({n},), got {arr.shape}", field=name
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        row = int(bad[0])
        raise DataError(f"series {series_id!r}, row {row}: {name} is {arr[row]}", field=name)
    return arr


def transform(
    spec: SeriesTransform,
    y: npt.ArrayLike,
    ds: npt.ArrayLike,
    *,
    series_id: str = "series",
) -> Transformed:
    """Detrend, deseasonalise, difference and scale one series.

    Args:
        spec: the series' fitted transform.
        y: `[n]` finite values.
        ds: `[n]` timestamps on the spec's grid; consecutive steps when `spec.difference > 0`.
        series_id: the name used in error messages.

    Returns:
        `Transformed` with `values` `[n - d]` and the residual `[n]` (`initial`, `last_levels`).

    Raises:
        DataError: shapes differ, a value is not finite, a timestamp is off the grid, or the series
            is too short (or has a gap) for the differencing order.
    """
    t = steps_since_anchor(spec, ds, series_id=series_id)
    values = _finite_values(y, t.shape[0], "y", series_id)
    d = spec.difference
    if d:
        if t.shape[0] <= d:
            raise DataError(
                f"series {series_id!r}: {t.shape[0]} points are too few for differencing of "
                f"order {d} (need at least {d + 1})",
                field="y",
            )
        _require_consecutive(t, spec, series_id)
    # The arithmetic is the batch one's, for a batch of this one series.
    batch = transform_steps(TransformBatch.stack([spec]), values[None, :], t[None, :])
    return Transformed(values=batch.values[0], residual=batch.residual[0], difference=d)


def _levels(values: npt.ArrayLike | None, d: int, name: str, series_id: str) -> FloatArray:
    if values is None:
        if d:
            raise DataError(
                f"series {series_id!r}: differencing of order {d} needs {name} ({d} values)",
                field=name,
            )
        return np.zeros(0, dtype=np.float64)
    return _finite_values(values, d, name, series_id)


def inverse_transform(
    spec: SeriesTransform,
    values: npt.ArrayLike,
    ds: npt.ArrayLike,
    initial: npt.ArrayLike | None = None,
    *,
    series_id: str = "series",
) -> FloatArray:
    """Undo `transform`: model-scale values back to the units of `y`.

    Args:
        spec: the series' transform.
        values: `[n - d]` transformed values (non-finite values propagate).
        ds: `[n]` timestamps of the original series (the ones given to `transform`).
        initial: `[d]` first residuals (`Transformed.initial`); needed only when `d > 0`.
        series_id: the name used in error messages.

    Returns:
        `[n]` values in the units of `y`.
    """
    t = steps_since_anchor(spec, ds, series_id=series_id)
    d = spec.difference
    head = _levels(initial, d, "initial", series_id)
    scaled = np.asarray(values, dtype=np.float64)
    if scaled.shape != (t.shape[0] - d,):
        raise DataError(
            f"series {series_id!r}: values must have shape ({t.shape[0] - d},) for {t.shape[0]} "
            f"timestamps and differencing of order {d}, got {scaled.shape}",
            field="values",
        )
    if d:
        _require_consecutive(t, spec, series_id)
    level = scaled * spec.scaling.scale + spec.scaling.center
    # Rebuild each differencing level from its first value, innermost first.
    for order in range(d - 1, -1, -1):
        first = np.diff(head, n=order)[0]
        level = np.concatenate(([first], first + np.cumsum(level)))
    parts = _components_at(spec, t)
    return level + parts.trend + parts.seasonal


def inverse_forecast(
    spec: SeriesTransform,
    values: npt.ArrayLike,
    ds: npt.ArrayLike,
    last_levels: npt.ArrayLike | None = None,
    *,
    series_id: str = "series",
) -> FloatArray:
    """Turn model outputs for future timestamps into values in the units of `y`.

    Args:
        spec: the series' transform.
        values: `[h]` model outputs (transformed scale) for `ds`.
        ds: `[h]` future timestamps; when `d > 0` they must be the consecutive steps right after
            the history whose `last_levels` are given.
        last_levels: `[d]` last residuals of the history (`Transformed.last_levels`); needed only
            when `d > 0`.
        series_id: the name used in error messages.

    Returns:
        `[h]` forecasts in the units of `y` (non-finite model outputs propagate).
    """
    t = steps_since_anchor(spec, ds, series_id=series_id)
    d = spec.difference
    tail = _levels(last_levels, d, "last_levels", series_id)
    scaled = np.asarray(values, dtype=np.float64)
    if scaled.shape != t.shape:
        raise DataError(
            f"series {series_id!r}: values must have shape {t.shape} like ds, got {scaled.shape}",
            field="values",
        )
    if d:
        _require_consecutive(t, spec, series_id)
    # The arithmetic is the batch one's, for a batch of this one series.
    one = TransformBatch.stack([spec])
    return inverse_forecast_steps(one, scaled[None, :], t[None, :], tail[None, :])[0]


def future_timestamps(
    spec: SeriesTransform, last_ds: np.datetime64 | str, horizon: int
) -> npt.NDArray[np.datetime64]:
    """The `horizon` grid timestamps after `last_ds` (`datetime64[ns]`)."""
    if horizon < 0:
        raise DataError(f"horizon {horizon} is not >= 0", field="horizon")
    t_last = steps_since_anchor(spec, np.asarray([last_ds]), series_id="last_ds")[0]
    t = t_last + np.arange(1, horizon + 1, dtype=np.int64)
    return (spec.anchor_ns + t * spec.step_ns).astype("datetime64[ns]")


# --------------------------------------------------------------------------- many series at once


def shape_key(spec: SeriesTransform) -> tuple[int, bool, tuple[int, ...]]:
    """What series must share to be transformed together: differencing order, whether there is
    a trend, and the seasonal periods in order."""
    periods = tuple(p.period for p in spec.seasonality.profiles)
    return (spec.difference, spec.trend.kind != "none", periods)


@dataclass(frozen=True)
class TransformBatch:
    """The transforms of `N` same-shaped series (`shape_key`) stacked as arrays.

    `transform_steps` and `inverse_forecast_steps` hold the arithmetic of `transform` and
    `inverse_forecast` (which call them for a batch of one), so row by row they give exactly what
    those give series by series; they skip the per-series checks of timestamps and values, which
    the caller has made.
    """

    difference: int
    intercept: FloatArray | None  # [N, 1]; None: no trend
    slope: FloatArray | None  # [N, 1]
    profiles: tuple[tuple[int, FloatArray], ...]  # (period, [N, period]) in the specs' order
    center: FloatArray  # [N, 1]
    scale: FloatArray  # [N, 1]

    @property
    def size(self) -> int:
        """Number of series `N`."""
        return int(self.center.shape[0])

    @classmethod
    def stack(cls, specs: Sequence[SeriesTransform]) -> TransformBatch:
        """Stack same-shaped transforms.

        Raises:
            DataError: no spec is given, or a spec's shape differs from the first one's.
        """
        if not specs:
            raise DataError("a transform batch needs at least one series", field="specs")
        key = shape_key(specs[0])
        for row, spec in enumerate(specs):
            if shape_key(spec) != key:
                raise DataError(
                    f"specs[{row}]: (difference, trend, periods) {shape_key(spec)} differs from "
                    f"the first series' {key}; batch only same-shaped series",
                    field="specs",
                )

        def column(values: list[float]) -> FloatArray:
            return np.array(values, dtype=np.float64)[:, None]

        trend = key[1]
        return cls(
            difference=key[0],
            intercept=column([s.trend.intercept for s in specs]) if trend else None,
            slope=column([s.trend.slope for s in specs]) if trend else None,
            profiles=tuple(
                (period, np.array([s.seasonality.profiles[j].values for s in specs], np.float64))
                for j, period in enumerate(key[2])
            ),
            center=column([s.scaling.center for s in specs]),
            scale=column([s.scaling.scale for s in specs]),
        )

    def repeat(self, n: int) -> TransformBatch:
        """A batch of `n` copies of this batch's one series (many windows of one series)."""
        if self.size != 1:
            raise DataError(f"repeat: the batch holds {self.size} series, not 1", field="specs")

        def rows(a: FloatArray) -> FloatArray:
            return np.repeat(a, n, axis=0)

        return TransformBatch(
            difference=self.difference,
            intercept=None if self.intercept is None else rows(self.intercept),
            slope=None if self.slope is None else rows(self.slope),
            profiles=tuple((period, rows(values)) for period, values in self.profiles),
            center=rows(self.center),
            scale=rows(self.scale),
        )

    def components(self, t: npt.NDArray[np.int64]) -> Components:
        """Trend and seasonal parts `[N, n]` at steps `t [N, n]`."""
        if self.intercept is None or self.slope is None:
            trend = np.zeros(t.shape, dtype=np.float64)
        else:
            trend = self.intercept + self.slope * t.astype(np.float64)
        seasonal = np.zeros(t.shape, dtype=np.float64)
        for period, values in self.profiles:
            seasonal += np.take_along_axis(values, np.mod(t, period), axis=1)
        return Components(trend=trend, seasonal=seasonal)

    def _check(self, name: str, values: npt.ArrayLike, t: npt.NDArray[np.int64]) -> FloatArray:
        arr = np.asarray(values, dtype=np.float64)
        if t.ndim != 2 or t.shape[0] != self.size or arr.shape != t.shape:
            raise DataError(
                f"{name} {arr.shape} and steps {t.shape} must both be [{self.size}, n]",
                field=name,
            )
        return arr


@dataclass(frozen=True)
class TransformedBatch:
    """`transform_steps` output: `values [N, n - d]` model input, `residual [N, n]`."""

    values: FloatArray
    residual: FloatArray
    difference: int

    @property
    def last_levels(self) -> FloatArray:
        """`[N, d]` last residuals of every series (`Transformed.last_levels` row-wise)."""
        return self.residual[:, self.residual.shape[1] - self.difference :]


def transform_steps(
    batch: TransformBatch, y: npt.ArrayLike, t: npt.NDArray[np.int64]
) -> TransformedBatch:
    """`transform` of `N` series at once: values `y [N, n]` at steps since their anchors
    `t [N, n]` (from `steps_since_anchor`; consecutive when `d > 0`, values finite).

    Raises:
        DataError: shapes disagree, or `n <= d`.
    """
    values = batch._check("y", y, t)
    d = batch.difference
    if values.shape[1] <= d:
        raise DataError(
            f"{values.shape[1]} points are too few for differencing of order {d}", field="y"
        )
    parts = batch.components(t)
    residual = values - parts.trend - parts.seasonal
    differenced = np.diff(residual, n=d, axis=1) if d else residual
    scaled = (differenced - batch.center) / batch.scale
    return TransformedBatch(values=scaled, residual=residual, difference=d)


def inverse_forecast_steps(
    batch: TransformBatch,
    values: npt.ArrayLike,
    t: npt.NDArray[np.int64],
    last_levels: npt.ArrayLike,
) -> FloatArray:
    """`inverse_forecast` of `N` series at once: model outputs `values [N, h]` for the future
    steps `t [N, h]` (consecutive right after the histories when `d > 0`), with the histories'
    `last_levels [N, d]`; non-finite outputs propagate.

    Raises:
        DataError: shapes disagree.
    """
    scaled = batch._check("values", values, t)
    d = batch.difference
    tail = np.asarray(last_levels, dtype=np.float64)
    if tail.shape != (batch.size, d):
        raise DataError(
            f"last_levels: shape {tail.shape} is not ({batch.size}, {d})", field="last_levels"
        )
    level = scaled * batch.scale + batch.center
    # Continue each differencing level from the history's last value, innermost first.
    for order in range(d - 1, -1, -1):
        level = np.diff(tail, n=order, axis=1)[:, -1:] + np.cumsum(level, axis=1)
    parts = batch.components(t)
    return level + parts.trend + parts.seasonal
