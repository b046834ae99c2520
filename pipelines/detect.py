"""The `detect` job: score every row of a CSV for anomalies, causally (issue 8).

Input is NAB's `timestamp,value` or the long format (`unique_id, ds, y`, several series). Per
series, the detector (`forecaster.anomaly`) is fitted on the probationary period only (NAB's rule:
the first 15% of the rows, at most 750) and then run online over the whole series on the time
grid of its timestamps (`forecaster.anomaly.on_time_grid`: a missing step is a missing value, so
lags and seasons count time, not rows); probationary rows get score 0. Repeated timestamps and
a clock set back (time going back once) are kept as consecutive rows in file order, with a
warning; a series whose timestamps go back more often than that is sorted by time. The output is
the input, row for row and in its order, plus `anomaly_score` and `is_anomaly`, written
atomically. With a model bundle, every series the model was trained on also gets the model's
one-step forecasts as one more residual test, computed as `POST /anomaly` does
(`serving.runtime.one_step_forecasts`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pandas as pd

from forecaster.anomaly import (
    AnomalyResult,
    DetectorSettings,
    detect_on_time_grid,
    probationary_length,
)
from forecaster.data import ID_COL, TARGET_COL, TIME_COL, read_long
from forecaster.errors import DataError
from forecaster.files import atomic_writer

if TYPE_CHECKING:
    from forecaster.config import Config

__all__ = [
    "FLAG_COL",
    "SCORE_COL",
    "DetectReport",
    "detect_series",
    "detect_values",
    "run_detect",
    "settings_from",
]

logger = logging.getLogger(__name__)

SCORE_COL = "anomaly_score"
FLAG_COL = "is_anomaly"


@dataclass(frozen=True)
class DetectReport:
    """What a `detect` run did.

    Attributes:
        input_path: the file read.
        output_path: the file written.
        rows: rows written (the input's rows).
        series: number of series scored.
        flagged: rows with `is_anomaly` true.
        probation_rows: rows each series was fitted on (scored 0).
        seconds: wall time of the run.
        on_model: series that had the bundle's one-step forecasts.
    """

    input_path: Path
    output_path: Path
    rows: int
    series: int
    flagged: int
    probation_rows: dict[str, int]
    seconds: float
    on_model: tuple[str, ...] = ()


def settings_from(config: Config | None) -> DetectorSettings:
    """Detector settings from a job config's `anomaly` section (defaults without one)."""
    if config is None:
        return DetectorSettings()
    fields = config.anomaly.model_dump()
    fields["horizons"] = tuple(fields["horizons"])
    return DetectorSettings(**fields)


def detect_values(
    values: npt.ArrayLike,
    settings: DetectorSettings | None = None,
    *,
    probation: int | None = None,
    expected: npt.ArrayLike | None = None,
) -> tuple[AnomalyResult, int]:
    """Fit on the probationary rows of one series, score it all; return result and probation.

    Args:
        values: the series [n] in time order, NaN where missing.
        settings: detector settings (defaults if None).
        probation: rows to fit on; default NAB's probationary period of `len(values)`.
        expected: optional one-step forecasts [n] of a forecasting model (NaN where it has
            none), used for the one-step residuals (`AnomalyDetector.fit` / `score`).

    Raises:
        DataError: the series is too short to fit on its probationary period.
    """
    y = np.asarray(values, dtype=np.float64)
    if probation is None:
        probation = probationary_length(len(y))
    result = detect_on_time_grid(y, None, settings, fit_rows=probation, expected=expected)
    return result, probation


def detect_series(
    values: npt.ArrayLike,
    timestamps: npt.ArrayLike,
    settings: DetectorSettings | None = None,
    *,
    probation: int | None = None,
    expected: npt.ArrayLike | None = None,
) -> tuple[AnomalyResult, int]:
    """`forecaster.anomaly.detect_on_time_grid` fitted on the probationary rows (NAB's 15% by
    default): one entry per input row, and the probation used. The `/anomaly` endpoint scores
    the same way. `expected`: a model's one-step forecasts of the input rows (NaN where it has
    none).

    Raises:
        DataError: timestamps that are not datetimes or not one per value; a series too short.
    """
    y = np.asarray(values, dtype=np.float64)
    if probation is None:
        probation = probationary_length(len(y))
    result = detect_on_time_grid(y, timestamps, settings, fit_rows=probation, expected=expected)
    return result, probation


def _scoring_order(
    stamps: npt.NDArray[np.datetime64], rows: pd.Index, where: str
) -> npt.NDArray[np.int64]:
    """The order to score one series' rows in: file order, or by time when it is unsorted.

    Repeated timestamps and one step back in time (a clock set back) keep file order, with a
    warning naming the first such row; more steps back mean an unsorted series: stable sort.
    """
    steps = np.diff(stamps)
    repeated = np.flatnonzero(steps == np.timedelta64(0))
    back = np.flatnonzero(steps < np.timedelta64(0))
    if back.size > 1:
        logger.warning(
            "%s: timestamps go back in time %d times (first at row %d): sorted by time",
            where,
            back.size,
            rows[back[0] + 1],
        )
        return np.argsort(stamps, kind="stable")
    if repeated.size:
        logger.warning(
            "%s: %d repeated timestamps (first at row %d, %s) scored as consecutive rows",
            where,
            repeated.size,
            rows[repeated[0] + 1],
            stamps[repeated[0]],
        )
    if back.size:
        logger.warning(
            "%s: time goes back at row %d (%s after %s; a clock set back?): rows scored in "
            "file order",
            where,
            rows[back[0] + 1],
            stamps[back[0] + 1],
            stamps[back[0]],
        )
    return np.arange(len(stamps), dtype=np.int64)


def _read(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The input as read (kept for the output) and its long view `unique_id, ds, y`."""
    try:
        original = pd.read_csv(path, keep_default_na=True)
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}", field="input") from None
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}", field="input") from exc
    long = read_long(path)
    if not pd.api.types.is_datetime64_any_dtype(long[TIME_COL]):
        bad = pd.to_datetime(long[TIME_COL], errors="coerce", format="mixed").isna()
        row = int(long.index[bad.to_numpy()][0])
        raise DataError(
            f"{path}, row {row}: timestamp {long[TIME_COL].iloc[row]!r} cannot be parsed",
            field=TIME_COL,
        )
    if not pd.api.types.is_numeric_dtype(long[TARGET_COL]):
        numbers = pd.to_numeric(long[TARGET_COL], errors="coerce")
        bad = numbers.isna() & long[TARGET_COL].notna()
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}, row {row}: value {long[TARGET_COL].iloc[row]!r} is not a number",
            field=TARGET_COL,
        )
    return original, long


def run_detect(
    input_path: Path,
    output_path: Path,
    config: Config | None = None,
    *,
    bundle: Path | None = None,
) -> DetectReport:
    """Score every row of `input_path` and write it with `anomaly_score` and `is_anomaly`;
    with `bundle`, the series it knows also on its one-step forecasts.

    Raises:
        DataError: unreadable file, unparsable timestamp or value, a series too short for its
            probationary period.
        ModelError: the bundle cannot be loaded.
    """
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    settings = settings_from(config)
    model = None
    if bundle is not None:
        from serving.runtime import load_model, one_step_forecasts

        model = load_model("champion", Path(bundle), source=str(bundle), device="cpu")
    on_model: list[str] = []
    fraction = getattr(getattr(config, "anomaly", None), "probation_fraction", None)
    original, long = _read(input_path)
    score = np.zeros(len(long))
    flag = np.zeros(len(long), dtype=bool)
    probations: dict[str, int] = {}
    for uid, positions in long.groupby(ID_COL, sort=False).indices.items():
        series = long.iloc[positions]
        order = _scoring_order(
            series[TIME_COL].to_numpy(), series.index, f"{input_path}: series '{uid}'"
        )
        stamps = series[TIME_COL].to_numpy()[order]
        values = series[TARGET_COL].to_numpy(dtype=np.float64)[order]
        probation = probationary_length(len(values), *(() if fraction is None else (fraction,)))
        expected = None
        if model is not None and str(uid) in model.spec.series:
            ns = stamps.astype("datetime64[ns]").astype(np.int64)
            expected = one_step_forecasts(model, str(uid), values, ns)
            on_model.append(str(uid))
        try:
            result, probation = detect_series(
                values, stamps, settings, probation=probation, expected=expected
            )
        except DataError as exc:
            raise DataError(
                f"{input_path}: series '{uid}' ({len(values)} rows): {exc.message}",
                field=exc.field,
            ) from exc
        rows = positions[order]
        score[rows] = result.score
        flag[rows] = result.is_anomaly
        probations[str(uid)] = probation
    out = original.copy()
    out[SCORE_COL] = score
    out[FLAG_COL] = flag
    with atomic_writer(output_path) as handle:
        out.to_csv(handle, index=False)
    report = DetectReport(
        input_path=input_path,
        output_path=output_path,
        rows=len(out),
        series=len(probations),
        flagged=int(flag.sum()),
        probation_rows=probations,
        seconds=time.perf_counter() - started,
        on_model=tuple(on_model),
    )
    logger.info(
        "detect: %d rows, %d series, %d flagged -> %s",
        report.rows,
        report.series,
        report.flagged,
        output_path,
    )
    return report
