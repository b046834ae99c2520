"""The scheduled retrain job: lock, prepare, train both, log, register, promote (DESIGN.md §6).

`run_retrain(config)` runs load → validate → preprocess → gate (`pipelines.prepare`) → train the
fixed-feedback champion candidate and the BPTT fallback (`pipelines.train.run_training`: export
with parity check and evaluation included) → log both and the baselines under one MLflow parent
run → register each, verify the registered copy and move `champion` / `fallback` only when the
candidate beats the holder (`pipelines.tracking`). It is built to run unattended under cron,
systemd or a Kubernetes CronJob:

- one retrain per output folder: `<output_dir>/retrain.lock`, created with O_CREAT|O_EXCL and
  holding `{pid, host, started_at, config}`; a lock whose PID is gone (same host) or older than
  the max age (another host) is replaced with a warning, a live one ends the job with `LockHeld`;
- a time budget checked between stages and after every optimiser step of training; running out
  raises `BudgetExceeded` before any alias moves;
- idempotent: a re-run whose data fingerprint and config hash equal those of the last completed
  retrain, with the aliases still where it left them, stops early as "up to date" (`force`
  retrains anyway); SIGKILL at any point leaves the aliases on complete, verified versions.

Exit codes (`ExitCode`, the CLI's contract with the scheduler): 0 promoted, kept or up to date;
1 internal error; 2 data, config or model error; 3 lock held; 4 time budget exceeded; 5 tracking
or registry error; 6 export or parity check failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from forecaster.config import Config
from forecaster.errors import ExportError, ForecasterError, TrackingError
from forecaster.files import atomic_write_text
from forecaster.redaction import redact, without_userinfo_secret
from pipelines.prepare import PreparedData, prepare
from pipelines.tracking import (
    CHAMPION,
    FALLBACK,
    MlflowTracker,
    PromotionDecision,
    RetrainOwner,
    RetrainRun,
    data_fingerprint,
    open_tracking,
    show,
)
from pipelines.train import TrainOutcome, evaluate_baselines, run_training

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "STAGES",
    "BudgetExceeded",
    "Deadline",
    "ExitCode",
    "LockHeld",
    "LockInfo",
    "RetrainResult",
    "config_hash",
    "exit_code",
    "parse_duration",
    "retrain_lock",
    "run_retrain",
]

LOCK_FILE = "retrain.lock"
WORK_DIR = "retrain"
STATE_FILE = "state.json"
DEFAULT_LOCK_MAX_AGE_S = 6 * 3600.0
# A lock file appears complete (`_create_exclusive`) except where hard links are missing; there
# it is written right after it is created, and one still unreadable after this long was left by
# a process killed in between.
_UNWRITTEN_LOCK_GRACE_S = 60.0
# PIDs are recycled: the lock records the process start time and a PID alive with another start
# time is another process.
_START_TIME_TOLERANCE_S = 1.0
STAGES = (
    "preprocess",
    "train_feedback",
    "train_bptt",
    "export",
    "log",
    "register",
)
Outcome = Literal["promoted", "kept", "up_to_date"]


class ExitCode(IntEnum):
    """What `forecaster retrain` returns to the scheduler."""

    OK = 0
    INTERNAL = 1
    INPUT = 2
    LOCKED = 3
    BUDGET = 4
    TRACKING = 5
    EXPORT = 6


class LockHeld(ForecasterError):
    """Another retrain of the same output folder is running."""

    http_status = 409


class BudgetExceeded(ForecasterError):
    """The job ran out of its time budget; no alias was moved."""

    http_status = 504


def exit_code(error: BaseException) -> ExitCode:
    """The scheduler's exit code for an error that ended a retrain."""
    for kind, code in (
        (LockHeld, ExitCode.LOCKED),
        (BudgetExceeded, ExitCode.BUDGET),
        (TrackingError, ExitCode.TRACKING),
        (ExportError, ExitCode.EXPORT),
        (ForecasterError, ExitCode.INPUT),
    ):
        if isinstance(error, kind):
            return code
    return ExitCode.INTERNAL


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)\s*([smhd]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, *, name: str = "--budget") -> float:
    """Seconds in `3600`, `3600s`, `90m`, `2h`, `1h30m` or `1d`.

    Raises:
        ConfigError: not a positive duration.
    """
    from forecaster.errors import ConfigError

    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    joined = "".join(number + unit for number, unit in parts)
    seconds = sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    if not parts or joined != compact or seconds <= 0:
        raise ConfigError(
            f"{name}: {text!r} is not a positive duration (e.g. 3600s, 90m, 2h, 1h30m)",
            field=name.lstrip("-"),
        )
    return seconds


