"""Cross-request micro-batching and the CUDA/CPU session choice, in process on the tiny bundles.

Batched answers must equal lone answers exactly; a bad row must only send its own request to the
fallback; an error of a shared call reaches every request in it.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from forecaster.inference import forecast_window, open_session
from serving.batching import MicroBatcher
from serving.runtime import Role, Runtime, load_model, prefer_cpu
from serving.schemas import ForecastRequest
from serving.settings import ServingSettings


class _Counts:
    """An observer that remembers what the runtime reported."""

    def __init__(self) -> None:
        self.fallbacks: list[str] = []
        self.calls: list[Role] = []

    def fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)

    def inference(self, role: Role, seconds: float) -> None:
        self.calls.append(role)

    def carried(self, hits: int, misses: int) -> None:
        return None


def _runtime(champion: Path, fallback: Path, **settings: Any) -> Runtime:
    return Runtime(
        ServingSettings(
            champion_bundle=champion, fallback_bundle=fallback, device="cpu", **settings
        ),
        observer=_Counts(),
    )


def _requests(bundles: Any, kit: ModuleType) -> list[ForecastRequest]:
    """Six different requests: lengths, timestamps or start, horizons, levels, one or two series."""
    item = kit.series_payload
    payloads = [
        {"series": [item(bundles, "plant_000")]},
        {"series": [item(bundles, "plant_001", 30, timestamps=True)], "horizon": 3},
        {"series": [item(bundles, "plant_000", 90), item(bundles, "plant_001")], "level": 0.8},
        {"series": [item(bundles, "plant_001", 25)], "horizon": 1},
        {"series": [item(bundles, "plant_000", 40, timestamps=True)], "horizon": 6},
        {"series": [item(bundles, "plant_001", 200), item(bundles, "plant_000", 26)]},
    ]
    return [ForecastRequest.model_validate(p) for p in payloads]


def _concurrently(call: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """`call(item)` for every item, all threads released at once; results in order."""
    results: list[Any] = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = call(items[i])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_requests_share_calls_and_get_exactly_the_lone_answers(
    bundles: Any, kit: ModuleType
) -> None:
    requests = _requests(bundles, kit)
    alone = _runtime(bundles.champion, bundles.fallback, batch_max_rows=0)
    expected = [alone.forecast(r).model_dump_json() for r in requests]
    assert alone.batcher.calls == 0  # batching off: every request ran its own call
    assert asyncio.run(alone.forecast_async(requests[2])).model_dump_json() == expected[2]
    shared = _runtime(bundles.champion, bundles.fallback, batch_max_wait_ms=100)
    try:
        answers = _concurrently(shared.forecast, requests)
        assert [a.model_dump_json() for a in answers] == expected
        assert shared.batcher.calls < len(requests)
        calls_before = shared.batcher.calls

        async def gathered() -> list[Any]:
            return await asyncio.gather(*(shared.forecast_async(r) for r in requests))

        answers = asyncio.run(gathered())
        assert [a.model_dump_json() for a in answers] == expected
        assert shared.batcher.calls - calls_before < len(requests)
    finally:
        shared.close()


@pytest.mark.integration
def test_concurrent_http_requests_get_the_answers_of_sequential_ones(
    server: Any, bundles: Any, kit: ModuleType
) -> None:
    payloads = [r.model_dump(mode="json", exclude_none=True) for r in _requests(bundles, kit)]
    expected = [server.post("/forecast", json=p).json() for p in payloads]
    answers = _concurrently(lambda p: server.post("/forecast", json=p), payloads * 2)
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert [a.json() for a in answers] == expected * 2


def test_a_non_finite_row_sends_only_its_own_request_to_the_fallback(
    bundles: Any, kit: ModuleType, tmp_path: Path
) -> None:
    champion = Path(shutil.copytree(bundles.champion, tmp_path / "champion"))
    kit.nan_model(champion / "model.onnx", always=False)  # NaN when the last input is negative
    item = kit.series_payload(bundles, "plant_000")
    drop = {**item, "values": [*item["values"][:-1], item["values"][-2] - 500.0]}
    rise = {**item, "values": [*item["values"][:-1], item["values"][-2] + 500.0]}
    other = kit.series_payload(bundles, "plant_001")
    other = {**other, "values": [*other["values"][:-1], other["values"][-2] + 500.0]}
    payloads = [{"series": [rise]}, {"series": [drop]}, {"series": [other]}, {"series": [rise]}]
    requests = [ForecastRequest.model_validate(p) for p in payloads]
    runtime = _runtime(champion, bundles.fallback, batch_max_wait_ms=100)
    try:
        answers = _concurrently(runtime.forecast, requests)
        assert [a.model for a in answers] == ["champion", "fallback", "champion", "champion"]
        assert runtime.batcher.calls < len(requests) + 1  # the fallback's call is one more
        assert runtime.observer.fallbacks == ["champion_failed"]  # type: ignore[attr-defined]
        fallback_alone = _runtime(bundles.fallback, bundles.fallback, batch_max_rows=0)
        assert answers[1].forecasts == fallback_alone.forecast(requests[1]).forecasts
    finally:
        runtime.close()


def _session(bundles: Any) -> Any:
    return open_session(bundles.champion / "model.onnx", device="cpu", intra_op_threads=1)


def test_an_error_in_a_shared_call_reaches_every_request_in_it(bundles: Any) -> None:
    session = _session(bundles)

    def refuses_nan(key: Any, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if np.isnan(x).any():
            raise RuntimeError("input holds NaN")
        return forecast_window(key, x)

    batcher = MicroBatcher(max_rows=64, max_wait_s=2.0, run=refuses_nan)
    good = np.zeros((1, 24, 1), dtype=np.float32)
    bad = np.full((1, 24, 1), np.nan, dtype=np.float32)
    outcomes: list[str] = [""] * 3

    def submit(i: int, x: npt.NDArray[np.float32]) -> None:
        try:
            batcher.forecast(session, x)
            outcomes[i] = "ok"
        except RuntimeError as exc:
            outcomes[i] = str(exc)

    with batcher.arriving(), batcher.arriving():  # the worker waits for both of these
        threads = [threading.Thread(target=submit, args=(0, good))]
        threads[0].start()
        time.sleep(0.05)
        threads += [
            threading.Thread(target=submit, args=(1, bad)),
            threading.Thread(target=submit, args=(2, good)),
        ]
        for thread in threads[1:]:
            thread.start()
        time.sleep(0.3)  # all three queued; leaving the block lets the worker run them
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert batcher.calls == 1
        assert outcomes == ["input holds NaN"] * 3
        assert batcher.forecast(session, good)[0].shape == (1, 6)  # the worker carries on
    finally:
        batcher.close()


def test_a_lone_request_never_waits_and_a_missing_arrival_waits_at_most_max_wait(
    bundles: Any,
) -> None:
    session = _session(bundles)
    x = np.zeros((2, 24, 1), dtype=np.float32)
    batcher = MicroBatcher(max_rows=64, max_wait_s=1.0)
    try:
        started = time.perf_counter()
        z, seconds = batcher.forecast(session, x)
        assert time.perf_counter() - started < 0.5  # nobody else arriving: no wait
        assert z.shape == (2, 6)
        assert 0 < seconds < 0.5
        np.testing.assert_array_equal(z, forecast_window(session, x))
        with batcher.arriving():  # announced but never sent
            started = time.perf_counter()
            batcher.forecast(session, x)
            waited = time.perf_counter() - started
        assert 0.9 <= waited < 10
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.forecast(session, x)


def test_a_caller_gone_with_its_event_loop_does_not_stop_the_worker(bundles: Any) -> None:
    session = _session(bundles)
    x = np.zeros((1, 24, 1), dtype=np.float32)
    batcher = MicroBatcher(max_rows=64, max_wait_s=5.0)

    async def impatient() -> None:
        await asyncio.wait_for(batcher.forecast_async(session, x), timeout=0.05)

    try:
        # The open arrival holds the job in the worker until the loop is gone.
        with batcher.arriving(), pytest.raises(TimeoutError):
            asyncio.run(impatient())
        time.sleep(0.3)  # the orphan job runs alone; its caller's loop is closed
        later = _concurrently(lambda _: batcher.forecast(session, x), [None])  # joins in 60 s
        assert later != [None], "the worker died with the orphan job"
        np.testing.assert_array_equal(later[0][0], forecast_window(session, x))
        assert batcher.calls == 2
    finally:
        batcher.close()


def test_large_requests_and_disabled_batching_run_alone(bundles: Any) -> None:
    session = _session(bundles)
    batcher = MicroBatcher(max_rows=4, max_wait_s=0.0)
    z, _ = batcher.forecast(session, np.zeros((4, 24, 1), dtype=np.float32))
    assert z.shape == (4, 6)
    assert batcher.calls == 0  # as many rows as max_rows: its own call, in the caller
    batcher.forecast(session, np.zeros((3, 24, 1), dtype=np.float32))
    assert batcher.calls == 1
    batcher.close()
    off = MicroBatcher(max_rows=0, max_wait_s=0.001)
    assert not off.enabled
    off.forecast(session, np.zeros((1, 24, 1), dtype=np.float32))
    assert off.calls == 0


@pytest.mark.parametrize(
    ("providers", "rows", "threshold", "cpu"),
    [
        (["CUDAExecutionProvider", "CPUExecutionProvider"], 1, 64, True),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], 63, 64, True),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], 64, 64, False),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], 1, 0, False),
        (["CPUExecutionProvider"], 1, 64, False),
        ([], 1, 64, False),
    ],
)
def test_small_calls_prefer_the_cpu_only_when_the_model_runs_on_cuda(
    providers: list[str], rows: int, threshold: int, cpu: bool
) -> None:
    assert prefer_cpu(providers, rows, threshold) is cpu


def test_a_cpu_model_opens_no_second_session(bundles: Any) -> None:
    model = load_model("champion", bundles.champion, device="cpu", cuda_min_rows=64)
    assert model.cpu_window is None
    assert model.window_for(1) is model.window
