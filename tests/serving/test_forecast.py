"""POST /forecast, GET /model, /metrics and /docs.json on a real healthy server."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest

from forecaster.calibration import CALIBRATION_FILE, Calibration

pytestmark = pytest.mark.integration


def test_single_series_equals_the_in_process_forecast(
    server: Any, bundles: Any, kit: ModuleType
) -> None:
    response = server.post("/forecast", json={"series": [kit.series_payload(bundles, "plant_000")]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "champion"
    ds, y = bundles.history["plant_000"]
    stamps, point = kit.expected_forecast(bundles.champion, ds, y, "plant_000")
    (forecast,) = body["forecasts"]
    assert forecast["unique_id"] == "plant_000"
    assert forecast["timestamps"] == stamps
    np.testing.assert_allclose(forecast["point"], point, rtol=1e-9, atol=1e-9)


def test_many_series_in_one_request_equal_the_in_process_forecasts(
    server: Any, bundles: Any, kit: ModuleType
) -> None:
    series = [
        kit.series_payload(bundles, "plant_001", 40, timestamps=True),
        kit.series_payload(bundles, "plant_000", 100),
    ]
    response = server.post("/forecast", json={"series": series, "horizon": 4})
    assert response.status_code == 200, response.text
    forecasts = response.json()["forecasts"]
    assert [f["unique_id"] for f in forecasts] == ["plant_001", "plant_000"]
    for forecast in forecasts:
        uid = forecast["unique_id"]
        ds, y = bundles.history[uid]
        stamps, point = kit.expected_forecast(bundles.champion, ds, y, uid, horizon=4)
        assert forecast["timestamps"] == stamps
        np.testing.assert_allclose(forecast["point"], point, rtol=1e-9, atol=1e-9)


def test_bounds_are_the_calibrated_intervals_around_the_point(
    server: Any, bundles: Any, kit: ModuleType
) -> None:
    calibration = Calibration.load(bundles.champion / CALIBRATION_FILE)
    for level in (None, 0.8):
        payload: dict[str, Any] = {"series": [kit.series_payload(bundles, "plant_001")]}
        if level is not None:
            payload["level"] = level
        response = server.post("/forecast", json=payload)
        assert response.status_code == 200, response.text
        (forecast,) = response.json()["forecasts"]
        used = level if level is not None else calibration.levels[-1]
        lower, upper = calibration.bounds("plant_001", np.array(forecast["point"]), used)
        assert forecast["level"] == used
        np.testing.assert_allclose(forecast["lower"], lower, rtol=1e-12)
        np.testing.assert_allclose(forecast["upper"], upper, rtol=1e-12)


def test_model_endpoint_names_versions_method_and_calibration(server: Any, bundles: Any) -> None:
    body = server.get("/model").json()
    assert body["status"] == "ready"
    assert body["answering"] == "champion"
    champion, fallback = body["models"]
    assert champion["role"] == "champion"
    assert champion["source"] == str(bundles.champion)
    assert champion["training_method"] == "feedback"
    assert champion["calibrated"] is True
    levels = Calibration.load(bundles.champion / CALIBRATION_FILE).levels
    assert champion["levels"] == list(levels)
    assert champion["lookback"] == 24
    assert champion["horizon"] == 6
    assert fallback["training_method"] == "bptt"
    assert fallback["calibrated"] is False
    assert "test" in champion["metrics"]


def test_readyz_reports_ready_and_health_endpoints_answer(server: Any) -> None:
    ready = server.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert server.get("/livez").status_code == 200
    assert server.get("/healthz").status_code == 200


def test_metrics_count_requests_by_endpoint_and_status_and_time_inference(
    server: Any, bundles: Any, kit: ModuleType
) -> None:
    before = server.get("/metrics").text
    server.post("/forecast", json={"series": [kit.series_payload(bundles, "plant_000")]})
    server.post("/forecast", json={"series": []})
    after = server.get("/metrics").text
    name = "forecaster_requests_total"
    for status in ("200", "422"):
        assert kit.metric_value(after, name, endpoint="/forecast", status=status) == (
            kit.metric_value(before, name, endpoint="/forecast", status=status) + 1
        )
    count = "forecaster_inference_latency_seconds_count"
    assert kit.metric_value(after, count, model="champion") > kit.metric_value(
        before, count, model="champion"
    )
    assert "bentoml_" in after  # BentoML's own request metrics stay


def test_openapi_document_has_the_endpoints_and_a_realistic_example(server: Any) -> None:
    spec = server.get("/docs.json").json()
    for path in ("/forecast", "/model", "/admin/reload", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    forecast = spec["paths"]["/forecast"]["post"]
    request = forecast["requestBody"]["content"]["application/json"]["schema"]
    example = request["examples"][0]
    assert example["series"][0]["unique_id"] == "plant_000"
    assert request["properties"]["series"]["items"]["required"] == ["unique_id", "values"]
    assert "422" in forecast["responses"]
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "ForecastResponse" in spec["components"]["schemas"]
