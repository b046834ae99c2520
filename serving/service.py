"""The BentoML service: endpoints only; errors mapped to HTTP (DESIGN.md §7).

`bentoml serve serving.service:Forecaster` with the `FORECASTER_*` variables of
serving/settings.py (`forecaster serve --config C` sets them). Routes: `POST /forecast`,
`POST /anomaly`, `GET /model`, `POST /admin/reload`; BentoML adds `/healthz`, `/livez`,
`/metrics`, `/docs.json` and the Swagger UI at `/`; `/readyz` answers from the runtime
(ready, degraded, unavailable). Every error body is `{"error", "field", "detail"}`; bad input
is 4xx, no model is 503.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, TypeVar

import bentoml
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from forecaster import __version__
from forecaster.errors import ForecasterError
from serving.detect import detect
from serving.gateway import Gateway, GatewayState
from serving.runtime import Role, Runtime
from serving.schemas import (
    AnomalyRequest,
    AnomalyResponse,
    ErrorResponse,
    ForecastRequest,
    ForecastResponse,
    ModelsResponse,
    ReloadResponse,
)
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)

ENDPOINTS = frozenset(
    {
        "/forecast",
        "/anomaly",
        "/model",
        "/admin/reload",
        "/readyz",
        "/livez",
        "/healthz",
        "/metrics",
    }
)

REQUESTS = bentoml.metrics.Counter(
    name="forecaster_requests",
    documentation="HTTP requests by endpoint and status code",
    labelnames=["endpoint", "status"],
)
FALLBACKS = bentoml.metrics.Counter(
    name="forecaster_fallback_activations",
    documentation="requests answered by the fallback model, by reason",
    labelnames=["reason"],
)
INFERENCE_SECONDS = bentoml.metrics.Histogram(
    name="forecaster_inference_latency_seconds",
    documentation="ONNX Runtime call duration by answering model",
    labelnames=["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

CARRIED = bentoml.metrics.Counter(
    name="forecaster_carried_state",
    documentation="series answered from carried recurrent state (hit) or their whole window (miss)",
    labelnames=["result"],
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "invalid request (for example an uncalibrated level)"),
        (401, "missing or invalid bearer token (when FORECASTER_API_TOKEN is set)"),
        (413, "request body over the configured limit"),
        (422, "a field is invalid: the message and `field` name it"),
        (503, "no model can answer"),
    )
}

Body = TypeVar("Body", bound=BaseModel)

app = FastAPI(title="forecaster", version=__version__)
_state: GatewayState | None = None


class _Metrics:
    """The runtime's observer: Prometheus counters through BentoML's metrics registry."""

    def fallback(self, reason: str) -> None:
        FALLBACKS.labels(reason=reason).inc()

    def inference(self, role: Role, seconds: float) -> None:
        INFERENCE_SECONDS.labels(model=role).observe(seconds)

    def carried(self, hits: int, misses: int) -> None:
        CARRIED.labels(result="hit").inc(hits)
        CARRIED.labels(result="miss").inc(misses)


def _field(loc: tuple[int | str, ...]) -> str:
    """`('body', 'series', 0, 'values', 3)` -> `series[0].values[3]`."""
    text = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` substituted, for an inline OpenAPI request body."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as the JSON request body (parsed by `_parse`)."""
    schema = _inline(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _parse(model: type[Body], body: bytes) -> Body:
    """Validate the raw JSON body in one pass (pydantic's JSON parser: several times faster than
    FastAPI's `json.loads` then validation on large series)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _json(response: BaseModel) -> Response:
    body = type(response).__pydantic_serializer__.to_json(response)  # bytes, no str copy
    return Response(body, media_type="application/json")


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _invalid_response(exc)


def _invalid_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc holds the character position
        reason = (first.get("ctx") or {}).get("error", "")
        return JSONResponse(
            {"error": f"body: not valid JSON: {reason}", "field": "body", "detail": None},
            status_code=422,
        )
    field = _field(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    detail = "; ".join(f"{_field(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:10])
    return JSONResponse(
        {"error": f"{field}: {first.get('msg')}{more}", "field": field, "detail": detail},
        status_code=422,
    )


@app.exception_handler(HTTPException)
async def _http(_: Request, exc: HTTPException) -> JSONResponse:
    field = "body" if exc.status_code == 400 else None
    return JSONResponse(
        {"error": str(exc.detail), "field": field, "detail": None},
        status_code=exc.status_code,
        headers=exc.headers,
    )


@app.exception_handler(ForecasterError)
async def _refused(_: Request, exc: ForecasterError) -> JSONResponse:
    return _refusal(exc)


def _refusal(exc: ForecasterError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.http_status)


async def _forecast(runtime: Runtime, body: bytes) -> Response:
    """`POST /forecast` from its raw body, errors included (the gateway answers the route with
    this, so it is not routed through FastAPI; the FastAPI route documents it)."""
    try:
        return _json(await runtime.forecast_async(_parse(ForecastRequest, body)))
    except RequestValidationError as exc:
        return _invalid_response(exc)
    except ForecasterError as exc:
        return _refusal(exc)


# Access logs cost about 2 ms a request; the request counters and fallback warnings replace them.
@bentoml.service(
    name="forecaster",
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/forecast"]},
)
@bentoml.asgi_app(app, path="/")
class Forecaster:
    """Forecasts from the champion model, the fallback when the champion cannot answer."""

    def __init__(self) -> None:
        global _state
        settings = ServingSettings.from_env()
        self.runtime = Runtime(settings, observer=_Metrics())
        _state = GatewayState(
            settings=settings,
            readiness=self.runtime.status,
            routes={("POST", "/forecast"): partial(_forecast, self.runtime)},
        )
        status, detail = self.runtime.status()
        logger.info("forecaster service %s: %s", status, detail)

    def __is_ready__(self) -> bool:
        return self.runtime.status()[0] != "unavailable"

    @app.post(
        "/forecast",
        response_model=ForecastResponse,
        responses=_ERRORS,
        openapi_extra=_body(ForecastRequest),
    )
    async def forecast(self, request: Request) -> Response:
        """Forecast one or many series; the response says which model answered."""
        return await _forecast(self.runtime, await request.body())

    @app.post(
        "/anomaly",
        response_model=AnomalyResponse,
        responses=_ERRORS,
        openapi_extra=_body(AnomalyRequest),
    )
    async def anomaly(self, request: Request) -> Response:
        """Per-point anomaly score, flag, expected value and bounds after a clean fit segment."""
        payload = _parse(AnomalyRequest, await request.body())
        max_series = self.runtime.settings.max_series
        return _json(await run_in_threadpool(detect, payload, max_series, self.runtime.one_step))

    @app.get("/model", response_model=ModelsResponse, responses=_ERRORS)
    def model(self) -> ModelsResponse:
        """Which model versions are loaded, which one answers, their method and metrics."""
        return self._models_response()

    @app.post("/admin/reload", response_model=ReloadResponse, responses=_ERRORS)
    def reload(self) -> ReloadResponse:
        """Re-resolve the champion and fallback (registry aliases or bundle folders) and swap
        them in; requests in flight finish on the models they started with."""
        changed = self.runtime.reload()
        status, _ = self.runtime.status()
        return ReloadResponse(status=status, changed=changed, models=self.runtime.models.infos())

    def _models_response(self) -> ModelsResponse:
        status, _ = self.runtime.status()
        answering: Role | None = {"ready": "champion", "degraded": "fallback"}.get(status)  # type: ignore[assignment]
        models = self.runtime.models
        return ModelsResponse(
            status=status, answering=answering, models=models.infos(), loaded_at=models.loaded_at
        )


def _count(endpoint: str, status: int) -> None:
    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()


Forecaster.add_asgi_middleware(
    Gateway, state=lambda: _state, endpoints=ENDPOINTS, on_response=_count
)
