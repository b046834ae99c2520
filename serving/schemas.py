"""Request and response models of the HTTP API, with the examples shown in `/docs.json`.

Timestamps are ISO 8601; naive ones are taken as they are (the model's grid is naive), aware ones
are converted to UTC and made naive, as the training data was (forecaster/transform.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AnomalyRequest",
    "AnomalyResponse",
    "AnomalySeriesInput",
    "SeriesAnomalies",
    "ErrorResponse",
    "ForecastRequest",
    "ForecastResponse",
    "ModelInfo",
    "ModelsResponse",
    "ReadinessResponse",
    "ReloadResponse",
    "SeriesForecast",
    "SeriesInput",
]

_VALUES_EXAMPLE = [71.2, 72.9, 74.1, 73.6]
_FORECAST_EXAMPLE = {
    "series": [
        {
            "unique_id": "plant_000",
            "start": "2024-03-18T00:00:00",
            "values": _VALUES_EXAMPLE,
        }
    ],
    "horizon": 3,
    "level": 0.95,
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SeriesInput(_Request):
    """One series' recent history: values with their timestamps, or a start and the model's step.

    The last `lookback` points (plus the differencing order of the preprocessing) are used.
    """

    unique_id: str = Field(
        min_length=1, max_length=200, description="series name", examples=["plant_000"]
    )
    values: list[float] = Field(
        min_length=1,
        description="observations, oldest first; finite numbers only",
        examples=[_VALUES_EXAMPLE],
    )
    timestamps: list[datetime] | None = Field(
        None,
        description="one timestamp per value, strictly increasing, on the model's grid",
        examples=[
            [
                "2024-03-18T00:00:00",
                "2024-03-18T01:00:00",
                "2024-03-18T02:00:00",
                "2024-03-18T03:00:00",
            ]
        ],
    )
    start: datetime | None = Field(
        None,
        description="timestamp of the first value; the rest follow at the model's step",
        examples=["2024-03-18T00:00:00"],
    )

    @model_validator(mode="after")
    def _timestamps_or_start(self) -> SeriesInput:
        if (self.timestamps is None) == (self.start is None):
            raise ValueError("give exactly one of 'timestamps' and 'start'")
        if self.timestamps is not None and len(self.timestamps) != len(self.values):
            raise ValueError(
                f"'timestamps' has {len(self.timestamps)} entries for {len(self.values)} values"
            )
        return self


class ForecastRequest(_Request):
    """Forecast one or many series with the champion (the fallback when the champion fails)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_FORECAST_EXAMPLE]})

    series: list[SeriesInput] = Field(min_length=1, description="series to forecast")
    horizon: int | None = Field(
        None, ge=1, description="steps ahead; at most the model's horizon (its horizon if omitted)"
    )
    level: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="coverage of the interval bounds; one of the model's calibrated levels "
        "(the widest if omitted); ignored by an uncalibrated model",
    )


class SeriesForecast(BaseModel):
    """One series' forecast in the series' units."""

    unique_id: str = Field(examples=["plant_000"])
    timestamps: list[str] = Field(
        description="naive ISO timestamps of the forecast steps",
        examples=[["2024-03-18T04:00:00", "2024-03-18T05:00:00", "2024-03-18T06:00:00"]],
    )
    point: list[float] = Field(examples=[[73.9, 74.4, 75.0]])
    lower: list[float] | None = Field(
        None, description="lower interval bound (null when uncalibrated)", examples=[[72.1, 72.3]]
    )
    upper: list[float] | None = Field(
        None, description="upper interval bound (null when uncalibrated)", examples=[[75.7, 76.5]]
    )
    level: float | None = Field(None, description="coverage of the bounds", examples=[0.95])


class ForecastResponse(BaseModel):
    """Forecasts of every requested series, in request order, and the model that answered."""

    model: Literal["champion", "fallback"] = Field(description="which model answered")
    model_version: str = Field(
        description="registry version or bundle folder", examples=["models:/demo/3"]
    )
    forecasts: list[SeriesForecast]


