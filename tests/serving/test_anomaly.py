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
        (
            {
                "series": [
                    {
                        "unique_id": "a",
                        "values": [1.0] * 3,
                        "timestamps": ["2024-01-01T02:00", "2024-01-01T01:00", "2024-01-01T03:00"],
                    }
                ],
                "fit_size": 1,
                "forecaster": "detector",
            },
            422,
            "series[0].timestamps",
        ),
    ],
    ids=[
        "fit_covers_all",
        "fit_too_short",
        "rate_one",
        "season_one",
        "value_text",
        "no_series",
        "unsorted_timestamps",
    ],
)
def test_bad_anomaly_input_is_a_4xx_naming_the_field(
    server: Any, payload: dict[str, Any], status: int, field: str
) -> None:
    response = server.post("/anomaly", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert field in response.json()["error"]


# --------------------------------------------------------------------------- model forecasts


def _model(bundles: Any, role: str = "champion") -> Any:
    from serving.runtime import load_model

    folder = bundles.champion if role == "champion" else bundles.fallback
    return load_model(role, folder, source=str(folder), device="cpu")  # type: ignore[arg-type]


def test_one_step_forecasts_equal_forecast_of_each_history(bundles: Any, kit: Any) -> None:
    """Point r's forecast is the horizon-1 forecast of the history up to r - 1, as /forecast
    computes it; NaN where the window before r is short, holds a missing value or a gap."""
    from serving.runtime import one_step_forecasts

    ds, y = bundles.history["plant_001"]
    ds, y = ds[-150:], y[-150:].copy()
    y[100] = np.nan
    ns = ds.astype("datetime64[ns]").astype(np.int64)
    ns[130:] += 3600 * 10**9  # a one-hour gap before row 130
    got = one_step_forecasts(_model(bundles), "plant_001", y, ns, chunk_rows=16)
    need = kit.LOOKBACK + 1  # the tiny config differences once
    model = _model(bundles)
    assert model.spec.series["plant_001"].difference == 1
    known = np.flatnonzero(np.isfinite(got))
    expected_known = [
        r for r in range(need, 150) if not (100 < r <= 100 + need) and not (130 <= r < 130 + need)
    ]
    assert known.tolist() == expected_known
    for r in (need, 60, 99, 100, 100 + need + 1, 129):
        window = slice(r - need, r)
        _, point = kit.expected_forecast(
            bundles.champion, ds[window], y[window], "plant_001", horizon=1
        )
        np.testing.assert_allclose(got[r], point[0], rtol=1e-6)


def test_one_step_forecasts_refuse_an_unknown_series(bundles: Any) -> None:
    from forecaster.errors import DataError
    from serving.runtime import one_step_forecasts

    with pytest.raises(DataError, match="'nowhere' is unknown to the model"):
        one_step_forecasts(_model(bundles), "nowhere", np.ones(50), np.arange(50, dtype=np.int64))


def _plant_anomaly_item(bundles: Any, kit: Any, spike: int) -> tuple[dict[str, Any], Any]:
    item = kit.series_payload(bundles, "plant_000", points=300)
    values = list(item["values"])
    values[spike] += 12.0 * float(np.std(np.diff(values)))
    return {**item, "values": values}, np.array(values)


def test_anomaly_uses_the_champion_forecasts_of_a_known_series(
    server: Any, bundles: Any, kit: Any
) -> None:
    item, raw = _plant_anomaly_item(bundles, kit, spike=250)
    response = server.post("/anomaly", json={"series": [item], "fit_size": 100})
    assert response.status_code == 200, response.text
    (result,) = response.json()["series"]
    assert result["forecaster"] == "champion"
    assert result["model_version"] == str(bundles.champion)
    from serving.runtime import one_step_forecasts

    ns = np.array(
        [np.datetime64(item["start"]) + np.timedelta64(i, "h") for i in range(len(raw))],
        dtype="datetime64[ns]",
    ).astype(np.int64)
    model_forecasts = one_step_forecasts(_model(bundles), "plant_000", raw, ns)
    detector = AnomalyDetector(DetectorSettings()).fit(raw[:100], model_forecasts[:100])
    expected = detector.score(raw, start=100, expected=model_forecasts)
    np.testing.assert_allclose(result["expected"], model_forecasts[100:], rtol=1e-9)
    np.testing.assert_allclose(result["score"], expected.score[100:], rtol=1e-9, atol=1e-12)
    assert result["is_anomaly"] == expected.is_anomaly[100:].tolist()
    assert result["is_anomaly"][250 - 100] is True

    own = server.post(
        "/anomaly", json={"series": [item], "fit_size": 100, "forecaster": "detector"}
    ).json()["series"][0]
    assert own["forecaster"] == "detector"
    assert own["model_version"] is None
    plain = AnomalyDetector(DetectorSettings()).fit(raw[:100]).score(raw, start=100)
    np.testing.assert_allclose(own["score"], plain.score[100:], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"unique_id": "plant_000", "values": [1.0] * 80}, "series[0].start"),
        (
            {"unique_id": "elsewhere", "values": [1.0] * 80, "start": "2024-01-01T00:00:00"},
            "series[0].unique_id",
        ),
        (
            {
                "unique_id": "plant_000",
                "values": [1.0, 2.0],
                "timestamps": ["2024-01-01T01:00:00", "2024-01-01T00:00:00"],
            },
            "series[0].timestamps",
        ),
    ],
    ids=["no_timestamps", "unknown_series", "unsorted_timestamps"],
)
def test_anomaly_forecaster_model_names_what_it_lacks(
    server: Any, item: dict[str, Any], field: str
) -> None:
    response = server.post(
        "/anomaly", json={"series": [item], "fit_size": 1, "forecaster": "model"}
    )
    assert response.status_code in (400, 422), response.text
    assert response.json()["field"] == field
    assert field in response.json()["error"]


