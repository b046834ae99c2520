"""Bad input never yields a 5xx: each case gets its 4xx and names the field at fault."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.integration

Item = dict[str, Any]


def _series(item: Item, **changes: Any) -> str:
    return json.dumps({"series": [{**item, **changes}]})


def _stamps(item: Item) -> list[str]:
    return list(item["timestamps"])


def _swap(stamps: list[str], i: int, j: int) -> list[str]:
    stamps[i], stamps[j] = stamps[j], stamps[i]
    return stamps


# (case id, body from a valid timestamped item, expected status, expected field)
CASES: list[tuple[str, Callable[[Item], str], int, str]] = [
    ("not_json", lambda item: "{series: [", 422, "body"),
    ("json_list", lambda item: "[1, 2]", 422, "body"),
    ("no_series", lambda item: "{}", 422, "series"),
    ("empty_series", lambda item: '{"series": []}', 422, "series"),
    ("series_not_list", lambda item: '{"series": {"a": 1}}', 422, "series"),
    ("unknown_key", lambda item: json.dumps({"series": [item], "horizn": 3}), 422, "horizn"),
    ("horizon_zero", lambda item: json.dumps({"series": [item], "horizon": 0}), 422, "horizon"),
    ("horizon_text", lambda item: json.dumps({"series": [item], "horizon": "x"}), 422, "horizon"),
    (
        "horizon_too_large",
        lambda item: json.dumps({"series": [item], "horizon": 7}),
        422,
        "horizon",
    ),
    ("level_above_one", lambda item: json.dumps({"series": [item], "level": 1.5}), 422, "level"),
    (
        "level_not_calibrated",
        lambda item: json.dumps({"series": [item], "level": 0.5}),
        400,
        "level",
    ),
    ("empty_id", lambda item: _series(item, unique_id=""), 422, "series[0].unique_id"),
    ("unknown_id", lambda item: _series(item, unique_id="pump_7"), 422, "series[0].unique_id"),
    (
        "duplicate_id",
        lambda item: json.dumps({"series": [item, item]}),
        422,
        "series[1].unique_id",
    ),
    ("no_values", lambda item: _series(item, values=[], timestamps=[]), 422, "series[0].values"),
    (
        "too_short",
        lambda item: _series(item, values=item["values"][:10], timestamps=_stamps(item)[:10]),
        422,
        "series[0].values",
    ),
    (
        "value_text",
        lambda item: _series(item, values=[*item["values"][:-1], "high"]),
        422,
        "series[0].values[39]",
    ),
    (
        "value_nan",
        lambda item: _series(item).replace(str(item["values"][5]), "NaN", 1),
        422,
        "series[0].values[5]",
    ),
    (
        "value_infinity",
        lambda item: _series(item).replace(str(item["values"][0]), "-Infinity", 1),
        422,
        "series[0].values[0]",
    ),
    (
        "value_overflow",
        lambda item: _series(item).replace(str(item["values"][2]), "1e400", 1),
        422,
        "series[0].values[2]",
    ),
    ("neither_start_nor_timestamps", lambda item: _series(item, timestamps=None), 422, "series[0]"),
    (
        "start_and_timestamps",
        lambda item: _series(item, start=item["timestamps"][0]),
        422,
        "series[0]",
    ),
    (
        "timestamps_count",
        lambda item: _series(item, timestamps=_stamps(item)[:-1]),
        422,
        "series[0]",
    ),
    (
        "timestamp_unparsable",
        lambda item: _series(
            item, timestamps=[*_stamps(item)[:2], "yesterday", *_stamps(item)[3:]]
        ),
        422,
        "series[0].timestamps[2]",
    ),
    (
        "timestamps_unsorted",
        lambda item: _series(item, timestamps=_swap(_stamps(item), 20, 21)),
        422,
        "series[0].timestamps",
    ),
    (
        "timestamps_duplicated",
        lambda item: _series(item, timestamps=[*_stamps(item)[:31], *_stamps(item)[30:-1]]),
        422,
        "series[0].timestamps",
    ),
    (
        "timestamps_off_grid",
        lambda item: _series(
            item, timestamps=[t.replace(":00:00", ":30:00") for t in _stamps(item)]
        ),
        422,
        "series[0].timestamps",
    ),
    (
        "timestamps_gap_in_window",
        lambda item: _series(
            item, values=item["values"][:-1], timestamps=_stamps(item)[:30] + _stamps(item)[31:]
        ),
        422,
        "series[0].timestamps",
    ),
    (
        "value_overflows_model_scale",
        lambda item: _series(item, values=[1e300] * 39 + [-1e300]),
        422,
        "series[0].values",
    ),
    (
        "timestamp_out_of_range",
        lambda item: _series(item, timestamps=[*_stamps(item)[:-1], "9999-01-01T00:00:00"]),
        422,
        "series[0].timestamps[39]",
    ),
    (
        "start_out_of_range",
        lambda item: _series(item, timestamps=None, start="1200-01-01T00:00:00"),
        422,
        "series[0].start",
    ),
    (
        "start_unparsable",
        lambda item: _series(item, timestamps=None, start="soon"),
        422,
        "series[0].start",
    ),
    ("payload_too_large", lambda item: json.dumps({"series": [item] * 400}), 413, "body"),
]


@pytest.fixture(scope="module")
def item(bundles: Any, kit: ModuleType) -> Item:
    return kit.series_payload(bundles, "plant_000", 40, timestamps=True)


@pytest.mark.parametrize(
    ("builder", "status", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_4xx_naming_the_field(
    server: Any, item: Item, builder: Callable[[Item], str], status: int, field: str
) -> None:
    response = server.post(
        "/forecast", content=builder(item), headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field, body
    assert field in body["error"], body


def test_the_valid_item_itself_is_accepted(server: Any, item: Item) -> None:
    assert server.post("/forecast", json={"series": [item]}).status_code == 200


def test_more_series_than_the_limit_are_refused(
    bundles: Any, kit: ModuleType, start_server: Callable[..., Any], item: Item
) -> None:
    limited = start_server(
        kit.bundle_env(bundles.champion, bundles.fallback, FORECASTER_MAX_SERIES="1")
    )
    other = {**item, "unique_id": "plant_001"}
    response = limited.post("/forecast", json={"series": [item, other]})
    assert response.status_code == 422
    assert response.json()["field"] == "series"
    assert "limit of 1" in response.json()["error"]


def test_a_chunked_body_over_the_limit_is_413(server: Any) -> None:
    chunks = iter([b'{"series": [' + b" " * 100_000] * 3)  # no content-length: counted as read
    response = server.post(
        "/forecast", content=chunks, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["field"] == "body"