# --------------------------------------------------------------------------- the time budget


@dataclass(frozen=True)
class Deadline:
    """The job's time budget, measured on the monotonic clock from `started`."""

    budget_s: float | None
    started: float = field(default_factory=time.monotonic)

    def elapsed_s(self) -> float:
        """Seconds since the job started."""
        return time.monotonic() - self.started

    def check(self, where: str) -> None:
        """Raise `BudgetExceeded` naming `where` once the budget is spent."""
        if self.budget_s is None:
            return
        elapsed = self.elapsed_s()
        if elapsed > self.budget_s:
            raise BudgetExceeded(
                f"time budget {self.budget_s:g} s exceeded {where} ({elapsed:.0f} s elapsed); "
                "no alias was moved",
                field="budget",
            )


@dataclass(frozen=True)
class _DeadlineCallback:
    """A `TrainCallback` that stops training at the first optimiser step past the budget."""

    deadline: Deadline
    stage: str

    def on_step_end(self, step: int, model: Any) -> None:
        self.deadline.check(f"during {self.stage} at optimiser step {step}")

    def on_epoch_end(self, record: Any, history: Any) -> None:
        self.deadline.check(f"during {self.stage} after epoch {record.epoch}")

    def on_train_end(self, history: Any) -> None:
        """Nothing to check once training has ended; the next stage checks."""


# --------------------------------------------------------------------------- the lock


