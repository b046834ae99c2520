"""Bearer-token auth (`FORECASTER_API_TOKEN`) on a real server: API closed, probes open; the
gateway's token comparison and the open `/readyz`'s redaction of the tracking URI in process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import httpx
import pytest

from serving.gateway import Gateway, GatewayState
from serving.settings import ServingSettings

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


# In process: the gateway alone, in front of an app that answers 200 once a request is let in.


async def _reached(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"reached the app"})


def _gateway_call(
    env: dict[str, str],
    method: str,
    path: str,
    headers: dict[str, bytes] | None = None,
    readiness: tuple[str, str] = ("ready", "champion answers"),
) -> httpx.Response:
    """One request through `Gateway` configured by the `FORECASTER_*` variables `env`."""
    source = {} if "FORECASTER_MODEL_NAME" in env else {"FORECASTER_CHAMPION_BUNDLE": "unused"}
    settings = ServingSettings.from_env({**source, **env})
    state = GatewayState(settings=settings, readiness=lambda: readiness)
    gateway = Gateway(_reached, state=lambda: state)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=gateway)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(call())


@pytest.mark.parametrize("configured", ["s3cret-token\n", " s3cret-token\r\n", "\ts3cret-token"])
def test_a_token_with_surrounding_whitespace_is_stripped(configured: str) -> None:
    env = {"FORECASTER_API_TOKEN": configured}
    right = _gateway_call(env, "POST", "/admin/reload", {"Authorization": b"Bearer s3cret-token"})
    assert right.status_code == 200, right.text
    wrong = _gateway_call(env, "POST", "/admin/reload", {"Authorization": b"Bearer s3cret"})
    assert wrong.status_code == 401


def test_a_non_ascii_token_matches_its_utf8_bytes() -> None:
    env = {"FORECASTER_API_TOKEN": "pässwörd-токен"}
    header = "Bearer pässwörd-токен".encode()
    assert _gateway_call(env, "GET", "/model", {"Authorization": header}).status_code == 200
    for wrong in ("Bearer passwort-токен".encode(), "Bearer pässwörd".encode("latin-1")):
        response = _gateway_call(env, "GET", "/model", {"Authorization": wrong})
        assert response.status_code == 401
        assert response.json()["field"] == "Authorization"


def test_a_blank_token_refuses_every_request_but_the_probes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"FORECASTER_API_TOKEN": " \n"}
    with caplog.at_level(logging.ERROR, logger="serving.gateway"):
        for header in (b"Bearer ", b"Bearer  \n", b"Bearer"):
            response = _gateway_call(env, "GET", "/model", {"Authorization": header})
            assert response.status_code == 401
        assert _gateway_call(env, "GET", "/model").status_code == 401
    assert _gateway_call(env, "GET", "/readyz").status_code == 200
    assert "FORECASTER_API_TOKEN is blank" in caplog.text


@pytest.mark.parametrize(
    ("uri", "secret", "shown"),
    [
        (
            "postgresql://mlflow:hunter2@db.internal/mlflow",
            "hunter2",
            "postgresql://mlflow:***@db.internal/mlflow",
        ),
        ("https://ci:tok3n-xyz@mlflow.internal", "tok3n-xyz", "https://ci:***@mlflow.internal"),
        ("https://tok3n-xyz@mlflow.internal", "tok3n-xyz", "https://***@mlflow.internal"),
    ],
    ids=["postgresql", "user_token", "token"],
)
def test_the_open_readiness_probe_redacts_the_tracking_uri(
    uri: str, secret: str, shown: str
) -> None:
    env = {
        "FORECASTER_MODEL_NAME": "demo",
        "MLFLOW_TRACKING_URI": uri,
        "FORECASTER_API_TOKEN": TOKEN,
    }
    detail = f"no model is loaded: champion: models:/demo@champion at {uri}: refused ({secret})"
    response = _gateway_call(env, "GET", "/readyz", readiness=("unavailable", detail))
    assert response.status_code == 503
    assert secret not in response.text
    assert shown in response.json()["detail"]


def test_registry_credentials_reach_no_answer_nor_log(
    start_server: Callable[..., Any], bundles: Any, kit: ModuleType
) -> None:
    """A real server whose registry is unreachable at a URI with a password: `/readyz` (open)
    and the 503 of `/forecast` name the URI with the password redacted, and so does the log."""
    uri = f"https://mlflow:hunter2-secret@127.0.0.1:{kit.free_port()}/"  # nothing listens
    server = start_server(
        {
            "FORECASTER_MODEL_NAME": "demo",
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "FORECASTER_API_TOKEN": TOKEN,
        }
    )
    ready = server.get("/readyz")
    assert ready.status_code == 503
    assert "hunter2" not in ready.text
    assert "https://mlflow:***@127.0.0.1" in ready.json()["detail"]
    forecast = server.post(
        "/forecast",
        json={"series": [kit.series_payload(bundles, "plant_000")]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert forecast.status_code == 503
    assert "hunter2" not in forecast.text
    assert "mlflow:***@" in forecast.text
    assert "hunter2" not in server.log.read_text()


def test_a_refusal_has_the_documented_error_body() -> None:
    response = _gateway_call({"FORECASTER_API_TOKEN": TOKEN}, "GET", "/model")
    assert response.status_code == 401
    assert set(response.json()) == {"error", "field", "detail"}
    assert response.json()["field"] == "Authorization"
