"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every artifact the project writes (preprocessing.json, stationarity.json, checkpoints, bundle
metadata, benchmark results) goes through `atomic_writer`: a temporary file in the same folder,
flushed and fsynced, then renamed over the target. On any failure the temporary file is removed
and the previous file, if any, is left untouched. Standard library only (serving imports it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

# mkstemp creates files 0600; artifacts are read by other users (a serving account, CI tools).
FILE_MODE = 0o644


@contextmanager
def atomic_writer(path: str | Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO]:  # type: ignore[type-arg]
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, FILE_MODE)
        encoding = "utf-8" if mode == "w" else None
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return the path."""
    with atomic_writer(path) as handle:
        handle.write(text)
    return Path(path)
