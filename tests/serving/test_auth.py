"""Bearer-token auth (`FORECASTER_API_TOKEN`) on a real server: API closed, probes open."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(bundles: Any, kit: ModuleType, start_server: Callable[..., Any]) -> Any:
    return start_server(
        kit.bundle_env(bundles.champion, bundles.fallback, FORECASTER_API_TOKEN=TOKEN)
    )


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
    ids=["none", "wrong", "no_scheme", "basic"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/forecast"), ("get", "/model"), ("post", "/admin/reload")],
)
def test_missing_or_wrong_token_is_401(
    guarded: Any, headers: dict[str, str], method: str, path: str
) -> None:
    response = getattr(guarded, method)(path, headers=headers)
    assert response.status_code == 401
    assert response.json()["field"] == "Authorization"
    assert response.headers["www-authenticate"] == "Bearer"


def test_right_token_is_served(guarded: Any, bundles: Any, kit: ModuleType) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    payload = {"series": [kit.series_payload(bundles, "plant_000")]}
    response = guarded.post("/forecast", json=payload, headers=headers)
    assert response.status_code == 200, response.text
    assert guarded.get("/model", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/readyz", "/metrics", "/docs.json"])
def test_health_metrics_and_docs_stay_open(guarded: Any, path: str) -> None:
    assert guarded.get(path).status_code == 200
