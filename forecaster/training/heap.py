"""Keep freed memory in the process heap while training on CPU (glibc's malloc).

By default glibc hands large freed blocks back to the kernel: blocks above the mmap threshold
(128 KiB, adapting up to 32 MiB) are unmapped on free, and the top of the heap is trimmed once
more than the trim threshold is free. A training step frees and re-allocates the same blocks
every step, so each step touches fresh pages again: one page fault and one page zeroing per
4 KiB. Measured on the benchmark machine (`benchmarks/train_speed.py`, CPU, batch 32): BPTT of
the MI-GRU at h 64, T 720 faulted ~11k pages (~45 MB) per step, at h 256, T 1440 ~190k pages;
with both thresholds raised, none once warm.

`training_heap()` raises both thresholds for the duration of training, so freed blocks stay in
the heap and the next step reuses them, then returns the free memory to the kernel
(`malloc_trim`) and leaves the thresholds where glibc's adaptive mode settles once large blocks
have been freed (mmap 32 MiB, trim 64 MiB): mallopt cannot turn the adaptation back on, and
glibc's initial 128 KiB, fixed, would map and fault every block above it afresh for the rest of
the process (measured: a feedback step 3x slower). Nested and concurrent uses share one
setting: the last to leave restores it. Elsewhere (not Linux/glibc, e.g. macOS or musl) it does
nothing; with another allocator preloaded (jemalloc, tcmalloc) glibc's settings are inert.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import threading
from collections.abc import Iterator

__all__ = ["training_heap"]

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h) and values.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_MMAP = (1 << 30, 32 << 20)  # 1 GiB, or 32 MiB where glibc refuses more (older ones)
_KEEP_TRIM = (1 << 31) - 1  # the largest C int: never trim while training
# Where glibc's adaptive thresholds settle after large frees (DEFAULT_MMAP_THRESHOLD_MAX, twice it).
_AFTER_MMAP = 32 << 20
_AFTER_TRIM = 64 << 20

_lock = threading.Lock()
_users = 0  # training_heap contexts open now
_applied = False  # whether the first of them got the thresholds set


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _keep(libc: ctypes.CDLL) -> bool:
    if not any(libc.mallopt(_M_MMAP_THRESHOLD, value) == 1 for value in _KEEP_MMAP):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM) == 1)


def _release(libc: ctypes.CDLL) -> None:
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
    libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)


@contextlib.contextmanager
def training_heap() -> Iterator[bool]:
    """Within: freed memory stays in the heap for the next training step (glibc only).

    Yields:
        Whether the setting applies (False where the C library is not glibc).
    """
    global _users, _applied
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        if _users == 0:
            _applied = _keep(libc)
        _users += 1
        applied = _applied
    if not applied:
        logger.debug("glibc refused the training heap thresholds; training with its defaults")
    try:
        yield applied
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _release(libc)
