"""Split-conformal prediction intervals per series and horizon step (DESIGN.md §5).

The residuals `forecast - truth` of a trained model on the validation windows give, per series and
horizon step `k`, the split-conformal quantile `q_k` of `|r_k|` at each level; a forecast `y_hat`
then gets the interval `[y_hat_k - q_k, y_hat_k + q_k]`. With `n` calibration windows the quantile
is the `ceil((n + 1) * level)`-th smallest `|r_k|`, which covers a new exchangeable residual with
probability `>= level` (Vovk et al. 2005; Lei et al. 2018, arXiv:1604.04173). When
`ceil((n + 1) * level) > n` the exact quantile is infinite; the largest residual is used instead,
and the level is recorded as `capped` for that series (its coverage guarantee no longer holds).
Consecutive windows overlap, so the guarantee on a real series is approximate.

Stored in a bundle as `calibration.json`; numpy, pydantic and the standard library only, since the
torch-free serving runtime loads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forecaster.errors import DataError, ModelError
from forecaster.files import atomic_write_text

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_LEVELS",
    "FORMAT_VERSION",
    "METHOD",
    "Calibration",
    "SeriesCalibration",
    "conformal_rank",
    "fit_calibration",
    "level_label",
]

CALIBRATION_FILE = "calibration.json"
DEFAULT_LEVELS = (0.8, 0.95)
FORMAT_VERSION = 1
METHOD = "split_conformal_abs"

FloatArray = npt.NDArray[np.float64]
# Levels that differ by less than this are the same level (JSON and arithmetic round-off).
_LEVEL_TOLERANCE = 1e-9


def level_label(level: float) -> str:
    """The level in percent as used in metric names: 0.8 -> '80', 0.975 -> '97.5'."""
    return f"{round(level * 100, 6):g}"


def conformal_rank(n: int, level: float) -> int:
    """`ceil((n + 1) * level)`: the rank (1-based) of the split-conformal quantile among `n`."""
    # The tolerance keeps (99 + 1) * 0.55 = 55.00000000000001 at rank 55, not 56.
    return math.ceil((n + 1) * level - _LEVEL_TOLERANCE)


def _check_levels(levels: Sequence[float], field: str = "levels") -> tuple[float, ...]:
    """Levels as a sorted tuple of distinct floats in (0, 1)."""
    try:
        values = tuple(float(v) for v in levels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{field}: {levels!r} is not a sequence of numbers", field=field) from exc
    if not values:
        raise DataError(f"{field}: at least one level is needed", field=field)
    for value in values:
        if not 0.0 < value < 1.0:
            raise DataError(f"{field}: level {value!r} is not in (0, 1)", field=field)
    ordered = tuple(sorted(values))
    for low, high in zip(ordered, ordered[1:], strict=False):
        if high - low < _LEVEL_TOLERANCE:
            raise DataError(f"{field}: level {low!r} is given twice", field=field)
    return ordered


@dataclass(frozen=True)
class SeriesCalibration:
    """The conformal quantiles of one series.

    Attributes:
        levels: nominal coverage levels, ascending.
        quantiles: `[len(levels), H]` split-conformal quantile of `|residual|` per level and
            horizon step, in the series' original units; non-decreasing in the level.
        n_residuals: calibration windows used.
        capped: per level, True when `n_residuals` was too small for the exact quantile
            (`ceil((n + 1) * level) > n`) and the largest residual was used instead; empty
            (the default) means no level was capped.
    """

    levels: tuple[float, ...]
    quantiles: FloatArray
    n_residuals: int
    capped: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        try:
            quantiles = np.array(self.quantiles, dtype=np.float64)  # a private, read-only copy
        except (TypeError, ValueError) as exc:
            raise ModelError(
                f"quantiles: not a [levels, H] array of numbers ({exc})", field="quantiles"
            ) from None
        quantiles.flags.writeable = False
        object.__setattr__(self, "quantiles", quantiles)
        # Plain Python scalars, so that `to_dict` is JSON-ready whatever the caller passed.
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        object.__setattr__(self, "n_residuals", int(self.n_residuals))
        capped = tuple(bool(c) for c in self.capped) or (False,) * len(self.levels)
        object.__setattr__(self, "capped", capped)


@dataclass(frozen=True)
class Calibration:
    """Per-series conformal quantiles for a model of horizon `H` (the content of
    `calibration.json`)."""

    horizon: int
    levels: tuple[float, ...]
    series: dict[str, SeriesCalibration]
    method: str = METHOD

    def __post_init__(self) -> None:
        """`ModelError` naming the first inconsistency (what a malformed file would hold)."""
        if self.method != METHOD:
            raise ModelError(f"method {self.method!r} is not {METHOD!r}", field="method")
        horizon = self.horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 1:
            raise ModelError(f"horizon {horizon!r} is not an integer >= 1", field="horizon")
        object.__setattr__(self, "horizon", int(horizon))
        try:
            levels = _check_levels(self.levels)
        except DataError as exc:
            raise ModelError(exc.message, field="levels") from None
        if levels != tuple(self.levels):
            raise ModelError(
                f"levels {list(self.levels)} are not in ascending order", field="levels"
            )
        object.__setattr__(self, "levels", levels)
        if not self.series:
            raise ModelError("no series are calibrated", field="series")
        for uid, entry in self.series.items():
            _check_series(uid, entry, levels, self.horizon)

    def for_series(self, series_id: str) -> SeriesCalibration:
        """One series' calibration; `DataError` naming the known ids if it is absent."""
        if series_id in self.series:
            return self.series[series_id]
        names = sorted(self.series)
        shown = ", ".join(map(repr, names[:10]))
        if len(names) > 10:
            shown += f" and {len(names) - 10} more"
        raise DataError(
            f"series {series_id!r} was not calibrated (not in the validation data); "
            f"calibrated series: {shown}",
            field="unique_id",
        )

    def level_index(self, level: float) -> int:
        """Position of `level` in `levels`; `ModelError` naming the calibrated levels if absent."""
        try:
            wanted = float(level)
        except (TypeError, ValueError):
            wanted = math.nan
        for i, calibrated in enumerate(self.levels):
            if abs(calibrated - wanted) < _LEVEL_TOLERANCE:
                return i
        shown = ", ".join(f"{v:g}" for v in self.levels)
        raise ModelError(
            f"level {level!r} is not calibrated; calibrated levels: {shown}", field="level"
        )

    def quantile(self, series_id: str, level: float) -> FloatArray:
        """`[H]` the conformal quantile of `|residual|` of one series at one level."""
        index = self.level_index(level)
        return self.for_series(series_id).quantiles[index].copy()

    def bounds(
        self, series_id: str, point: npt.ArrayLike, level: float
    ) -> tuple[FloatArray, FloatArray]:
        """Interval bounds `(point - q, point + q)` around a point forecast.

        Args:
            series_id: the series the forecast belongs to.
            point: `[h]` or `[N, h]` point forecast(s) in original units, `1 <= h <= horizon`;
                step `k` gets the quantile of horizon step `k`.
            level: one of the calibrated levels.

        Returns:
            `(lower, upper)`, each of the shape of `point`.

        Raises:
            DataError: unknown series, bad shape, `h > horizon`, or a non-finite forecast.
            ModelError: the level is not calibrated.
        """
        q = self.quantile(series_id, level)
        try:
            values = np.asarray(point, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"point: not a numeric array ({exc})", field="point") from exc
        if values.ndim not in (1, 2) or values.shape[-1] == 0:
            raise DataError(
                f"point: expected a [h] or [N, h] forecast with h >= 1, got shape {values.shape}",
                field="point",
            )
        h = values.shape[-1]
        if h > self.horizon:
            raise DataError(
                f"point: {h} steps exceed the calibrated horizon {self.horizon}", field="point"
            )
        if not np.isfinite(values).all():
            raise DataError(
                f"point: {int((~np.isfinite(values)).sum())} non-finite forecast value(s) for "
                f"series {series_id!r}",
                field="point",
            )
        return values - q[:h], values + q[:h]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats as Python floats, which JSON round-trips exactly)."""
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "horizon": self.horizon,
            "levels": list(self.levels),
            "series": {
                uid: {
                    "n_residuals": s.n_residuals,
                    "capped": list(s.capped),
                    "quantiles": s.quantiles.tolist(),
                }
                for uid, s in self.series.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "calibration") -> Calibration:
        """Validate and build; `ModelError` naming `source` and the offending field."""
        try:
            record = _CalibrationRecord.model_validate(data)
        except ValidationError as exc:
            raise _record_error(exc, source) from None
        try:
            return record.to_calibration()
        except ModelError as exc:
            raise ModelError(f"{source}: {exc.message}", field=exc.field) from None

    def save(self, path: str | Path) -> Path:
        """Write `calibration.json` atomically; return the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a `calibration.json`; `ModelError` naming the file and the problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"calibration file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: cannot read: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))


