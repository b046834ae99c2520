"""Champion → fallback on a real server: broken, missing and NaN-emitting champions, no model at
all, and hot reload under load.

One server runs on private bundle copies; each test puts the folders in the state it needs and
calls `POST /admin/reload`, so the tests do not depend on their order.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ChampionState = Literal["healthy", "corrupt", "missing", "nan_always", "nan_on_drop", "other"]


@dataclass
class Rig:
    """The server, its bundle folders and the startup observations."""

    server: Any
    champion: Path
    fallback: Path
    bundles: Any
    startup_model: dict[str, Any]
    startup_ready: tuple[int, dict[str, Any]]
    kit: ModuleType

    def set_state(
        self, champion: ChampionState, fallback: Literal["healthy", "missing"] = "healthy"
    ) -> dict[str, Any]:
        """Lay out the folders and reload; returns the reload response."""
        self._lay(
            self.champion, self.bundles.champion if champion != "other" else self.bundles.fallback
        )
        if champion == "corrupt":
            (self.champion / "model.onnx").write_bytes(b"this is not an onnx model")
        elif champion == "missing":
            shutil.rmtree(self.champion)
        elif champion in ("nan_always", "nan_on_drop"):
            self.kit.nan_model(self.champion / "model.onnx", always=champion == "nan_always")
        self._lay(self.fallback, self.bundles.fallback)
        if fallback == "missing":
            shutil.rmtree(self.fallback)
        response = self.server.post("/admin/reload")
        assert response.status_code == 200, response.text
        return response.json()

    @staticmethod
    def _lay(target: Path, source: Path) -> None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


@pytest.fixture(scope="module")
def rig(
    bundles: Any,
    kit: ModuleType,
    start_server: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Rig:
    champion, fallback = kit.copy_bundles(bundles, tmp_path_factory.mktemp("fallback"))
    (champion / "model.onnx").write_bytes(b"\x00garbage")
    server = start_server(kit.bundle_env(champion, fallback))
    ready = server.get("/readyz")
    return Rig(
        server=server,
        champion=champion,
        fallback=fallback,
        bundles=bundles,
        startup_model=server.get("/model").json(),
        startup_ready=(ready.status_code, ready.json()),
        kit=kit,
    )


def _fallback_count(rig: Rig, kit: ModuleType) -> float:
    text = rig.server.get("/metrics").text
    return sum(
        kit.metric_value(text, "forecaster_fallback_activations_total", reason=reason)
        for reason in ("champion_unavailable", "champion_failed")
    )


def _assert_fallback_answers(rig: Rig, kit: ModuleType) -> None:
    before = _fallback_count(rig, kit)
    response = rig.server.post(
        "/forecast", json={"series": [kit.series_payload(rig.bundles, "plant_000")]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "fallback"
    assert body["model_version"] == str(rig.fallback)
    ds, y = rig.bundles.history["plant_000"]
    _, point = kit.expected_forecast(rig.bundles.fallback, ds, y, "plant_000")
    (forecast,) = body["forecasts"]
    np.testing.assert_allclose(forecast["point"], point, rtol=1e-9, atol=1e-9)
    assert forecast["lower"] is None  # the fallback is uncalibrated
    assert forecast["upper"] is None
    assert _fallback_count(rig, kit) == before + 1


def test_server_started_with_a_corrupt_champion_is_degraded(rig: Rig) -> None:
    status, body = rig.startup_ready
    assert status == 200
    assert body["status"] == "degraded"
    champion = rig.startup_model["models"][0]
    assert champion["loaded"] is False
    assert "cannot load model" in champion["error"]
    assert rig.startup_model["answering"] == "fallback"


def test_corrupt_champion_fallback_answers(rig: Rig, kit: ModuleType) -> None:
    reload = rig.set_state("corrupt")
    assert reload["status"] == "degraded"
    _assert_fallback_answers(rig, kit)


def test_deleted_champion_fallback_answers(rig: Rig, kit: ModuleType) -> None:
    reload = rig.set_state("missing")
    assert "does not exist" in reload["models"][0]["error"]
    _assert_fallback_answers(rig, kit)
    assert rig.server.get("/readyz").json()["status"] == "degraded"


def test_corrupt_champion_fallback_forecasts_feed_the_anomaly_detector(
    rig: Rig, kit: ModuleType
) -> None:
    rig.set_state("corrupt")
    before = _fallback_count(rig, kit)
    item = kit.series_payload(rig.bundles, "plant_000", points=200)
    response = rig.server.post("/anomaly", json={"series": [item], "fit_size": 80})
    assert response.status_code == 200, response.text
    (result,) = response.json()["series"]
    assert result["forecaster"] == "fallback"
    assert result["model_version"] == str(rig.fallback)
    assert _fallback_count(rig, kit) == before + 1
    # The last point's expected value is the fallback's one-step forecast of it.
    ds, y = rig.bundles.history["plant_000"]
    _, point = kit.expected_forecast(rig.bundles.fallback, ds[:-1], y[:-1], "plant_000", 1)
    np.testing.assert_allclose(result["expected"][-1], point[0], rtol=1e-6)


def test_champion_emitting_nan_is_refused_at_load(rig: Rig, kit: ModuleType) -> None:
    reload = rig.set_state("nan_always")
    assert "non-finite" in reload["models"][0]["error"]
    _assert_fallback_answers(rig, kit)


def test_champion_emitting_nan_at_inference_fallback_answers(rig: Rig, kit: ModuleType) -> None:
    assert rig.set_state("nan_on_drop")["status"] == "ready"
    item = kit.series_payload(rig.bundles, "plant_000")
    drop = {**item, "values": [*item["values"][:-1], item["values"][-2] - 500.0]}
    before = _fallback_count(rig, kit)
    response = rig.server.post("/forecast", json={"series": [drop]})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "fallback"
    assert _fallback_count(rig, kit) == before + 1
    ready = rig.server.get("/readyz").json()
    assert ready["status"] == "degraded"
    assert "non-finite" in ready["detail"]
    rise = {**item, "values": [*item["values"][:-1], item["values"][-2] + 500.0]}
    assert rig.server.post("/forecast", json={"series": [rise]}).json()["model"] == "champion"
    assert rig.server.get("/readyz").json()["status"] == "ready"


def test_no_model_gives_503_and_readyz_not_ready(rig: Rig, kit: ModuleType) -> None:
    reload = rig.set_state("missing", fallback="missing")
    assert reload["status"] == "unavailable"
    response = rig.server.post(
        "/forecast", json={"series": [kit.series_payload(rig.bundles, "plant_000")]}
    )
    assert response.status_code == 503
    assert "no model is loaded" in response.json()["error"]
    ready = rig.server.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert rig.server.get("/model").json()["status"] == "unavailable"
    assert rig.server.get("/livez").status_code == 200
    item = kit.series_payload(rig.bundles, "plant_000", points=120)
    auto = rig.server.post("/anomaly", json={"series": [item], "fit_size": 60})
    assert auto.status_code == 200, auto.text
    assert auto.json()["series"][0]["forecaster"] == "detector"
    required = rig.server.post(
        "/anomaly", json={"series": [item], "fit_size": 60, "forecaster": "model"}
    )
    assert required.status_code == 503
    assert "no model is loaded" in required.json()["error"]
    assert rig.set_state("healthy")["status"] == "ready"


def test_reload_swaps_the_champion_without_dropping_requests(rig: Rig, kit: ModuleType) -> None:
    rig.set_state("healthy")
    payload = {"series": [kit.series_payload(rig.bundles, "plant_001")]}
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            statuses.append(rig.server.post("/forecast", json=payload).status_code)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    changes = [rig.set_state(state)["changed"] for state in ("other", "healthy", "other")]
    stop.set()
    for thread in threads:
        thread.join()
    assert all(changes)
    assert statuses
    assert set(statuses) == {200}
    ds, y = rig.bundles.history["plant_001"]
    _, point = kit.expected_forecast(rig.bundles.fallback, ds, y, "plant_001")
    body = rig.server.post("/forecast", json=payload).json()
    assert body["model"] == "champion"
    np.testing.assert_allclose(body["forecasts"][0]["point"], point, rtol=1e-9, atol=1e-9)
    assert rig.server.post("/admin/reload").json()["changed"] is False


def test_server_started_without_any_model_is_not_ready(
    start_server: Callable[..., Any], kit: ModuleType, tmp_path: Path, bundles: Any
) -> None:
    server = start_server(kit.bundle_env(tmp_path / "gone", tmp_path / "also_gone"))
    ready = server.get("/readyz")
    assert ready.status_code == 503
    assert "no model is loaded" in ready.json()["detail"]
    response = server.post("/forecast", json={"series": [kit.series_payload(bundles, "plant_000")]})
    assert response.status_code == 503
    assert response.json()["error"].startswith("no model is loaded")


def test_a_bundle_swapped_while_it_loads_is_read_again_whole(
    bundles: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served folder is replaced (as `forecaster train` replaces a bundle) between reading
    its metadata and its preprocessing: the model loaded is the new bundle throughout, never
    the old metadata with the new graph or calibration."""
    import serving.runtime
    from forecaster.files import replace_dir
    from serving.runtime import _fingerprint, load_model

    served = Path(shutil.copytree(bundles.champion, tmp_path / "served"))  # feedback, calibrated
    new = Path(shutil.copytree(bundles.fallback, tmp_path / ".new"))  # bptt, uncalibrated
    real_load = serving.runtime.PreprocessingSpec.load
    swaps = []

    def swap_then_load(path: Path) -> Any:
        if not swaps:
            swaps.append(replace_dir(new, served))
        return real_load(path)

    monkeypatch.setattr(serving.runtime.PreprocessingSpec, "load", staticmethod(swap_then_load))
    model = load_model("champion", served, device="cpu")
    assert swaps == [served]
    assert model.metadata.training_method == "bptt"
    assert model.calibration is None
    assert model.fingerprint == _fingerprint(served)