def test_anomaly_auto_uses_the_detector_where_the_model_cannot(server: Any) -> None:
    values = [float(v) for v in 10 + np.sin(np.arange(120) / 4)]
    series = [
        {"unique_id": "plant_000", "values": values},  # no timestamps
        {"unique_id": "elsewhere", "values": values, "start": "2024-01-01T00:00:00"},
    ]
    response = server.post("/anomaly", json={"series": series, "fit_size": 60})
    assert response.status_code == 200, response.text
    assert [s["forecaster"] for s in response.json()["series"]] == ["detector", "detector"]


def test_detect_job_with_the_bundle_scores_as_the_endpoint_does(
    server: Any, bundles: Any, kit: Any, tmp_path: Any
) -> None:
    """`forecaster detect --bundle` on a long CSV: the series the model knows get its one-step
    forecasts, exactly as /anomaly with the NAB probationary fit segment; others do not."""
    import pandas as pd

    from forecaster.anomaly import probationary_length
    from pipelines.detect import run_detect

    item, raw = _plant_anomaly_item(bundles, kit, spike=250)
    ds = pd.date_range(item["start"], periods=len(raw), freq="h")
    frame = pd.concat(
        [
            pd.DataFrame({"unique_id": "plant_000", "ds": ds, "y": raw}),
            pd.DataFrame({"unique_id": "stranger", "ds": ds, "y": raw}),
        ]
    )
    source, scored = tmp_path / "in.csv", tmp_path / "out.csv"
    frame.to_csv(source, index=False)
    report = run_detect(source, scored, bundle=bundles.champion)
    assert report.on_model == ("plant_000",)
    out = pd.read_csv(scored)
    fit = probationary_length(len(raw))
    answer = server.post("/anomaly", json={"series": [item], "fit_size": fit}).json()["series"][0]
    assert answer["forecaster"] == "champion"
    known = out[out["unique_id"] == "plant_000"]
    np.testing.assert_allclose(known["anomaly_score"].to_numpy()[fit:], answer["score"], atol=1e-9)
    assert known["is_anomaly"].to_numpy()[fit:].tolist() == answer["is_anomaly"]
    plain = AnomalyDetector(DetectorSettings()).fit(raw[:fit]).score(raw, start=fit)
    stranger = out[out["unique_id"] == "stranger"]
    np.testing.assert_allclose(stranger["anomaly_score"].to_numpy(), plain.score, atol=1e-9)
    # The command line gives the same file.
    from typer.testing import CliRunner

    from forecaster.cli import app

    again = tmp_path / "again.csv"
    command = ["detect", "-i", str(source), "-o", str(again), "--bundle", str(bundles.champion)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "1 on the model's forecasts" in result.output
    pd.testing.assert_frame_equal(pd.read_csv(again), out)


def test_the_documented_anomaly_example_is_answered_on_the_models_forecasts(server: Any) -> None:
    spec = server.get("/docs.json").json()
    body = spec["paths"]["/anomaly"]["post"]["requestBody"]["content"]["application/json"]
    example = body["schema"]["examples"][0]
    response = server.post("/anomaly", json=example)
    assert response.status_code == 200, response.text
    (result,) = response.json()["series"]
    assert result["forecaster"] == "champion"
    assert result["is_anomaly"][-1] is True  # the final 95.0 after a daily pattern near 70-76


# --------------------------------------------------------------------------- off the model


def _off_grid(stamp: str) -> str:
    return str(np.datetime64(stamp) + np.timedelta64(30, "m"))


def _required_items(bundles: Any, kit: Any) -> list[tuple[str, dict[str, Any], str]]:
    """(id, series the model cannot forecast a single point of, the field the 4xx names)."""
    item = kit.series_payload(bundles, "plant_000", points=80)
    stamped = kit.series_payload(bundles, "plant_000", points=80, timestamps=True)
    need = kit.LOOKBACK + 1  # the tiny config differences once
    holes = [None if i % 10 == 5 else v for i, v in enumerate(item["values"])]
    return [
        ("start_off_grid", {**item, "start": _off_grid(item["start"])}, "series[0].start"),
        (
            "timestamps_off_grid",
            {**stamped, "timestamps": [_off_grid(t) for t in stamped["timestamps"]]},
            "series[0].timestamps",
        ),
        ("too_short", {**item, "values": item["values"][:need]}, "series[0].values"),
        ("no_complete_window", {**item, "values": holes}, "series[0].values"),
    ]


def test_anomaly_forecaster_model_refuses_a_series_the_model_cannot_forecast(
    server: Any, bundles: Any, kit: Any
) -> None:
    """Off the model's grid, too short, or no complete window anywhere: the model gives no
    forecast, so `forecaster: model` is a 422 naming the field, not the detector's answer
    labelled as the champion's."""
    for name, item, field in _required_items(bundles, kit):
        response = server.post(
            "/anomaly", json={"series": [item], "fit_size": 1, "forecaster": "model"}
        )
        assert response.status_code == 422, (name, response.text)
        body = response.json()
        assert body["field"] == field, (name, body)
        assert body["error"].startswith(field), (name, body)
    _, short, _ = _required_items(bundles, kit)[2]
    error = server.post(
        "/anomaly", json={"series": [short], "fit_size": 1, "forecaster": "model"}
    ).json()["error"]
    assert "too few" in error
    assert f"more than {kit.LOOKBACK + 1}" in error


def test_anomaly_auto_answers_with_the_detector_where_the_model_forecasts_nothing(
    server: Any, bundles: Any, kit: Any
) -> None:
    for name, item, _ in _required_items(bundles, kit):
        if name == "too_short":  # too short for the detector's fit segment as well
            continue
        response = server.post("/anomaly", json={"series": [item], "fit_size": 50})
        assert response.status_code == 200, (name, response.text)
        (result,) = response.json()["series"]
        assert result["forecaster"] == "detector", name
        assert result["model_version"] is None, name
        alone = server.post(
            "/anomaly", json={"series": [item], "fit_size": 50, "forecaster": "detector"}
        ).json()["series"][0]
        assert result == alone, name


# --------------------------------------------------------------------------- the time grid


def _gapped_sine() -> tuple[Any, Any]:
    """An hourly daily sine with three 12-hour gaps (the review's case)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    ts = pd.date_range("2024-01-01", periods=1200, freq="h")
    y = 50 + 10 * np.sin(2 * np.pi * np.arange(1200) / 24) + rng.normal(0, 0.3, 1200)
    keep = np.ones(1200, dtype=bool)
    for gap in (700, 900, 1050):
        keep[gap : gap + 12] = False
    return ts[keep], y[keep]


def test_anomaly_scores_on_the_time_grid_as_the_detect_command_does(server: Any) -> None:
    """Timestamps with gaps: one score per input row, equal to `forecaster detect`'s
    (`detect_series`, the series on the time grid of its timestamps); the first row after a
    gap is not a jump."""
    from pipelines.detect import detect_series

    ts, y = _gapped_sine()
    fit = 180
    item = {"unique_id": "sensor", "values": y.tolist(), "timestamps": [t.isoformat() for t in ts]}
    response = server.post("/anomaly", json={"series": [item], "fit_size": fit})
    assert response.status_code == 200, response.text
    (result,) = response.json()["series"]
    assert result["forecaster"] == "detector"
    assert len(result["score"]) == len(y) - fit
    cli, _ = detect_series(y, ts.values, probation=fit)
    np.testing.assert_allclose(result["score"], cli.score[fit:], rtol=1e-12, atol=1e-12)
    assert result["is_anomaly"] == cli.is_anomaly[fit:].tolist()
    expected = np.array(result["expected"], dtype=float)
    np.testing.assert_allclose(expected, cli.expected[fit:], rtol=1e-12, equal_nan=True)
    after_gaps = [700, 888, 1026]  # rows, once 12, 24 and 36 hours are gone
    assert not any(result["is_anomaly"][row - fit] for row in after_gaps)


def test_anomaly_on_the_model_scores_a_gapped_series_as_detect_with_the_bundle(
    server: Any, bundles: Any, kit: Any
) -> None:
    """A known series with a timestamp gap: the model's one-step forecasts of the input rows
    on the time grid, as `forecaster detect --bundle` scores them."""
    from pipelines.detect import detect_series
    from serving.runtime import one_step_forecasts

    ds, y = bundles.history["plant_000"]
    keep = np.ones(300, dtype=bool)
    keep[200:205] = False  # five hours missing
    ds, y = ds[-300:][keep], y[-300:][keep]
    fit = 100
    item = {
        "unique_id": "plant_000",
        "values": y.tolist(),
        "timestamps": [kit.format_timestamp(t) for t in ds],
    }
    response = server.post("/anomaly", json={"series": [item], "fit_size": fit})
    assert response.status_code == 200, response.text
    (result,) = response.json()["series"]
    assert result["forecaster"] == "champion"
    ns = ds.astype("datetime64[ns]").astype(np.int64)
    model_forecasts = one_step_forecasts(_model(bundles), "plant_000", y, ns)
    assert np.isfinite(model_forecasts[199])
    assert np.isnan(model_forecasts[200])  # the gap breaks the windows after it
    cli, _ = detect_series(y, ds, probation=fit, expected=model_forecasts)
    np.testing.assert_allclose(result["score"], cli.score[fit:], rtol=1e-9, atol=1e-12)
    assert result["is_anomaly"] == cli.is_anomaly[fit:].tolist()
    np.testing.assert_allclose(
        np.array(result["expected"], dtype=float), cli.expected[fit:], rtol=1e-9, equal_nan=True
    )
