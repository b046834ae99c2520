"""`POST /anomaly`: the causal residual detector of forecaster/anomaly.py, per request.

Stateless: each series is fitted on its leading `fit_size` points (taken as normal) and every
later point is scored causally, as `AnomalyDetector.fit(values[:fit]).score(values, start=fit)`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from forecaster.anomaly import PROBATION_FRACTION, AnomalyDetector, DetectorSettings
from forecaster.errors import DataError, ModelError
from serving.schemas import AnomalyRequest, AnomalyResponse, SeriesAnomalies

__all__ = ["detect"]


def _nullable(values: npt.NDArray[np.float64]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def detect(request: AnomalyRequest, max_series: int = 1024) -> AnomalyResponse:
    """Fit and score every series of the request.

    Raises:
        DataError: too many series, a fit segment as long as the series or too short to fit.
        ModelError: invalid detector settings (field `false_alarm_rate` or `season`).
    """
    if len(request.series) > max_series:
        raise DataError(
            f"series: {len(request.series)} series exceed the limit of {max_series} per request",
            field="series",
        )
    try:
        settings = DetectorSettings(
            false_alarm_rate=request.false_alarm_rate, season=request.season
        )
    except ModelError as exc:
        field = "season" if "season" in exc.message else "false_alarm_rate"
        raise ModelError(f"{field}: {exc.message}", field=field) from None
    results = []
    for i, series in enumerate(request.series):
        prefix = f"series[{i}].values"
        values = np.array([np.nan if v is None else v for v in series.values], dtype=np.float64)
        n = len(values)
        fit = request.fit_size if request.fit_size is not None else int(PROBATION_FRACTION * n)
        if fit >= n:
            raise DataError(
                f"fit_size: {fit} leaves no point of series[{i}] ({n} values) to score",
                field="fit_size",
            )
        try:
            detector = AnomalyDetector(settings).fit(values[:fit])
            result = detector.score(values, start=fit)
        except DataError as exc:
            raise DataError(f"{prefix}: {exc.message}", field=prefix) from None
        results.append(
            SeriesAnomalies(
                unique_id=series.unique_id,
                scored_from=fit,
                score=result.score[fit:].tolist(),
                is_anomaly=result.is_anomaly[fit:].tolist(),
                expected=_nullable(result.expected[fit:]),
                lower=_nullable(result.lower[fit:]),
                upper=_nullable(result.upper[fit:]),
            )
        )
    return AnomalyResponse(series=results)
