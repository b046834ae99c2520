"""Models from the MLflow registry aliases, served through `forecaster serve`'s launcher.

Both tiny models are logged and registered in an embedded (sqlite) MLflow store beside a job
config; `serving.launch.serve(config)` starts the real server, which downloads `@champion` and
`@fallback` once; a promotion followed by `POST /admin/reload` swaps the champion.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

from forecaster.config import load_config
from serving.launch import settings_for_config

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Registry:
    config_path: Path
    uri: str
    name: str


@pytest.fixture(scope="module")
def registry(bundles: Any, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from pipelines.tracking import CHAMPION, FALLBACK, open_tracking

    folder = tmp_path_factory.mktemp("registry")
    raw = bundles.config.model_dump(mode="json")
    raw["output_dir"] = str(folder / "out")
    config_path = folder / "job.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    tracking = open_tracking(config)
    horizon = config.window.horizon
    with tracking.start_retrain("serving-test") as run:
        for method, alias in (("feedback", CHAMPION), ("bptt", FALLBACK)):
            outcome = bundles.outcomes[method]
            logged = run.log_training(
                run.child(method), config, bundles.prepared, outcome, role=method
            )
            run.register_and_promote(logged, alias, bundles.prepared, horizon)
    return Registry(config_path=config_path, uri=tracking.uri, name=config.name)


@pytest.fixture(scope="module")
def launched(registry: Registry, start_server: Callable[..., Any]) -> Any:
    code = (
        "import sys; from pathlib import Path; from serving.launch import serve; "
        f"sys.exit(serve(Path({str(registry.config_path)!r}), port=int(sys.argv[1])))"
    )
    return start_server({}, command=[sys.executable, "-c", code])


def test_settings_for_a_config_use_the_registry_of_its_embedded_store(registry: Registry) -> None:
    settings = settings_for_config(registry.config_path, environ={})
    assert settings.source == "registry"
    assert settings.model_name == registry.name
    assert settings.tracking_uri == registry.uri
    bundled = settings_for_config(registry.config_path, bundle=[Path("a")], environ={})
    assert bundled.source == "bundles"
    assert bundled.champion_bundle == Path("a").resolve()


def test_served_models_are_the_alias_holders(launched: Any, registry: Registry) -> None:
    body = launched.get("/model").json()
    assert body["status"] == "ready"
    champion, fallback = body["models"]
    assert champion["source"] == f"models:/{registry.name}/{champion['version']}"
    assert champion["training_method"] == "feedback"
    assert champion["calibrated"] is True
    assert fallback["training_method"] == "bptt"
    assert fallback["version"] != champion["version"]


def test_registry_champion_answers_like_the_local_bundle(
    launched: Any, bundles: Any, kit: ModuleType
) -> None:
    response = launched.post(
        "/forecast", json={"series": [kit.series_payload(bundles, "plant_001")]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "champion"
    ds, y = bundles.history["plant_001"]
    _, point = kit.expected_forecast(bundles.champion, ds, y, "plant_001")
    np.testing.assert_allclose(body["forecasts"][0]["point"], point, rtol=1e-6, atol=1e-6)
    assert body["forecasts"][0]["lower"] is not None


def test_reload_picks_up_a_newly_promoted_champion(
    launched: Any, registry: Registry, bundles: Any, kit: ModuleType
) -> None:
    from pipelines.tracking import promote

    versions = {m["role"]: m["version"] for m in launched.get("/model").json()["models"]}
    assert launched.post("/admin/reload").json()["changed"] is False
    promote(registry.name, versions["fallback"], "champion", uri=registry.uri)
    reload = launched.post("/admin/reload").json()
    assert reload["changed"] is True
    assert reload["models"][0]["version"] == versions["fallback"]
    body = launched.post(
        "/forecast", json={"series": [kit.series_payload(bundles, "plant_000")]}
    ).json()
    ds, y = bundles.history["plant_000"]
    _, point = kit.expected_forecast(bundles.fallback, ds, y, "plant_000")
    assert body["model"] == "champion"
    assert body["model_version"] == f"models:/{registry.name}/{versions['fallback']}"
    np.testing.assert_allclose(body["forecasts"][0]["point"], point, rtol=1e-6, atol=1e-6)


def test_reload_during_a_registry_outage_keeps_the_loaded_models(
    registry: Registry,
    bundles: Any,
    kit: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry unreachable at a reload (its lookup raises as a dropped connection does):
    each role keeps the model it had, carried states included, and the status and `/model`'s
    infos say why it was not refreshed; a runtime started during the outage has no model."""
    from mlflow import MlflowClient

    from forecaster.errors import ModelUnavailable
    from serving.runtime import Runtime
    from serving.schemas import ForecastRequest
    from serving.settings import ServingSettings

    settings = ServingSettings(
        model_name=registry.name,
        tracking_uri=registry.uri,
        download_dir=tmp_path,
        device="cpu",
        state_cache_size=8,
    )
    request = ForecastRequest.model_validate({"series": [kit.series_payload(bundles, "plant_000")]})
    runtime = Runtime(settings)
    try:
        before = runtime.forecast(request)
        assert runtime.status()[0] == "ready"
        models = runtime.models
        assert len(runtime.state_cache) == 1

        def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): Max retries")

        with monkeypatch.context() as outage:
            outage.setattr(MlflowClient, "get_model_version_by_alias", unreachable)
            assert runtime.reload() is False
            assert runtime.models.champion is models.champion
            assert runtime.models.fallback is models.fallback
            assert len(runtime.state_cache) == 1
            status, detail = runtime.status()
            assert status == "ready"
            for role in ("champion", "fallback"):
                assert f"{role} kept, the last reload could not refresh it" in detail
            assert "Max retries" in detail
            for info in runtime.models.infos():
                assert info.loaded is True
                assert "could not refresh it" in (info.error or "")
                assert "Max retries" in (info.error or "")
            after = runtime.forecast(request)
            assert after.model == "champion"
            assert after.model_version == before.model_version
            np.testing.assert_allclose(
                after.forecasts[0].point, before.forecasts[0].point, rtol=1e-4, atol=1e-4
            )
            fresh = Runtime(settings)  # no model held before the outage: the roles fail
            try:
                assert fresh.status()[0] == "unavailable"
                assert "Max retries" in fresh.status()[1]
                with pytest.raises(ModelUnavailable, match="no model is loaded"):
                    fresh.forecast(request)
            finally:
                fresh.close()
        assert runtime.reload() is False  # the registry is back, the versions unchanged
        status, detail = runtime.status()
        assert status == "ready"
        assert "could not refresh" not in detail
        assert all(info.error is None for info in runtime.models.infos())
    finally:
        runtime.close()