def _check_series(
    uid: str, entry: SeriesCalibration, levels: tuple[float, ...], horizon: int
) -> None:
    """`ModelError` unless one series' entry fits the calibration's levels and horizon."""
    where = f"series {uid!r}"
    if tuple(entry.levels) != levels:
        raise ModelError(f"{where}: levels {list(entry.levels)} differ from {list(levels)}")
    q = entry.quantiles
    if q.shape != (len(levels), horizon):
        raise ModelError(
            f"{where}: quantiles must be {len(levels)} rows (one per level) of {horizon} values "
            f"(the horizon), got shape {q.shape}",
            field="quantiles",
        )
    if len(entry.capped) != len(levels):
        raise ModelError(
            f"{where}: capped has {len(entry.capped)} entries for {len(levels)} levels",
            field="capped",
        )
    if entry.n_residuals < 1:
        raise ModelError(f"{where}: n_residuals {entry.n_residuals} is not >= 1")
    if not np.isfinite(q).all() or (q < 0).any():
        raise ModelError(f"{where}: a quantile of |residual| is negative or not finite")
    if (np.diff(q, axis=0) < 0).any():
        raise ModelError(f"{where}: quantiles decrease as the level increases")


def _quantiles(scores: FloatArray, levels: tuple[float, ...]) -> tuple[FloatArray, list[bool]]:
    """`[len(levels), H]` split-conformal quantiles of `[n, H]` scores, and which were capped."""
    n = scores.shape[0]
    ordered = np.sort(scores, axis=0)  # [n, H]
    rows, capped = [], []
    for level in levels:
        rank = conformal_rank(n, level)
        capped.append(rank > n)
        rows.append(ordered[min(rank, n) - 1])
    return np.stack(rows), capped


