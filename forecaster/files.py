"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every artifact the project writes (preprocessing.json, stationarity.json, checkpoints, bundle
metadata, benchmark results) goes through `atomic_writer`: a temporary file in the same folder,
flushed and fsynced, then renamed over the target. On any failure the temporary file is removed
and the previous file, if any, is left untouched. Folders (model bundles) are published with
`replace_dir`: built beside the target (`staging_dir`), then swapped in by one atomic exchange.

A writer killed outright (SIGKILL, power loss) cannot remove its temporary file or folder, so
their names carry the writer's process id and host (`.<name>.<pid>@<host>.<random>`), and the
next write of the same target on the same host removes those whose process is gone. Standard
library only (serving imports it).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

# mkstemp creates files 0600; artifacts are read by other users (a serving account, CI tools).
FILE_MODE = 0o644


# This host, as 8 hex digits: a writer's temporary names are only judged by processes here.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _writer_prefix(target: Path) -> str:
    """`.<name>.<pid>@<host>.`: the start of this process's temporary names for `target`."""
    return f".{target.name}.{os.getpid()}@{_HOST}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the temporary files and folders that writers of `target` on this host left when
    killed (their process is gone); the ones of running writers and of other hosts stay.
    Returns what was removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)@{_HOST}\.")
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _running(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def staging_dir(folder: str | Path, mode: int = 0o755) -> Path:
    """A new empty folder beside `folder` to build its next version in (`replace_dir` publishes
    it), readable by others (`mode`; mkdtemp's 0700 would hide a bundle from a serving account).
    Leftovers of killed writers of `folder` are removed first (`remove_stale`)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder)
    staging = Path(tempfile.mkdtemp(prefix=_writer_prefix(folder), dir=folder.parent))
    staging.chmod(mode)
    return staging


@contextmanager
def atomic_writer(path: str | Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO]:  # type: ignore[type-arg]
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.
    Leftovers of killed writers of `path` are removed first (`remove_stale`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_writer_prefix(path), suffix=".tmp")
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # renameat2(2): swap the two names atomically (Linux >= 3.15, glibc >= 2.28)
# errno values meaning "this system or file system cannot exchange", not "the swap failed".
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one `renameat2(RENAME_EXCHANGE)`; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl < 1.2.x)
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if (
        renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        == 0
    ):
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_dir(staging: str | Path, folder: str | Path) -> Path:
    """Publish the complete folder `staging` as `folder`, replacing any folder there.

    Where `folder` exists, the two are exchanged atomically (Linux `renameat2`), so a reader or
    a crash at any moment finds the old folder or the new one, never neither; the old one is
    then deleted. Where the exchange is unsupported, the old folder is renamed aside to
    `.<name>.old` first and the new one renamed in; a crash between the two leaves the old
    folder under that name, and the next `replace_dir` of the same folder puts it back first.
    """
    staging, folder = Path(staging), Path(folder)
    retired = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and retired.is_dir():
        retired.replace(folder)  # a fallback swap was interrupted: restore the old folder
    if not folder.exists():
        staging.replace(folder)
        return folder
    if _exchange(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return folder
    shutil.rmtree(retired, ignore_errors=True)
    folder.replace(retired)
    staging.replace(folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder
