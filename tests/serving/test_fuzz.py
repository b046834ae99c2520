"""Schemathesis over the live `/docs.json`: generated requests, valid and invalid, never get a 5xx.

Hypothesis runs inside the test against the module's real server: at least 500 requests in all,
half of them built to violate the schema (negative mode).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIN_REQUESTS = 500
# (path, method, examples per generation mode)
PLAN = [
    ("/forecast", "POST", 300),
    ("/anomaly", "POST", 60),
    ("/model", "GET", 10),
    ("/admin/reload", "POST", 10),
    ("/readyz", "GET", 5),
    ("/livez", "GET", 5),
    ("/metrics", "GET", 5),
]


@pytest.fixture(scope="module")
def fuzzed(bundles: Any, kit: ModuleType, start_server: Callable[..., Any]) -> Any:
    return start_server(
        kit.bundle_env(bundles.champion, bundles.fallback, FORECASTER_MAX_PAYLOAD_BYTES="65536")
    )


def _fuzz(
    strategy: Any, examples: int, url: str, statuses: Counter[int], failures: list[str]
) -> None:
    """Send `examples` generated cases; record every status and every 5xx."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def call(case: Any) -> None:
        response = case.call(base_url=url, timeout=30)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.body!r:.300}: {response.text:.300}")

    # An operation without parameters runs out of distinct inputs at once.
    with contextlib.suppress(Unsatisfiable):
        call()


def test_generated_requests_never_get_a_5xx(fuzzed: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/docs.json")
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for path, method, examples in PLAN:
        operation = schema[path][method]
        _fuzz(operation.as_strategy(), examples, fuzzed.url, statuses, failures)
        if operation.body or operation.query:  # only operations with inputs have negative cases
            negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            _fuzz(negative, examples, fuzzed.url, statuses, failures)
    total = sum(statuses.values())
    assert not failures, failures[:5]
    assert total >= MIN_REQUESTS, dict(statuses)
    assert statuses[200] > 0, dict(statuses)
    assert statuses[422] > 0, dict(statuses)