def _residual_array(uid: str, values: npt.ArrayLike) -> FloatArray:
    """One series' residuals as a finite, non-empty float64 `[N, H]` array."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"residuals[{uid!r}]: not a numeric array ({exc})", field="residuals"
        ) from exc
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(
            f"residuals[{uid!r}]: expected a non-empty [N, H] array (windows x horizon steps), "
            f"got shape {arr.shape}",
            field="residuals",
        )
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        window, step = (int(i) for i in bad[0])
        raise DataError(
            f"residuals[{uid!r}]: {len(bad)} non-finite value(s); first at window {window}, "
            f"step {step}: {arr[window, step]}",
            field="residuals",
        )
    return arr


def fit_calibration(
    residuals: Mapping[str, npt.ArrayLike], levels: Sequence[float] = DEFAULT_LEVELS
) -> Calibration:
    """Fit split-conformal quantiles of `|residual|` per series and horizon step.

    Args:
        residuals: `residuals[series]` = `[N, H]` forecast minus truth (original units) on the
            validation windows; every series has the same `H`.
        levels: nominal coverage levels in (0, 1), stored ascending.

    Returns:
        The calibration. A level with `ceil((N + 1) * level) > N` uses the largest `|residual|`
        and is marked `capped` for that series.

    Raises:
        DataError: no series, a bad shape, mismatched horizons, a non-finite residual or a bad
            level.
    """
    ordered_levels = _check_levels(levels)
    if not residuals:
        raise DataError("residuals: no series to calibrate", field="residuals")
    arrays = {str(uid): _residual_array(uid, values) for uid, values in residuals.items()}
    horizons = {uid: arr.shape[1] for uid, arr in arrays.items()}
    horizon = next(iter(horizons.values()))
    for uid, h in horizons.items():
        if h != horizon:
            raise DataError(
                f"residuals[{uid!r}]: horizon {h} differs from the first series' {horizon}",
                field="residuals",
            )
    series: dict[str, SeriesCalibration] = {}
    for uid, arr in arrays.items():
        quantiles, capped = _quantiles(np.abs(arr), ordered_levels)
        series[uid] = SeriesCalibration(
            levels=ordered_levels,
            quantiles=quantiles,
            n_residuals=int(arr.shape[0]),
            capped=tuple(capped),
        )
    return Calibration(horizon=horizon, levels=ordered_levels, series=series)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _SeriesRecord(_Record):
    n_residuals: int = Field(ge=1)
    capped: tuple[bool, ...] = Field(min_length=1)
    quantiles: tuple[tuple[float, ...], ...]


class _CalibrationRecord(_Record):
    format_version: Literal[1]
    method: Literal["split_conformal_abs"]
    horizon: int = Field(ge=1)
    levels: tuple[float, ...] = Field(min_length=1)
    series: dict[str, _SeriesRecord] = Field(min_length=1)

    def to_calibration(self) -> Calibration:
        series: dict[str, SeriesCalibration] = {}
        for uid, entry in self.series.items():
            try:
                series[uid] = SeriesCalibration(
                    levels=self.levels,
                    quantiles=entry.quantiles,  # type: ignore[arg-type]  # converted on init
                    n_residuals=entry.n_residuals,
                    capped=entry.capped,
                )
            except ModelError as exc:
                raise ModelError(f"series {uid!r}: {exc.message}", field=exc.field) from None
        return Calibration(
            horizon=self.horizon, levels=self.levels, method=self.method, series=series
        )


def _record_error(exc: ValidationError, source: str) -> ModelError:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = f"{source}: {key}: " if key else f"{source}: "
        problems.append(f"{where}{err['msg']}")
    message = (
        problems[0]
        if len(problems) == 1
        else f"{len(problems)} problems: " + "; ".join(problems[:5])
    )
    field = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
    return ModelError(message, field=field)
