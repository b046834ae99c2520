"""Carried recurrent state: streamed points run through the step graph and answer like the whole
window; gaps, out-of-order data and reloads drop the state."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from forecaster.transform import format_timestamp
from serving.runtime import Runtime
from serving.schemas import ForecastRequest
from serving.settings import ServingSettings

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4  # on the model scale; the tests compare in the series' units, scaled


@pytest.fixture(scope="module")
def streaming(bundles: Any, kit: ModuleType, start_server: Callable[..., Any]) -> Any:
    return start_server(
        kit.bundle_env(bundles.champion, bundles.fallback, FORECASTER_STATE_CACHE_SIZE="100")
    )


def _points(bundles: Any, uid: str, end: int, count: int) -> dict[str, Any]:
    ds, y = bundles.history[uid]
    return {
        "unique_id": uid,
        "start": format_timestamp(ds[end - count]),
        "values": y[end - count : end].tolist(),
    }


def _hits(server: Any, kit: ModuleType) -> float:
    return kit.metric_value(
        server.get("/metrics").text, "forecaster_carried_state_total", result="hit"
    )


def _assert_like_window(
    body: dict[str, Any], bundles: Any, kit: ModuleType, uid: str, end: int
) -> None:
    ds, y = bundles.history[uid]
    stamps, point = kit.expected_forecast(bundles.champion, ds[:end], y[:end], uid)
    (forecast,) = body["forecasts"]
    assert forecast["timestamps"] == stamps
    scale = float(np.std(y))
    np.testing.assert_allclose(forecast["point"], point, rtol=0, atol=TOLERANCE * scale)


def test_streamed_points_answer_like_the_whole_window(
    streaming: Any, bundles: Any, kit: ModuleType
) -> None:
    uid, end = "plant_000", 300
    first = streaming.post("/forecast", json={"series": [_points(bundles, uid, end, 40)]})
    assert first.status_code == 200, first.text
    _assert_like_window(first.json(), bundles, kit, uid, end)
    before = _hits(streaming, kit)
    for k in (1, 4, 2, 3, 1):
        end += k
        response = streaming.post("/forecast", json={"series": [_points(bundles, uid, end, k)]})
        assert response.status_code == 200, response.text
        _assert_like_window(response.json(), bundles, kit, uid, end)
    assert _hits(streaming, kit) == before + 5


def test_a_resent_window_with_new_points_at_the_end_continues_the_state(
    streaming: Any, bundles: Any, kit: ModuleType
) -> None:
    uid, end = "plant_001", 250
    assert streaming.post("/forecast", json={"series": [_points(bundles, uid, end, 30)]}).is_success
    before = _hits(streaming, kit)
    response = streaming.post("/forecast", json={"series": [_points(bundles, uid, end + 2, 30)]})
    assert response.status_code == 200, response.text
    _assert_like_window(response.json(), bundles, kit, uid, end + 2)
    assert _hits(streaming, kit) == before + 1


@pytest.mark.parametrize(
    ("shift", "label"), [(3, "gap"), (-5, "out_of_order")], ids=["gap", "out_of_order"]
)
def test_gap_or_old_points_drop_the_state(
    streaming: Any, bundles: Any, kit: ModuleType, shift: int, label: str
) -> None:
    uid, end = "plant_000", 200
    assert streaming.post("/forecast", json={"series": [_points(bundles, uid, end, 40)]}).is_success
    # Two points starting `shift` steps away from the expected next one: the state does not apply.
    late = _points(bundles, uid, end + 2 + shift, 2)
    response = streaming.post("/forecast", json={"series": [late]})
    assert response.status_code == 422, label
    assert response.json()["field"] == "series[0].values"
    # Dropped for good: even the right next point now needs the whole window.
    response = streaming.post("/forecast", json={"series": [_points(bundles, uid, end + 1, 1)]})
    assert response.status_code == 422


def test_revised_history_drops_the_state(streaming: Any, bundles: Any, kit: ModuleType) -> None:
    uid, end = "plant_001", 320
    assert streaming.post("/forecast", json={"series": [_points(bundles, uid, end, 40)]}).is_success
    revised = _points(bundles, uid, end + 1, 40)
    revised["values"][30] += 1.0  # inside the kept window
    before = _hits(streaming, kit)
    response = streaming.post("/forecast", json={"series": [revised]})
    assert response.status_code == 200, response.text
    assert _hits(streaming, kit) == before
    ds, y = bundles.history[uid]
    y = y.copy()
    y[end + 1 - 40 + 30] += 1.0
    _, point = kit.expected_forecast(bundles.champion, ds[: end + 1], y[: end + 1], uid)
    np.testing.assert_allclose(
        response.json()["forecasts"][0]["point"], point, atol=TOLERANCE * float(np.std(y))
    )


def test_a_reload_that_changes_the_model_drops_every_state(bundles: Any, tmp_path: Path) -> None:
    champion = Path(shutil.copytree(bundles.champion, tmp_path / "champion"))
    runtime = Runtime(ServingSettings(champion_bundle=champion, state_cache_size=10, device="cpu"))
    ds, y = bundles.history["plant_000"]
    request = ForecastRequest.model_validate(
        {
            "series": [
                {
                    "unique_id": "plant_000",
                    "start": format_timestamp(ds[-40]),
                    "values": y[-40:].tolist(),
                }
            ]
        }
    )
    runtime.forecast(request)
    assert len(runtime.state_cache) == 1
    assert runtime.reload() is False
    assert len(runtime.state_cache) == 1
    stat = (champion / "model.onnx").stat()
    os.utime(champion / "model.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert runtime.reload() is True
    assert len(runtime.state_cache) == 0


def _step_session(name: str, lookback: int, tmp_path: Path, **params: Any) -> Any:
    import torch

    from forecaster.export import export_onnx
    from forecaster.inference import open_session
    from forecaster.models.registry import build

    torch.manual_seed(0)
    model = build(name, input_size=1, hidden_size=8, horizon=4, **params)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, lookback=lookback, graph="step")
    return open_session(path, device="cpu")


def test_a_model_whose_memory_outlasts_the_lookback_is_not_carried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SCRN's context keeps 0.95^8 = 66% of what came before an 8-point window: a carried
    state would answer differently from the window (and from another replica), so the model is
    served from windows; a cell that forgets within its look-back is carried."""
    from serving.runtime import forgets_within_lookback

    with caplog.at_level("WARNING", logger="serving.runtime"):
        assert not forgets_within_lookback(_step_session("scrn", 8, tmp_path), 8, "champion")
    assert "champion: carried state off for this model" in caplog.text
    assert forgets_within_lookback(_step_session("scrn", 8, tmp_path, alpha=0.0), 8)
    assert forgets_within_lookback(_step_session("mi_gru", 48, tmp_path), 48)


