"""Cross-request micro-batching: concurrent requests share one ONNX Runtime call.

A GRU's ORT call costs far less than linearly in its batch (L = 336, hidden 64, one thread:
1 series 2.7 ms, 8 series 4.2 ms), so concurrent requests queue their model inputs and one
worker thread runs what is waiting as one call, then hands each request its rows. The worker
takes every job queued for the same session (up to `max_rows` rows) and, while other requests
are still being prepared (`arriving`), waits up to `max_wait_s` for them; alone, a request runs
at once. A request with `max_rows` rows or more runs in its own thread, unqueued. Callers wait
on a thread event (`forecast`) or, from an event loop, on an asyncio future (`forecast_async`).

When the shared call raises, every request in it gets the error (and falls back on its own);
a non-finite output row is the concern of the request it belongs to only (the runtime checks
each request's rows).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from forecaster.inference import forecast_window

__all__ = ["Arrival", "MicroBatcher"]

Forecast = Callable[[Any, npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class Arrival:
    """One request's `MicroBatcher.arriving` mark; `settle` ends it (once)."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self.active = True

    def settle(self) -> None:
        """The request will queue no rows: the worker stops waiting for it."""
        if self.active:
            self._batcher._settle(self)


@dataclass(eq=False)
class _Job:
    session: Any
    x: npt.NDArray[np.float32]  # [n, T, d]
    done: threading.Event = field(default_factory=threading.Event)
    result: npt.NDArray[np.float32] | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    future: asyncio.Future[None] | None = None  # set for a caller on an event loop

    def matches(self, other: _Job) -> bool:
        return self.session is other.session and self.x.shape[1:] == other.x.shape[1:]

    def complete(self) -> None:
        """Wake the caller (its thread, or its event loop)."""
        future = self.future
        if future is None:
            self.done.set()
            return
        with suppress(RuntimeError):  # its loop has closed: nobody waits any more
            future.get_loop().call_soon_threadsafe(_resolve, future)

    def outcome(self) -> tuple[npt.NDArray[np.float32], float]:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result, self.seconds


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(None)


class MicroBatcher:
    """Runs the window forecasts of concurrent requests as shared ORT calls.

    Args:
        max_rows: most rows (series) in one shared call; 0 turns batching off (every request
            runs its own call in its own thread).
        max_wait_s: how long the worker waits for requests still being prepared.
        run: the forecast call, `forecast_window` (`session, x [B, T, d] -> [B, H]`).
    """

    def __init__(self, max_rows: int, max_wait_s: float, run: Forecast = forecast_window) -> None:
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.calls = 0  # shared calls run by the worker, for tests and diagnostics
        self._run = run
        self._queue: deque[_Job] = deque()
        self._arriving = 0
        self._gathering = False  # the worker holds jobs and waits for arrivals
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        """Whether requests are batched at all."""
        return self.max_rows > 0

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Marks a request being prepared: the worker may wait (`max_wait_s`) for its rows.
        The mark ends at its first `forecast` call or when the block exits."""
        token = Arrival(self)
        with self._cond:
            self._arriving += 1
        try:
            yield token
        finally:
            token.settle()

    def forecast(
        self, session: Any, x: npt.NDArray[np.float32], arrival: Arrival | None = None
    ) -> tuple[npt.NDArray[np.float32], float]:
        """Forecasts `[n, H]` of `x [n, T, d]` and the duration of the ORT call they ran in.

        Raises:
            Exception: whatever the (shared) call raised.
        """
        if not self.enabled or len(x) >= self.max_rows:
            if arrival is not None:
                arrival.settle()
            return self._alone(session, x)
        job = _Job(session=session, x=x)
        self._enqueue(job, arrival)
        job.done.wait()
        return job.outcome()

    async def forecast_async(
        self, session: Any, x: npt.NDArray[np.float32], arrival: Arrival | None = None
    ) -> tuple[npt.NDArray[np.float32], float]:
        """`forecast` for a caller on an event loop: it awaits the shared call (or, for a large
        request, its own call in a worker thread) without blocking the loop."""
        if not self.enabled or len(x) >= self.max_rows:
            if arrival is not None:
                arrival.settle()
            return await asyncio.to_thread(self._alone, session, x)
        job = _Job(session=session, x=x, future=asyncio.get_running_loop().create_future())
        self._enqueue(job, arrival)
        await job.future  # type: ignore[misc]
        return job.outcome()

    def _alone(self, session: Any, x: npt.NDArray[np.float32]) -> tuple[Any, float]:
        started = time.perf_counter()
        result = self._run(session, x)
        return result, time.perf_counter() - started

    def _enqueue(self, job: _Job, arrival: Arrival | None) -> None:
        """Queue a job (its arrival ends here) and wake the worker once."""
        with self._cond:
            if arrival is not None and arrival.active:
                arrival.active = False
                self._arriving -= 1
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            self._queue.append(job)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name="forecaster-batcher", daemon=True
                )
                self._worker.start()
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker once the queue is empty; later `forecast` calls raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5.0)

    def _settle(self, arrival: Arrival) -> None:
        with self._cond:
            if arrival.active:
                arrival.active = False
                self._arriving -= 1
                if self._gathering:  # only a worker waiting for arrivals cares
                    self._cond.notify()

    def _take(self) -> list[_Job] | None:
        """The next batch: jobs matching the oldest one, waiting for arrivals if allowed."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            jobs, rows = [first], len(first.x)
            deadline = time.perf_counter() + self.max_wait_s
            while True:
                for job in list(self._queue):
                    if rows + len(job.x) > self.max_rows:
                        break
                    if job.matches(first):
                        self._queue.remove(job)
                        jobs.append(job)
                        rows += len(job.x)
                left = deadline - time.perf_counter()
                if rows >= self.max_rows or self._arriving <= 0 or left <= 0:
                    self._gathering = False
                    return jobs
                self._gathering = True
                self._cond.wait(left)

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            started = time.perf_counter()
            try:
                x = jobs[0].x if len(jobs) == 1 else np.concatenate([job.x for job in jobs])
                z = self._run(jobs[0].session, x)
            except Exception as exc:  # ORT raises untyped errors; every request hears it
                for job in jobs:
                    job.error = exc
                    job.complete()
                continue
            finally:
                self.calls += 1
            seconds = time.perf_counter() - started
            offset = 0
            for job in jobs:
                job.result = z[offset : offset + len(job.x)]
                job.seconds = seconds
                offset += len(job.x)
                job.complete()
