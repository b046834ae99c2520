"""POST /anomaly on a real server: equal to the in-process detector, bad input named."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from forecaster.anomaly import AnomalyDetector, DetectorSettings

pytestmark = pytest.mark.integration


def _series_with_a_spike() -> list[float | None]:
    rng = np.random.default_rng(3)
    t = np.arange(400)
    y = 50 + 5 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.3, t.size)
    y[300] += 25.0
    values: list[float | None] = y.tolist()
    values[200] = None  # a missing point is scored 0, never flagged
    return values


def test_anomaly_answers_equal_the_in_process_detector(server: Any) -> None:
    values = _series_with_a_spike()
    response = server.post(
        "/anomaly",
        json={"series": [{"unique_id": "plant_000", "values": values}], "fit_size": 150},
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["series"]
    raw = np.array([np.nan if v is None else v for v in values])
    expected = AnomalyDetector(DetectorSettings()).fit(raw[:150]).score(raw, start=150)
    assert result["scored_from"] == 150
    np.testing.assert_allclose(result["score"], expected.score[150:], rtol=1e-12, atol=1e-12)
    assert result["is_anomaly"] == expected.is_anomaly[150:].tolist()
    assert result["is_anomaly"][300 - 150] is True
    assert result["is_anomaly"][200 - 150] is False
    np.testing.assert_allclose(
        np.array(result["expected"], dtype=float), expected.expected[150:], rtol=1e-12
    )


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"series": [{"unique_id": "a", "values": [1.0] * 50}], "fit_size": 50}, 422, "fit_size"),
        (
            {"series": [{"unique_id": "a", "values": [1.0, 2.0] * 10}], "fit_size": 5},
            422,
            "series[0].values",
        ),
        (
            {"series": [{"unique_id": "a", "values": [1.0] * 50}], "false_alarm_rate": 1},
            422,
            "false_alarm_rate",
        ),
        ({"series": [{"unique_id": "a", "values": [1.0] * 50}], "season": 1}, 400, "season"),
        ({"series": [{"unique_id": "a", "values": ["x"]}]}, 422, "series[0].values[0]"),
        ({"series": []}, 422, "series"),
    ],
    ids=["fit_covers_all", "fit_too_short", "rate_one", "season_one", "value_text", "no_series"],
)
def test_bad_anomaly_input_is_a_4xx_naming_the_field(
    server: Any, payload: dict[str, Any], status: int, field: str
) -> None:
    response = server.post("/anomaly", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert field in response.json()["error"]
