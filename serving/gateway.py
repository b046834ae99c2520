"""The ASGI layer in front of every route: bearer auth, the payload limit, `/readyz`, counting.

Pure ASGI (no framework), so it also guards BentoML's own routes. It asks `state()` for the
running service's settings and readiness; before the service instance exists it answers 503.
The bearer token is compared as UTF-8 bytes in constant time, the configured one stripped of
surrounding whitespace (a secret mounted from a file often ends with a newline); one that is
blank once stripped refuses every request. `/readyz` is open: its detail is shown with the
tracking URI's credentials redacted.
The hot routes the state names (`POST /forecast`) are answered here from the body already read,
skipping the framework's routing, dependency and thread-pool layers (together about a third of
a one-series request's server time when measured).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from forecaster.redaction import redact
from serving.settings import ENV_NAMES, ServingSettings

logger = logging.getLogger(__name__)

__all__ = ["OPEN_PATHS", "Gateway", "GatewayState", "Handler"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Handler = Callable[[bytes], Awaitable[ASGIApp]]  # request body -> the response to send

# Probes, metrics scraping and the API description stay reachable without a token.
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/docs.json", "/"})
_OPEN_PREFIXES = ("/static_content/",)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class GatewayState:
    """What the gateway needs from the running service."""

    settings: ServingSettings
    readiness: Callable[[], tuple[str, str]]
    routes: Mapping[tuple[str, str], Handler] = field(default_factory=dict)  # (method, path)


class Gateway:
    """ASGI middleware; `on_response(path_label, status)` counts every answered request.

    Args:
        app: the wrapped application.
        state: returns the service's `GatewayState`, or None while it is starting.
        endpoints: paths counted under their own label; others count as `other`.
        on_response: called once per HTTP response.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: Callable[[], GatewayState | None],
        endpoints: frozenset[str] = frozenset(),
        on_response: Callable[[str, int], None] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.endpoints = endpoints
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in self.endpoints else "other"

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.on_response is not None:
                self.on_response(label, int(message["status"]))
            await send(message)

        state = self.state()
        if state is None:
            await _json(
                counted_send,
                503,
                {
                    "error": "the service is starting",
                    "field": None,
                    "detail": "retry in a few seconds",
                },
            )
            return
        if path == "/docs.json":
            await self.app(scope, receive, _openapi_31(counted_send))
            return
        if path == "/readyz":
            status, detail = state.readiness()
            code = 503 if status == "unavailable" else 200
            detail = redact(detail, state.settings.tracking_uri)
            await _json(counted_send, code, {"status": status, "detail": detail})
            return
        token = state.settings.api_token
        secret = token.get_secret_value() if token is not None else None
        if secret is not None and not _is_open(path) and not _authorised(scope, secret):
            await _json(
                counted_send,
                401,
                {
                    "error": "missing or invalid bearer token",
                    "field": "Authorization",
                    "detail": "send the header 'Authorization: Bearer <FORECASTER_API_TOKEN>'",
                },
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        if scope.get("method") in _BODY_METHODS:
            limit = state.settings.max_payload_bytes
            body = await _read_body(scope, receive, limit)
            if body is None:
                await _json(
                    counted_send,
                    413,
                    {
                        "error": f"request body exceeds the limit of {limit} bytes",
                        "field": "body",
                        "detail": "send fewer or shorter series per request",
                    },
                )
                return
            handler = state.routes.get((scope["method"], path))
            if handler is not None:
                response = await handler(body)
                await response(scope, receive, counted_send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, counted_send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


def _authorised(scope: Scope, token: str) -> bool:
    """Whether the first `Authorization` header is `Bearer <token>` (the header's bytes against
    the configured token's UTF-8 bytes, stripped, in constant time)."""
    expected = _expected_token(token)
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = bytes(value).partition(b" ")
            return (
                expected is not None
                and scheme.lower() == b"bearer"
                and hmac.compare_digest(given.strip(), expected)
            )
    return False


@functools.lru_cache(maxsize=4)
def _expected_token(token: str) -> bytes | None:
    """The configured token's UTF-8 bytes without surrounding whitespace; None (every request
    refused) when nothing else is left."""
    stripped = token.strip()
    if not stripped:
        logger.error(
            "%s is blank once stripped of whitespace: every request but the probes gets 401; "
            "set a token or leave the variable unset for no auth",
            ENV_NAMES["api_token"],
        )
        return None
    return stripped.encode("utf-8")


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit` bytes."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _openapi_31(send: Send) -> Send:
    """Relabel BentoML's document as OpenAPI 3.1: FastAPI writes the route schemas in 3.1
    (`{"type": "null"}` members, `examples` lists), which a 3.0 reader rejects."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def patched(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False) or start is None:
            return
        body = b"".join(chunks)
        if start["status"] == 200:
            document = json.loads(body)
            document["openapi"] = "3.1.0"
            body = json.dumps(document).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return patched


async def _json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
