from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import forecaster.files
from forecaster.files import atomic_write_text, atomic_writer, replace_dir


def test_write_replaces_whole_file_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_failure_inside_the_block_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def write_half_then_fail() -> None:
        with atomic_writer(path, "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_half_then_fail()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_failing_fsync_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(forecaster.files.os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _bundle(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_text(text)
    (path / "metadata.json").write_text(text)
    return path


def test_replace_dir_publishes_a_new_folder_and_swaps_an_old_one(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    replace_dir(_bundle(tmp_path / ".stage1", "v1"), folder)
    assert (folder / "model.onnx").read_text() == "v1"
    replace_dir(_bundle(tmp_path / ".stage2", "v2"), folder)
    assert {p.name: (p / "model.onnx").read_text() for p in tmp_path.iterdir()} == {"bundle": "v2"}


def test_a_crash_while_replacing_never_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the first rename (the second one never happens) or before the old copy is
    deleted: the folder is there, old or new, whole."""
    folder = _bundle(tmp_path / "bundle", "v1")
    monkeypatch.setattr(Path, "replace", _second_rename_dies())
    monkeypatch.setattr(forecaster.files.shutil, "rmtree", _raise_interrupt)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(_bundle(tmp_path / ".stage", "v2"), folder)
    assert (folder / "model.onnx").read_text() == (folder / "metadata.json").read_text() == "v2"


def _raise_interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def _second_rename_dies() -> Callable[[Path, str | Path], Path]:
    """A `Path.replace` that renames once, then dies as a killed process would."""
    real_replace = Path.replace
    calls = 0

    def replace(self: Path, target: str | Path) -> Path:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real_replace(self, target)

    return replace


def test_without_an_exchange_an_interrupted_swap_is_restored_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forecaster.files, "_exchange", lambda first, second: False)
    folder = _bundle(tmp_path / "bundle", "v1")
    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", _second_rename_dies())
        with pytest.raises(KeyboardInterrupt):
            replace_dir(_bundle(tmp_path / ".stage2", "v2"), folder)
    assert not folder.exists()
    assert (tmp_path / ".bundle.old" / "model.onnx").read_text() == "v1"
    replace_dir(_bundle(tmp_path / ".stage3", "v3"), folder)
    assert (folder / "model.onnx").read_text() == "v3"
    assert not (tmp_path / ".bundle.old").exists()


def _dead_pid() -> int:
    """The id of a process that has exited (its slot is free until reused)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """A SIGKILLed writer leaves its temporary file or staging folder; the next write of the same
    target on this host removes those whose process is gone, and no one else's."""
    import os

    host = forecaster.files._HOST
    dead, alive = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".checkpoint.pt.{dead}@{host}.abc123.tmp"
    stale_dir = _bundle(tmp_path / f".bundle_feedback.{dead}@{host}.xyz", "half")
    running = tmp_path / f".checkpoint.pt.{alive}@{host}.def456.tmp"
    other_host = tmp_path / f".checkpoint.pt.{dead}@00000000.ghi789.tmp"
    unrelated = tmp_path / f".other.pt.{dead}@{host}.jkl.tmp"
    for path in (stale_file, running, other_host, unrelated):
        path.write_bytes(b"half")
    atomic_write_text(tmp_path / "checkpoint.pt", "new")
    assert not stale_file.exists()
    assert running.exists()
    assert other_host.exists()
    assert unrelated.exists()
    assert stale_dir.exists()  # another target's leftovers wait for its own next write
    staging = forecaster.files.staging_dir(tmp_path / "bundle_feedback")
    assert not stale_dir.exists()
    assert stat.S_IMODE(staging.stat().st_mode) == 0o755
    assert staging.name.startswith(f".bundle_feedback.{os.getpid()}@{host}.")


def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    target = tmp_path / "checkpoint.pt"
    script = (
        "import sys, time\n"
        "from forecaster.files import atomic_writer\n"
        "with atomic_writer(sys.argv[1], 'wb') as h:\n"
        "    h.write(b'half'); h.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the leftover
    atomic_write_text(target, "whole")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert target.read_text() == "whole"
