"""Carried recurrent state of known series: a bounded LRU cache, and when a request may use it.

For a series the service has answered, the step graph's state after its last point is kept with
the last `lookback + d` raw values, keyed by series id and model (source and file fingerprint,
so a reload never mixes models). A later request that continues the series, sending only new
points or its window again with new points at the end, runs just the new points through the step
graph. The state is dropped (and the window recomputed) on a gap, out-of-order or revised data,
or a model reload. The cache is only a cache: a miss costs a full-window recompute.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Carried", "StateCache", "new_points"]


@dataclass(frozen=True)
class Carried:
    """What is kept per series: the state after `last_ns` and the raw values up to it."""

    last_ns: int
    state: npt.NDArray[np.float32]  # [S]
    tail: npt.NDArray[np.float64]  # the last lookback + d raw values, oldest first


class StateCache:
    """Thread-safe LRU of `Carried` by `(unique_id, model key)`; `max_entries` 0 disables it."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Carried] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether states are kept at all."""
        return self.max_entries > 0

    def get(self, key: tuple[str, str]) -> Carried | None:
        """The entry, marked as recently used; None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, str], entry: Carried) -> None:
        """Store an entry, evicting the least recently used beyond `max_entries`."""
        if not self.enabled:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, key: tuple[str, str]) -> None:
        """Forget one series."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every series (a model reload)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def new_points(
    carried: Carried, ds: npt.NDArray[np.int64], values: npt.NDArray[np.float64], step_ns: int
) -> int | None:
    """Index of the first point of `ds` after the carried state, when the request continues it.

    The request continues the series when its points up to `carried.last_ns` (if any) lie one
    step apart up to `last_ns` and repeat the kept raw values exactly, and the points after it
    follow one step apart from `last_ns`; otherwise (gap, out-of-order, revised values, nothing
    new) it returns None, and the request is checked as a whole window.
    """
    start = int(np.searchsorted(ds, carried.last_ns, side="right"))
    if start == len(ds):
        return None
    overlap = values[:start]
    before = carried.last_ns - step_ns * np.arange(start - 1, -1, -1, dtype=np.int64)
    if not np.array_equal(ds[:start], before):
        return None
    if overlap.size > carried.tail.size:
        overlap = overlap[-carried.tail.size :]
    if overlap.size and not np.array_equal(overlap, carried.tail[-overlap.size :]):
        return None
    expected = carried.last_ns + step_ns * np.arange(1, len(ds) - start + 1, dtype=np.int64)
    if not np.array_equal(ds[start:], expected):
        return None
    return start