@pytest.mark.parametrize(
    "scheme",
    [
        "postgresql://mlflow:hunter2-pw@127.0.0.1:{port}/mlflow",
        "https://ci:hunter2-pw@127.0.0.1:{port}/",
    ],
)
def test_a_registry_failure_names_the_uri_without_its_credentials(
    scheme: str, tmp_path: Path, kit: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forecaster.errors import ModelUnavailable
    from serving.registry import fetch_alias

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = scheme.format(port=kit.free_port())  # nothing listens there
    with pytest.raises(ModelUnavailable) as caught:
        fetch_alias(uri, "demo", "champion", tmp_path)
    message = caught.value.message
    assert "hunter2" not in message
    assert message.startswith(f"models:/demo@champion at {uri.replace('hunter2-pw', '***')}: ")


def _download_then(monkeypatch: pytest.MonkeyPatch, after: Callable[[Path], None]) -> list[Path]:
    """Patch MLflow's download so that `after(staging)` runs once each download is complete;
    the staging folders used, in call order."""
    import mlflow.artifacts

    real = mlflow.artifacts.download_artifacts
    staged: list[Path] = []

    def download(*args: Any, dst_path: str, **kwargs: Any) -> str:
        answer = real(*args, dst_path=dst_path, **kwargs)
        staged.append(Path(dst_path))
        after(Path(dst_path))
        return str(answer)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    return staged


def test_a_version_another_process_downloaded_meanwhile_is_used(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second replica sharing the download folder renames its copy of the version into place
    between this one's check and its rename: this one uses that copy and drops its own."""
    import shutil

    from mlflow import MlflowClient

    from serving.registry import fetch_alias

    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    version = client.get_model_version_by_alias(registry.name, "champion").version
    target = tmp_path / registry.name / f"v{version}"
    staged = _download_then(monkeypatch, lambda staging: shutil.copytree(staging, target))
    fetched = fetch_alias(registry.uri, registry.name, "champion", tmp_path)
    assert len(staged) == 1
    assert not staged[0].exists()
    assert fetched.folder.is_relative_to(target)
    assert (fetched.folder / "model.onnx").is_file()
    assert [p.name for p in (tmp_path / registry.name).iterdir()] == [f"v{version}"]


def test_two_concurrent_downloads_into_one_folder_both_succeed(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas (threads here) both find the version missing and download it; whichever
    renames second uses the first one's folder."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serving.registry import fetch_alias

    both_downloaded = threading.Barrier(2, timeout=60)
    staged = _download_then(monkeypatch, lambda staging: both_downloaded.wait())
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(fetch_alias, registry.uri, registry.name, "champion", tmp_path)
            for _ in range(2)
        ]
        first, second = (future.result(timeout=120) for future in futures)
    assert len(staged) == 2
    assert first.folder == second.folder
    assert (first.folder / "model.onnx").is_file()
    assert len(list((tmp_path / registry.name).iterdir())) == 1
