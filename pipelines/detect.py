"""The `detect` job: score every row of a CSV for anomalies, causally (issue 8).

Input is NAB's `timestamp,value` or the long format (`unique_id, ds, y`, several series). Per
series, the detector (`forecaster.anomaly`) is fitted on the probationary period only (NAB's rule:
the first 15% of the rows, at most 750) and then run online over the whole series; probationary
rows get score 0. The output is the input, row for row and in its order, plus `anomaly_score`
and `is_anomaly`, written atomically.
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
    AnomalyDetector,
    AnomalyResult,
    DetectorSettings,
    probationary_length,
)
from forecaster.data import ID_COL, TARGET_COL, TIME_COL, read_long
from forecaster.errors import DataError
from forecaster.files import atomic_writer

if TYPE_CHECKING:
    from forecaster.config import Config

__all__ = ["SCORE_COL", "FLAG_COL", "DetectReport", "detect_values", "run_detect", "settings_from"]

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
    """

    input_path: Path
    output_path: Path
    rows: int
    series: int
    flagged: int
    probation_rows: dict[str, int]
    seconds: float


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
) -> tuple[AnomalyResult, int]:
    """Fit on the probationary rows of one series, score it all; return result and probation.

    Args:
        values: the series [n] in time order, NaN where missing.
        settings: detector settings (defaults if None).
        probation: rows to fit on; default NAB's probationary period of `len(values)`.

    Raises:
        DataError: the series is too short to fit on its probationary period.
    """
    y = np.asarray(values, dtype=np.float64)
    if probation is None:
        probation = probationary_length(len(y))
    detector = AnomalyDetector(settings).fit(y[:probation])
    return detector.score(y, start=probation), probation


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


def run_detect(input_path: Path, output_path: Path, config: Config | None = None) -> DetectReport:
    """Score every row of `input_path` and write it with `anomaly_score` and `is_anomaly`.

    Raises:
        DataError: unreadable file, unparsable timestamp or value, duplicated timestamp, a series
            too short for its probationary period.
    """
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    settings = settings_from(config)
    fraction = getattr(getattr(config, "anomaly", None), "probation_fraction", None)
    original, long = _read(input_path)
    score = np.zeros(len(long))
    flag = np.zeros(len(long), dtype=bool)
    probations: dict[str, int] = {}
    for uid, positions in long.groupby(ID_COL, sort=False).indices.items():
        series = long.iloc[positions]
        order = np.argsort(series[TIME_COL].to_numpy(), kind="stable")
        stamps = series[TIME_COL].to_numpy()[order]
        duplicated = np.flatnonzero(stamps[1:] == stamps[:-1])
        if duplicated.size:
            row = int(series.index[order[duplicated[0] + 1]])
            raise DataError(
                f"{input_path}: series '{uid}', row {row}: timestamp {stamps[duplicated[0]]} "
                "is duplicated",
                field=TIME_COL,
            )
        values = series[TARGET_COL].to_numpy(dtype=np.float64)[order]
        probation = probationary_length(len(values), *(() if fraction is None else (fraction,)))
        try:
            result, probation = detect_values(values, settings, probation=probation)
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
    )
    logger.info(
        "detect: %d rows, %d series, %d flagged -> %s",
        report.rows,
        report.series,
        report.flagged,
        output_path,
    )
    return report