@dataclass(frozen=True)
class LockInfo:
    """The content of a retrain lock file."""

    pid: int
    host: str
    started_at: str
    started_unix: float
    config: str
    process_started: float | None = None

    def age_s(self) -> float:
        """Seconds since the lock was taken (wall clock: the lock may come from another host)."""
        return max(0.0, time.time() - self.started_unix)

    def describe(self) -> str:
        """`pid 123 on host-a since 2026-…Z (42 s ago), config …`."""
        return (
            f"pid {self.pid} on {self.host} since {self.started_at} ({self.age_s():.0f} s ago), "
            f"config {self.config}"
        )


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _pid_alive(pid: int, started: float | None) -> bool:
    """Whether `pid` runs on this host and is the process that took the lock."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return started is None or abs(created - started) < _START_TIME_TOLERANCE_S


def _read_lock(path: Path) -> LockInfo | None:
    """The lock's content; None when it cannot be parsed (being written, or garbled)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return LockInfo(
            pid=int(raw["pid"]),
            host=str(raw["host"]),
            started_at=str(raw["started_at"]),
            started_unix=float(raw["started_unix"]),
            config=str(raw.get("config", "?")),
            process_started=raw.get("process_started"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stale_reason(path: Path, held: LockInfo | None, max_age_s: float) -> str | None:
    """Why the lock at `path` is stale, or None when its holder may still be running."""
    if held is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it was removed"
        if age > _UNWRITTEN_LOCK_GRACE_S:
            return f"it is unreadable and {age:.0f} s old"
        return None
    if held.host == socket.gethostname():
        if not _pid_alive(held.pid, held.process_started):
            return f"pid {held.pid} is not running on {held.host}"
        return None
    if held.age_s() > max_age_s:
        return f"it comes from host {held.host} and is older than {max_age_s:g} s"
    return None


def _write_new(path: Path, text: str) -> None:
    """Write `text` to `path`, which must not exist (O_CREAT|O_EXCL), and fsync it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists; True when created.

    The text goes to a private temporary file first, which is hard-linked to `path` (`link`
    fails when `path` exists, like O_EXCL): a competing process never reads the lock empty or
    half-written, so it can always name the holder. Where the file system has no hard links,
    `path` is created with O_EXCL and written in place (an empty lock then reads as held by a
    process that is starting, and as stale after `_UNWRITTEN_LOCK_GRACE_S`).
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.unlink(missing_ok=True)  # ours by name: left by a killed process with this pid
    try:
        _write_new(temporary, text)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as exc:  # no hard links here (EPERM, ENOTSUP, ...)
            logger.debug("hard link for %s failed (%s); creating it in place", path, exc)
            try:
                _write_new(path, text)
            except FileExistsError:
                return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


def _replace_stale(path: Path, held: LockInfo | None, reason: str) -> None:
    """Remove a stale lock, serialised by a `.takeover` file so two replacers never both win.

    The lock is removed only if it still holds what was judged stale; a takeover file left by a
    killed replacer is itself removed after the unreadable-lock grace period.
    """
    guard = path.with_name(path.name + ".takeover")
    if not _create_exclusive(guard, f"{os.getpid()}@{socket.gethostname()}\n"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > _UNWRITTEN_LOCK_GRACE_S:
                guard.unlink()
        return
    try:
        if _read_lock(path) == held:
            logger.warning("replacing stale retrain lock %s: %s", path, reason)
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _acquire(path: Path, config_label: str, max_age_s: float) -> LockInfo:
    now = datetime.now(UTC)
    info = LockInfo(
        pid=os.getpid(),
        host=socket.gethostname(),
        started_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        started_unix=now.timestamp(),
        config=config_label,
        process_started=_process_start(os.getpid()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        if _create_exclusive(path, json.dumps(asdict(info), indent=2) + "\n"):
            return info
        held = _read_lock(path)
        reason = _stale_reason(path, held, max_age_s)
        if reason is None:
            holder = held.describe() if held is not None else "a process that is starting"
            raise LockHeld(f"retrain lock {path} is held by {holder}", field="lock")
        _replace_stale(path, held, reason)
    raise LockHeld(f"retrain lock {path} is being taken over by another process", field="lock")


@contextlib.contextmanager
def retrain_lock(
    path: Path, *, config_label: str, max_age_s: float = DEFAULT_LOCK_MAX_AGE_S
) -> Iterator[LockInfo]:
    """Hold the retrain lock at `path` for a block; released (only if still ours) on exit.

    Raises:
        LockHeld: a live process holds the lock.
    """
    info = _acquire(path, config_label, max_age_s)
    try:
        yield info
    finally:
        if _read_lock(path) == info:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- idempotence


def config_hash(config: Config) -> str:
    """sha256 of everything in the config that shapes the model.

    `output_dir`, `data.path`, `execution` and `workers` are left out: where files live and
    where the per-series stages run (their results are bit-identical on every executor) do not
    change the model, and the data's content is covered by its fingerprint.
    """
    settings = config.model_dump(
        mode="json",
        exclude={"output_dir": True, "execution": True, "workers": True, "data": {"path"}},
    )
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _State:
    """What the last completed retrain of an output folder saw and left behind."""

    data_sha256: str
    config_hash: str
    tracking_uri: str  # `redact(uri, uri)`, to show: whoever reads the folder reads this file
    tracking_key: str  # `_tracking_key(uri)`: which store, compared
    model_name: str
    champion_version: str
    fallback_version: str
    run_id: str
    finished_at: str


def _read_state(path: Path) -> _State | None:
    """The recorded state, or None (absent or unreadable: the job retrains). A record written
    before the URI was kept redacted holds it in clear: its key comes from that URI, and the
    file is rewritten without the credential at once."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and "tracking_key" not in record:
            raw = record["tracking_uri"]
            record.update(tracking_uri=redact(raw, raw), tracking_key=_tracking_key(raw))
            state = _State(**record)
            _write_state(path, state)
            return state
        return _State(**record)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write_state(path: Path, state: _State) -> None:
    atomic_write_text(path, json.dumps(asdict(state), indent=2) + "\n")


def _tracking_key(uri: str) -> str:
    """Which store and user `uri` names, as a digest: sha256 of the URI with its userinfo
    password or token masked by position (`without_userinfo_secret`). A rotated password is
    the same store, and a password that also spells a host or database name cannot make two
    stores share a key; the digest keeps secret query values off the disk."""
    return hashlib.sha256(without_userinfo_secret(uri).encode()).hexdigest()


def _aliases_unchanged(state: _State, uri: str) -> bool:
    """Whether `champion` and `fallback` still point where the recorded retrain left them, on
    the tracking server at `uri`."""
    for alias, version in ((CHAMPION, state.champion_version), (FALLBACK, state.fallback_version)):
        try:
            if show(state.model_name, alias, uri=uri).version != version:
                return False
        except TrackingError:
            return False
    return True


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain did.

    Attributes:
        outcome: `promoted` (champion moved), `kept` (champion stayed) or `up_to_date`.
        message: the one line the CLI prints.
        run_id: the MLflow parent run (None when up to date).
        decisions: per alias, the promotion decision.
        stages_s: wall seconds per stage of `STAGES` (stages not run are absent).
        total_s: the job's wall seconds, lock to release.
        data_sha256: the data fingerprint.
        config_hash: `config_hash(config)`.
        tracking_uri: where runs and versions went.
        histories: per training method, its `TrainHistory` (empty when up to date).
    """

    outcome: Outcome
    message: str
    run_id: str | None
    decisions: dict[str, PromotionDecision]
    stages_s: dict[str, float]
    total_s: float
    data_sha256: str
    config_hash: str
    tracking_uri: str
    histories: dict[str, Any] = field(default_factory=dict)  # TrainHistory; no torch import


@dataclass
class _Job:
    """One retrain's mutable state: config, budget, stage timings, crash-test hook."""

    config: Config
    deadline: Deadline
    kill_at: str | None
    stages_s: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to `stages_s[name]`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages_s[name] = self.stages_s.get(name, 0.0) + time.perf_counter() - started

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Check the budget, fire the crash hook, then time the block into `stages_s[name]`."""
        self.deadline.check(f"before {name}")
        self.kill_point(name)
        with self.timed(name):
            yield

    def kill_point(self, name: str) -> None:
        """Crash-safety test hook: `kill_at` = `<point>` or `<point>+<seconds>` SIGKILLs here."""
        if self.kill_at is None:
            return
        point, _, delay = self.kill_at.partition("+")
        if point != name:
            return
        if not delay:
            _kill_self()
        timer = threading.Timer(float(delay), _kill_self)
        timer.daemon = True
        timer.start()

    def train(
        self, run: RetrainRun, prepared: PreparedData, method: str, stage: str
    ) -> tuple[MlflowTracker, TrainOutcome]:
        """Train one model into its nested run; training and export+evaluation timed apart."""
        with self.timed("log"):
            tracker = run.child(method)
        work = self.config.output_dir / WORK_DIR
        with self.stage(stage):
            import_holding_sigterm("torch")  # the first training of the process imports it
            started = time.perf_counter()
            try:
                outcome = run_training(
                    self.config,
                    method=method,
                    out_dir=work,
                    resume=False,
                    prepared=prepared,
                    callbacks=[tracker, _DeadlineCallback(self.deadline, stage)],
                )
            except BaseException as exc:
                with contextlib.suppress(ForecasterError):
                    tracker.finish("KILLED" if isinstance(exc, BudgetExceeded) else "FAILED")
                raise
        # run_training exports (with the parity check) and scores the bundle after training.
        exported = time.perf_counter() - started - outcome.history.total_seconds
        self.stages_s[stage] -= exported
        self.stages_s["export"] = self.stages_s.get("export", 0.0) + exported
        return tracker, outcome


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _clean_work_dir(work: Path) -> None:
    """Remove staging folders a killed run left (we hold the lock: nothing else writes here)."""
    for leftover in work.glob(".bundle_*"):
        logger.warning("removing %s left by an interrupted retrain", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _decision_line(decisions: dict[str, PromotionDecision]) -> tuple[Outcome, str]:
    champion = decisions[CHAMPION]
    outcome: Outcome = "promoted" if champion.promoted else "kept"
    parts = []
    for alias, decision in decisions.items():
        if decision.promoted:
            parts.append(f"{alias} → v{decision.candidate_version}")
        else:
            parts.append(
                f"{alias} kept v{decision.previous_version} "
                f"(candidate v{decision.candidate_version} not better)"
            )
    return outcome, f"{outcome}: " + "; ".join(parts) + f" — {champion.reason}"


def import_holding_sigterm(module: str) -> None:
    """Import `module` with SIGTERM's Python handler held back until the import is done.

    A handler that raises (the CLI's `_exit_on_sigterm`, which unwinds the job so the lock is
    released) raised while torch's native initialisation was calling into Python: pybind11
    turned the exception into a C++ one nothing caught, and the process aborted (exit -6) with
    its lock held. Held, a SIGTERM that arrives during the import is re-raised right after it,
    where the handler's exception unwinds normally. Outside the main thread (where signal
    handlers cannot be changed) or once imported, a plain import.
    """
    import importlib
    import sys

    if module in sys.modules or threading.current_thread() is not threading.main_thread():
        importlib.import_module(module)
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        importlib.import_module(module)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        signal.raise_signal(signal.SIGTERM)


def run_retrain(
    config: Config,
    *,
    tracking_uri: str | None = None,
    data_path: Path | None = None,
    budget_s: float | None = None,
    force: bool = False,
    lock_max_age_s: float | None = None,
    config_label: str | None = None,
    kill_at: str | None = None,
) -> RetrainResult:
    """Run one unattended retrain of `config` under the output folder's lock.

    Args:
        config: the job's config; `output_dir` holds the lock, the state and the bundles.
        tracking_uri: MLflow URI (default: `MLFLOW_TRACKING_URI`, else the embedded store).
        data_path: read this file instead of `config.data.path`.
        budget_s: time budget in seconds; None: unlimited.
        force: retrain even when the data and config are those of the last completed retrain.
        lock_max_age_s: age after which another host's lock is stale (default: twice the
            budget, else 6 h).
        config_label: how the lock names the config (default: the config's name).
        kill_at: crash-safety test hook, `<point>[+<seconds>]`: SIGKILL this process at the
            start of a stage of `STAGES`, at `register_fallback` (the champion decided, the
            fallback not yet) or `state` (before the state file is written), or that many
            seconds after the point.

    Raises:
        LockHeld: another retrain of this output folder is running.
        BudgetExceeded: the budget ran out; no alias moved.
        TrackingError: MLflow failed; no alias moved to an unverified version.
        ForecasterError: data, config, model or export errors.
    """
    job = _Job(config=config, deadline=Deadline(budget_s), kill_at=kill_at)
    max_age = lock_max_age_s or (2 * budget_s if budget_s else DEFAULT_LOCK_MAX_AGE_S)
    output_dir = config.output_dir
    with retrain_lock(
        output_dir / LOCK_FILE, config_label=config_label or config.name, max_age_s=max_age
    ) as lock:
        work = output_dir / WORK_DIR
        _clean_work_dir(work)
        owner = RetrainOwner(output_dir, f"{lock.host}:{lock.pid}:{lock.started_at}")
        with job.timed("log"):
            tracking = open_tracking(config, uri=tracking_uri)
            tracking.close_abandoned(owner)  # runs a killed retrain of this folder left open
        with job.stage("preprocess"):
            prepared = prepare(config, data_path=data_path)
        fingerprint = data_fingerprint(prepared)
        digest = config_hash(config)
        state_path = work / STATE_FILE
        state = _read_state(state_path)
        if (
            not force
            and state is not None
            and (state.data_sha256, state.config_hash, state.tracking_key, state.model_name)
            == (fingerprint["sha256"], digest, _tracking_key(tracking.uri), config.name)
            and _aliases_unchanged(state, tracking.uri)
        ):
            message = (
                f"up to date: data {fingerprint['sha256'][:12]} and config {digest[:12]} were "
                f"retrained by run {state.run_id} at {state.finished_at}; champion "
                f"v{state.champion_version}, fallback v{state.fallback_version} (--force retrains)"
            )
            return RetrainResult(
                outcome="up_to_date",
                message=message,
                run_id=None,
                decisions={},
                stages_s=dict(job.stages_s),
                total_s=job.deadline.elapsed_s(),
                data_sha256=fingerprint["sha256"],
                config_hash=digest,
                tracking_uri=tracking.uri,
            )
        with job.timed("log"):
            run = tracking.start_retrain(owner=owner)
            run.parent.set_tags({"retrain.config_hash": digest, "retrain.forced": force})
        with run:  # the parent run ends FINISHED, or FAILED on any error
            trained = {
                method: job.train(run, prepared, method, f"train_{method}")
                for method in ("feedback", "bptt")
            }
            horizon = config.window.horizon
            with job.stage("log"):
                run.log_data(config, prepared)
                logged = {
                    method: run.log_training(
                        tracker, config, prepared, result, role=method, checkpoint=job.kill_point
                    )
                    for method, (tracker, result) in trained.items()
                }
                run.log_baselines(
                    evaluate_baselines(
                        prepared,
                        horizon,
                        execution=config.execution,
                        workers=config.workers,
                    )
                )
            decisions: dict[str, PromotionDecision] = {}
            with job.stage("register"):
                for method, alias in (("feedback", CHAMPION), ("bptt", FALLBACK)):
                    # No budget check in here: once the champion may have moved, finish.
                    if alias == FALLBACK:
                        job.kill_point("register_fallback")
                    decisions[alias] = run.register_and_promote(
                        logged[method], alias, prepared, horizon, checkpoint=job.kill_point
                    )
            outcome, message = _decision_line(decisions)
            run.parent.set_tags({"retrain.outcome": outcome})
            run.parent.log_metrics({f"stage_seconds.{k}": v for k, v in job.stages_s.items()})
            job.kill_point("state")
            holders = {
                alias: d.candidate_version if d.promoted else str(d.previous_version)
                for alias, d in decisions.items()
            }
            _write_state(
                state_path,
                _State(
                    data_sha256=fingerprint["sha256"],
                    config_hash=digest,
                    tracking_uri=redact(tracking.uri, tracking.uri),
                    tracking_key=_tracking_key(tracking.uri),
                    model_name=config.name,
                    champion_version=holders[CHAMPION],
                    fallback_version=holders[FALLBACK],
                    run_id=run.run_id,
                    finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )
    logger.info(
        "retrain %s in %.1f s (%s)",
        outcome,
        job.deadline.elapsed_s(),
        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in job.stages_s.items()),
    )
    return RetrainResult(
        outcome=outcome,
        message=message,
        run_id=run.run_id,
        decisions=decisions,
        stages_s=dict(job.stages_s),
        total_s=job.deadline.elapsed_s(),
        data_sha256=fingerprint["sha256"],
        config_hash=digest,
        tracking_uri=tracking.uri,
        histories={method: result.history for method, (_, result) in trained.items()},
    )