class ModelInfo(BaseModel):
    """One loaded (or failed) model."""

    role: Literal["champion", "fallback"]
    loaded: bool
    source: str = Field(description="bundle folder or registry URI", examples=["models:/demo/3"])
    version: str | None = Field(None, examples=["3"])
    error: str | None = Field(None, description="why it did not load")
    model: str | None = Field(None, examples=["mi_gru"])
    training_method: str | None = Field(None, examples=["feedback"])
    lookback: int | None = Field(None, examples=[168])
    horizon: int | None = Field(None, examples=[24])
    freq: str | None = Field(None, examples=["h"])
    series: list[str] = Field(default_factory=list, examples=[["plant_000", "plant_001"]])
    calibrated: bool = False
    levels: list[float] = Field(default_factory=list, examples=[[0.8, 0.95]])
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, examples=[{"test": {"mse": 0.061, "mae": 0.19}}]
    )
    providers: list[str] = Field(default_factory=list, examples=[["CPUExecutionProvider"]])


class ModelsResponse(BaseModel):
    """Which models are loaded and which one answers."""

    status: Literal["ready", "degraded", "unavailable"]
    answering: Literal["champion", "fallback"] | None
    models: list[ModelInfo]
    loaded_at: str = Field(description="UTC time of the last (re)load")


class ReadinessResponse(BaseModel):
    """The body of `/readyz`."""

    status: Literal["ready", "degraded", "unavailable"]
    detail: str


class ReloadResponse(BaseModel):
    """The result of `POST /admin/reload`."""

    status: Literal["ready", "degraded", "unavailable"]
    changed: bool = Field(description="whether a model version or file changed")
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    """Every error body: what is wrong, the field at fault, and more detail when useful."""

    error: str = Field(examples=["series[0].values: 12 points are too few; the model needs 169"])
    field: str | None = Field(None, examples=["series[0].values"])
    detail: str | None = None


class AnomalySeriesInput(_Request):
    """One series to screen: a clean start to fit on, then the points to score. With its
    timestamps (or start), a series the served model knows is screened against the model's
    one-step forecasts."""

    unique_id: str = Field(min_length=1, max_length=200, examples=["plant_000"])
    values: list[float | None] = Field(
        min_length=1,
        description="observations, oldest first; null where a value is missing",
        examples=[[71.2, 72.9, None, 73.6]],
    )
    timestamps: list[datetime] | None = Field(
        None,
        description="one timestamp per value, strictly increasing, on the model's grid",
    )
    start: datetime | None = Field(
        None, description="timestamp of the first value; the rest follow at the model's step"
    )

    @model_validator(mode="after")
    def _timestamps_or_start(self) -> AnomalySeriesInput:
        if self.timestamps is not None and self.start is not None:
            raise ValueError("give at most one of 'timestamps' and 'start'")
        if self.timestamps is not None and len(self.timestamps) != len(self.values):
            raise ValueError(
                f"'timestamps' has {len(self.timestamps)} entries for {len(self.values)} values"
            )
        return self


class AnomalyRequest(_Request):
    """Score every point after each series' fit segment with the causal residual detector."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "series": [
                        {
                            "unique_id": "plant_000",
                            "start": "2024-03-18T00:00:00",
                            "values": [70.0 + (i % 24) / 4 for i in range(60)] + [95.0],
                        }
                    ],
                    "fit_size": 48,
                    "false_alarm_rate": 0.001,
                }
            ]
        }
    )

    series: list[AnomalySeriesInput] = Field(min_length=1)
    fit_size: int | None = Field(
        None,
        ge=1,
        description="leading points taken as normal to fit the detector (15% if omitted)",
    )
    false_alarm_rate: float = Field(0.001, gt=0, lt=1, description="flag when p <= this")
    season: int | None = Field(
        None, ge=0, description="seasonal period in steps; 0 none; detected if omitted"
    )
    forecaster: Literal["auto", "model", "detector"] = Field(
        "auto",
        description="whose one-step forecasts the residuals are taken from: 'model' the served "
        "model's (champion, else fallback; the series needs timestamps or start and must be "
        "known to the model), 'detector' the detector's own, 'auto' the model's where it can",
    )


class SeriesAnomalies(BaseModel):
    """Per-point results for the scored points `values[scored_from:]`."""

    unique_id: str
    scored_from: int = Field(description="index of the first scored point (the fit size)")
    forecaster: Literal["champion", "fallback", "detector"] = Field(
        description="whose one-step forecasts gave the residuals"
    )
    model_version: str | None = Field(
        None, description="registry version or bundle folder of that model (null: detector)"
    )
    score: list[float] = Field(description="in [0, 1); 0.5 is the flag threshold")
    is_anomaly: list[bool]
    expected: list[float | None] = Field(description="one-step forecast (null without past)")
    lower: list[float | None]
    upper: list[float | None]


class AnomalyResponse(BaseModel):
    """Anomaly flags of every requested series, in request order."""

    series: list[SeriesAnomalies]
