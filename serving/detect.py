"""`POST /anomaly`: the causal residual detector of forecaster/anomaly.py, per request.

Stateless: each series is fitted on its leading `fit_size` points (taken as normal) and every
later point is scored causally, as `AnomalyDetector.fit(values[:fit]).score(values, start=fit)`.
A series sent with `timestamps` is scored on their time grid, as `forecaster detect` scores a
file (`forecaster.anomaly.detect_on_time_grid`: a gap is missing steps, not a jump); the answer
has one entry per input point, in input order.
A series with timestamps (or a start) that the served model knows is screened against the
model's one-step forecasts (`Runtime.one_step`): their residuals are one more test beside the
detector's own forecasters' (wherever the model has a complete window), calibrated from the
model's residuals on the fit segment, and they are the reported expected values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from forecaster.anomaly import (
    PROBATION_FRACTION,
    DetectorSettings,
    detect_on_time_grid,
)
from forecaster.errors import DataError, ModelError
from serving.runtime import request_timestamps
from serving.schemas import AnomalyRequest, AnomalyResponse, AnomalySeriesInput, SeriesAnomalies

__all__ = ["ModelForecasts", "detect"]

# (series, its values [n] with NaN where missing, field prefix, required)
#   -> (one-step forecasts [n], role, version) or None
ModelForecasts = Callable[
    [AnomalySeriesInput, npt.NDArray[np.float64], str, bool],
    tuple[npt.NDArray[np.float64], str, str] | None,
]


def _nullable(values: npt.NDArray[np.float64]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def detect(
    request: AnomalyRequest, max_series: int = 1024, model: ModelForecasts | None = None
) -> AnomalyResponse:
    """Fit and score every series of the request, on `model`'s one-step forecasts where the
    request's `forecaster` and the series allow.

    Raises:
        DataError: too many series, a fit segment as long as the series or too short to fit,
            timestamps out of order; `forecaster: model` for a series the model cannot
            forecast (from `model`).
        ModelError: invalid detector settings (field `false_alarm_rate` or `season`), or
            `forecaster: model` where no model is served.
        ModelUnavailable: `forecaster: model` and every model failed (from `model`).
    """
    if len(request.series) > max_series:
        raise DataError(
            f"series: {len(request.series)} series exceed the limit of {max_series} per request",
            field="series",
        )
    if request.forecaster == "model" and model is None:
        raise ModelError("forecaster: no model is served here", field="forecaster")
    try:
        settings = DetectorSettings(
            false_alarm_rate=request.false_alarm_rate, season=request.season
        )
    except ModelError as exc:
        field = "season" if "season" in exc.message else "false_alarm_rate"
        raise ModelError(f"{field}: {exc.message}", field=field) from None
    results = []
    for i, series in enumerate(request.series):
        prefix = f"series[{i}]"
        values = np.array([np.nan if v is None else v for v in series.values], dtype=np.float64)
        n = len(values)
        fit = request.fit_size if request.fit_size is not None else int(PROBATION_FRACTION * n)
        if fit >= n:
            raise DataError(
                f"fit_size: {fit} leaves no point of series[{i}] ({n} values) to score",
                field="fit_size",
            )
        ns = request_timestamps(series, prefix)
        answer = None
        if model is not None and request.forecaster != "detector":
            answer = model(series, values, prefix, request.forecaster == "model")
        expected, role, version = answer if answer is not None else (None, "detector", None)
        try:
            result = detect_on_time_grid(
                values,
                None if ns is None else ns.astype("datetime64[ns]"),
                settings,
                fit_rows=fit,
                expected=expected,
            )
        except DataError as exc:
            raise DataError(f"{prefix}.values: {exc.message}", field=f"{prefix}.values") from None
        results.append(
            SeriesAnomalies(
                unique_id=series.unique_id,
                scored_from=fit,
                forecaster=role,  # type: ignore[arg-type]
                model_version=version,
                score=result.score[fit:].tolist(),
                is_anomaly=result.is_anomaly[fit:].tolist(),
                expected=_nullable(result.expected[fit:]),
                lower=_nullable(result.lower[fit:]),
                upper=_nullable(result.upper[fit:]),
            )
        )
    return AnomalyResponse(series=results)