def test_the_served_bundles_are_carried(bundles: Any) -> None:
    from serving.runtime import load_model

    model = load_model("champion", bundles.champion, device="cpu")
    assert model.carries_state  # the streaming tests above use the state cache


def test_an_overlap_with_a_gap_before_the_last_point_does_not_continue_the_state() -> None:
    """Points up to the carried last point must lie one step apart, as a whole window's must:
    `[T − 5 steps, T, T + 1]` repeating the kept values is not a continuation."""
    from serving.state import Carried, new_points

    step = 3_600 * 10**9
    last = 100 * step
    carried = Carried(
        state=np.zeros(4, np.float32), last_ns=last, tail=np.array([1.0, 2.0, 3.0, 4.0])
    )
    values = np.array([3.0, 4.0, 5.0])
    consecutive = np.array([last - step, last, last + step])
    assert new_points(carried, consecutive, values, step) == 2
    gapped = np.array([last - 5 * step, last, last + step])
    assert new_points(carried, gapped, values, step) is None


def test_a_model_that_is_not_carried_keeps_no_state_and_answers_from_windows(
    bundles: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the state cache on, a model that failed the memory probe neither fills the cache
    nor leaves the shared window path: its answer is the whole window's."""
    import serving.runtime

    monkeypatch.setattr(serving.runtime, "forgets_within_lookback", lambda *args: False)
    champion = Path(shutil.copytree(bundles.champion, tmp_path / "champion"))
    runtime = Runtime(ServingSettings(champion_bundle=champion, state_cache_size=10, device="cpu"))
    try:
        assert runtime.models.champion.carries_state is False
        ds, y = bundles.history["plant_000"]
        series = {
            "unique_id": "plant_000",
            "start": format_timestamp(ds[-40]),
            "values": y[-40:].tolist(),
        }
        first = runtime.forecast(ForecastRequest.model_validate({"series": [series]}))
        second = runtime.forecast(ForecastRequest.model_validate({"series": [series]}))
        assert len(runtime.state_cache) == 0
        assert first.forecasts[0].point == second.forecasts[0].point
    finally:
        runtime.close()
