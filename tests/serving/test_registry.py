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
