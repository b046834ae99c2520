"""Everything MLflow: runs, metrics, artifacts, registered versions, aliases and promotion.

The one module that imports MLflow (STYLE.md §2). `open_tracking(config)` resolves the tracking
URI (argument > `MLFLOW_TRACKING_URI` > an embedded `sqlite:///<output_dir>/mlruns.db` with
artifacts in `<output_dir>/mlartifacts`) and the config's experiment. A retrain is one parent run
(`Tracking.start_retrain`) with nested runs for the feedback champion candidate, the BPTT fallback
and each baseline; `MlflowTracker` is the trainer's `TrainCallback` for a nested run, and
`RetrainRun.log_training` logs a finished `TrainOutcome` (metrics, plots, bundle files, the ONNX
model). The registry keeps one registered model per config with aliases `champion` and
`fallback`; `RetrainRun.register_and_promote` moves an alias only to a version whose downloaded
ONNX model reproduces the local bundle's forecast, and only when it beats the holder on the same
test window. Every MLflow failure surfaces as a one-line `TrackingError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import numpy as np
import numpy.typing as npt

from forecaster.bundle import (
    EMBEDDED_ARTIFACTS,
    METADATA_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    STATIONARITY_FILE,
    STEP_MODEL_FILE,
    embedded_tracking_uri,
    find_bundle,
)
from forecaster.calibration import CALIBRATION_FILE
from forecaster.config import Config
from forecaster.errors import ForecasterError, TrackingError
from forecaster.redaction import redact
from pipelines.prepare import PreparedData

logger = logging.getLogger(__name__)

__all__ = [
    "CHAMPION",
    "FALLBACK",
    "LoggedCandidate",
    "MlflowTracker",
    "PromotionDecision",
    "RetrainRun",
    "Tracker",
    "Tracking",
    "TrackingTarget",
    "VersionInfo",
    "data_fingerprint",
    "flatten_config",
    "list_versions",
    "open_tracking",
    "promote",
    "resolve_tracking",
    "rollback",
    "show",
]

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CHAMPION = "champion"
FALLBACK = "fallback"
Alias = Literal["champion", "fallback"]
MODEL_NAME_IN_RUN = "model"
PARITY_TOLERANCE = 1e-5
HISTORY_TAG = "alias_history.{alias}"
_HISTORY_KEEP = 50
# MLflow 3 limits (mlflow/utils/validation.py): param keys 250 chars, values 6000, tags 8000.
_MAX_PARAM_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_BATCH = 100
_CONNECT_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------- the URI, in one place


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs and models go.

    Attributes:
        uri: the tracking (and registry) URI.
        source: `argument`, `environment` or `embedded`.
        artifact_location: for the embedded store, the experiment's artifact root (a file URI).
    """

    uri: str
    source: Literal["argument", "environment", "embedded"]
    artifact_location: str | None = None


def resolve_tracking(
    output_dir: Path,
    uri: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    experiment: str | None = None,
) -> TrackingTarget:
    """Resolve the tracking URI: explicit argument > `MLFLOW_TRACKING_URI` > embedded sqlite.

    The embedded default is `sqlite:///<output_dir>/mlruns.db` with artifacts beside it in
    `<output_dir>/mlartifacts` (`<output_dir>/mlartifacts/<experiment>` when one is named).
    """
    env = os.environ if environ is None else environ
    if uri:
        return TrackingTarget(uri=uri, source="argument")
    if env.get(TRACKING_URI_ENV):
        return TrackingTarget(uri=env[TRACKING_URI_ENV], source="environment")
    root = Path(output_dir).resolve()
    return TrackingTarget(
        uri=embedded_tracking_uri(root),
        source="embedded",
        artifact_location=(root / EMBEDDED_ARTIFACTS / (experiment or "")).as_uri(),
    )


def _check_reachable(uri: str) -> None:
    """Fail fast (MLflow's HTTP client retries for minutes) when a server is not listening."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname or "", port), _CONNECT_TIMEOUT_S):
                pass
        except OSError as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable: {exc.strerror or exc}",
                field="tracking_uri",
            ) from exc
    elif parsed.scheme == "sqlite":
        Path(parsed.path).parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _mlflow_errors(what: str, uri: str) -> Iterator[None]:
    """Turn MLflow, HTTP and file errors into one-line `TrackingError`s naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except ForecasterError:
        raise
    except (MlflowException, OSError, ValueError) as exc:
        message = str(getattr(exc, "message", exc)).strip().splitlines()
        first = message[0] if message else type(exc).__name__
        raise TrackingError(f"{what} failed at {uri}: {first[:300]}") from exc
    except Exception as exc:  # requests' errors and others from MLflow's REST client
        if type(exc).__module__.split(".")[0] not in ("requests", "urllib3", "mlflow"):
            raise
        raise TrackingError(f"{what} failed at {uri}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _fluent(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for a block (`log_model`, `register_model` need it).

    `mlflow.set_tracking_uri` also writes (and on `None` deletes) `MLFLOW_TRACKING_URI` and
    `MLFLOW_REGISTRY_URI` in `os.environ`; the globals and the environment are both restored, so
    a user's variable survives and nothing leaks into later resolutions.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {key: os.environ.get(key) for key in (TRACKING_URI_ENV, "MLFLOW_REGISTRY_URI")}
    previous_tracking = getattr(tracking_utils, "_tracking_uri", None)
    previous_registry = getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)  # type: ignore[arg-type]
        mlflow.set_registry_uri(previous_registry)  # type: ignore[arg-type]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- what gets logged


def flatten_config(config: Config) -> dict[str, str]:
    """The config as dotted keys (`train.lr`), values as strings cut to MLflow's limits."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        text = value if isinstance(value, str) else json.dumps(value)
        flat[prefix[:_MAX_PARAM_KEY]] = text[:_MAX_PARAM_VALUE]

    walk("", config.model_dump(mode="json"))
    return flat


def data_fingerprint(prepared: PreparedData) -> dict[str, Any]:
    """sha256 of every series' id, timestamps and values, with rows and time range per series."""
    digest = hashlib.sha256()
    series: dict[str, dict[str, Any]] = {}
    for uid, frame in prepared.data.frame.groupby("unique_id", sort=False):
        ds = frame["ds"].to_numpy().astype("datetime64[ns]")
        digest.update(str(uid).encode() + b"\0")
        digest.update(ds.astype(np.int64).tobytes())
        digest.update(frame["y"].to_numpy(np.float64).tobytes())
        series[str(uid)] = {
            "rows": len(frame),
            "start": str(np.datetime_as_string(ds[0], unit="s")),
            "end": str(np.datetime_as_string(ds[-1], unit="s")),
        }
    return {
        "sha256": digest.hexdigest(),
        "freq": prepared.data.freq,
        "n_series": len(series),
        "rows": sum(s["rows"] for s in series.values()),
        "series": series,
    }


def evaluation_window(prepared: PreparedData, lookback: int, horizon: int) -> str:
    """A key of the test windows and their scale: sha256 of each series' test rows (look-back
    included) and training values (whose mean and std z-score the test MSE, `train_scale`), L, H.

    Two scores are comparable only when this key is equal: the same errors on training data
    with another spread (history backfilled or corrected) are another MSE.
    """
    digest = hashlib.sha256(f"L={lookback};H={horizon}".encode())
    for uid, frame in prepared.data.frame.groupby("unique_id", sort=False):
        split = prepared.splits[str(uid)]
        rows = frame.iloc[split.test]
        digest.update(str(uid).encode() + b"\0")
        digest.update(rows["ds"].to_numpy().astype("datetime64[ns]").astype(np.int64).tobytes())
        digest.update(rows["y"].to_numpy(np.float64).tobytes())
        digest.update(b"train\0" + frame["y"].iloc[split.train].to_numpy(np.float64).tobytes())
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _input_example(prepared: PreparedData, lookback: int) -> npt.NDArray[np.float32]:
    """`[1, L, 1]` float32: the last look-back of the first series' model inputs."""
    from pipelines.train import model_inputs

    values = next(iter(model_inputs(prepared).values().values()))
    return values[-lookback:].astype(np.float32)[None, :, None]


@dataclass(frozen=True)
class _SeriesForecasts:
    """One series' test windows and the model's forecasts, in the units of `y`."""

    unique_id: str
    ds: npt.NDArray[np.datetime64]
    y: npt.NDArray[np.float64]
    origins: npt.NDArray[np.int64]
    targets: npt.NDArray[np.float64]
    forecasts: npt.NDArray[np.float64]
    train: npt.NDArray[np.float64]
    season: int


def _test_forecasts(prepared: PreparedData, results: Mapping[str, Any]) -> list[_SeriesForecasts]:
    """Every series' test windows with the model's forecasts (`forecast_part`'s results)."""
    out = []
    for uid, frame in prepared.data.frame.groupby("unique_id", sort=False):
        name = str(uid)
        split, spec = prepared.splits[name], prepared.spec.for_series(name)
        y = frame["y"].to_numpy(np.float64)
        periods = [p.period for p in spec.seasonality.profiles]
        out.append(
            _SeriesForecasts(
                unique_id=name,
                ds=frame["ds"].to_numpy(),
                y=y,
                origins=results[name].origins,
                targets=results[name].targets,
                forecasts=results[name].forecasts,
                train=y[split.train],
                season=min(periods, default=1),
            )
        )
    return out


def _extra_metrics(series: list[_SeriesForecasts]) -> dict[str, float]:
    """Window-weighted MASE and sMAPE over series, in the units of `y`."""
    from forecaster.metrics import mase, smape

    n = np.array([len(s.origins) for s in series], dtype=np.float64)
    values: dict[str, list[float]] = {"mase": [], "smape": []}
    for s in series:
        season = s.season if len(s.train) > s.season else 1
        try:
            values["mase"].append(mase(s.targets, s.forecasts, s.train, season))
        except ForecasterError:  # a flat training series: MASE undefined
            values["mase"].append(float("nan"))
        values["smape"].append(smape(s.targets, s.forecasts))
    return {k: float((n * np.array(v)).sum() / n.sum()) for k, v in values.items()}


def _plot_forecasts(series: list[_SeriesForecasts], lookback: int, path: Path) -> Path:
    """The last test window of each series (up to 4): history, actual and forecast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = series[:4]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.6 * len(shown)), squeeze=False)
    for ax, s in zip(axes[:, 0], shown, strict=True):
        r, h = int(s.origins[-1]), s.forecasts.shape[1]
        start = max(0, r - 3 * lookback)
        ax.plot(s.ds[start : r + h], s.y[start : r + h], color="0.3", lw=1, label="actual")
        ax.plot(s.ds[r : r + h], s.forecasts[-1], color="C1", lw=1.5, label="forecast")
        ax.axvline(s.ds[r], color="0.6", ls=":", lw=1)
        ax.set_title(f"{s.unique_id}: last test window", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.1, hspace=0.45)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_losses(history: Any, path: Path) -> Path:
    """Training and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in history.epochs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, history.train_losses, marker="o", label="train loss")
    ax.plot(epochs, history.val_losses, marker="o", label="validation MSE")
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.set_title(f"{history.method}: best epoch {history.best_epoch}", fontsize=9)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.1, hspace=0.45)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the tracker seam


class Tracker(Protocol):
    """What a job needs from a tracker (as accelerate's `GeneralTracker`)."""

    def start(self, run_name: str) -> str:
        """Start the run; returns its id."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters once."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at a step."""

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """End the run."""


class MlflowTracker:
    """An MLflow run fed by the trainer's events (`TrainCallback`): one point per epoch.

    Per epoch (step = epoch): `train_loss`, `val_loss`, `lr`, `epoch_seconds`, `peak_memory_mb`
    and, for feedback training, `spectral_radius`. At the end: `best_val_loss`, `best_epoch`,
    `train_wall_seconds`, `epochs_run`, and the model-side gate's `gate_*` values at the epoch
    each check ran (tag `switched_to_bptt_at_epoch` when the recheck switched methods).
    """

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        uri: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._started = 0.0

    def _id(self) -> str:
        if self.run_id is None:
            raise TrackingError("the MLflow run was not started (call start first)")
        return self.run_id

    def start(self, run_name: str) -> str:
        """Create the run (nested under the parent when there is one)."""
        tags = dict(self.tags)
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        with _mlflow_errors("starting run", self.uri):
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self._started = time.perf_counter()
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values cut to MLflow's limit), 100 per request."""
        from mlflow.entities import Param

        items = [
            Param(str(k)[:_MAX_PARAM_KEY], str(v)[:_MAX_PARAM_VALUE]) for k, v in params.items()
        ]
        with _mlflow_errors("logging params", self.uri):
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self._id(), params=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values cut to MLflow's limit)."""
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()]
        with _mlflow_errors("setting tags", self.uri):
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self._id(), tags=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Log finite metrics at `step` (None and NaN values are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and np.isfinite(v)
        ]
        with _mlflow_errors("logging metrics", self.uri):
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self._id(), metrics=items[i : i + _BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file."""
        with _mlflow_errors(f"uploading {path.name}", self.uri):
            self.client.log_artifact(self._id(), str(path), artifact_path)

    def log_json(self, data: Any, name: str) -> None:
        """Upload `data` as a JSON file."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")
            self.log_artifact(path)

    def on_epoch_end(self, record: Any, history: Any) -> None:
        """Trainer event: one metric point per epoch (`EpochRecord`)."""
        self.log_metrics(
            {
                "train_loss": record.train_loss,
                "val_loss": record.val_loss,
                "lr": record.lr,
                "epoch_seconds": record.seconds,
                "peak_memory_mb": record.peak_memory_mb,
                "spectral_radius": record.spectral_radius,
            },
            step=record.epoch,
        )

    def on_train_end(self, history: Any) -> None:
        """Trainer event: the run's summary (`TrainHistory`)."""
        self.log_metrics(
            {
                "best_val_loss": history.best_val_loss,
                "best_epoch": history.best_epoch,
                "train_wall_seconds": history.total_seconds,
                "epochs_run": len(history.epochs),
            }
        )
        self.set_tags({"method": history.method, "device": history.device})
        for report in history.model_gate:  # ALGORITHMS.md 5.5 checks 2-4
            self.log_metrics(
                {
                    "gate_cosine": report.cosine,
                    "gate_norm_ratio": report.norm_ratio,
                    "gate_jacobian_cv": report.jacobian_cv,
                    "gate_spectral_radius": report.spectral_radius,
                    "gate_passed": float(report.passed),
                },
                step=report.epoch,
            )
        if history.switch_epoch is not None:
            self.set_tags({"switched_to_bptt_at_epoch": history.switch_epoch})

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Log the run's wall time and end it."""
        if self.run_id is None:
            return
        self.log_metrics({"wall_seconds": time.perf_counter() - self._started})
        with _mlflow_errors("ending run", self.uri):
            self.client.set_terminated(self.run_id, status=status)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LoggedCandidate:
    """A trained model logged in a nested run, ready to register.

    Attributes:
        role: `feedback` (champion candidate) or `bptt` (fallback).
        run_id: the nested run.
        model_uri: the logged ONNX model (`models:/m-…`).
        bundle: the local bundle it came from.
        test_mse: the protocol's test MSE (the promotion score).
        eval_window: `evaluation_window` of the test windows it was scored on.
        input_example: the `[1, L, 1]` example used for the signature and the parity check.
    """

    role: str
    run_id: str
    model_uri: str
    bundle: Path
    test_mse: float
    eval_window: str
    input_example: npt.NDArray[np.float32] = field(repr=False)


@dataclass(frozen=True)
class PromotionDecision:
    """Whether an alias moved to a new version, and both scores (test MSE, lower is better)."""

    alias: str
    promoted: bool
    candidate_version: str
    previous_version: str | None
    candidate_score: float
    previous_score: float | None
    reason: str


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version as an operator sees it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    status: str
    created_ms: int
    tags: dict[str, str]


def _version_info(version: Any) -> VersionInfo:
    return VersionInfo(
        name=version.name,
        version=str(version.version),
        aliases=tuple(getattr(version, "aliases", ()) or ()),
        run_id=version.run_id,
        source=version.source,
        status=str(version.status),
        created_ms=int(version.creation_timestamp or 0),
        tags=dict(version.tags or {}),
    )


# --------------------------------------------------------------------------- tracking and runs


@dataclass
class Tracking:
    """A connection to a tracking server/store and the experiment of one config."""

    target: TrackingTarget
    client: Any
    experiment_id: str
    config_name: str

    @property
    def uri(self) -> str:
        """The tracking URI in use."""
        return self.target.uri

    def start_retrain(
        self,
        run_name: str | None = None,
        *,
        system_metrics: bool = False,
        owner: RetrainOwner | None = None,
    ) -> RetrainRun:
        """Start the parent run of one retrain (nested runs hang under it).

        `owner` tags the parent and nested runs with the output folder and the lock holder, so
        that a later retrain of the same folder can close the runs this one leaves open if it
        is killed (`close_abandoned`).
        """
        owner_tags = owner.tags() if owner is not None else {}
        tracker = MlflowTracker(
            self.client,
            self.experiment_id,
            self.uri,
            tags={"config": self.config_name, "kind": "retrain", **owner_tags},
        )
        tracker.start(run_name or f"retrain-{time.strftime('%Y%m%dT%H%M%S')}")
        monitor = None
        if system_metrics:
            monitor = _start_system_metrics(tracker._id(), self.uri)
        commit = _git_commit()
        if commit:
            tracker.set_tags({"git_commit": commit})
        return RetrainRun(tracking=self, parent=tracker, monitor=monitor, owner_tags=owner_tags)

    def close_abandoned(self, owner: RetrainOwner) -> list[str]:
        """Mark KILLED the runs an earlier retrain of `owner`'s folder left RUNNING; their ids.

        Only one retrain holds a folder's lock at a time, so while `owner` holds it any run of
        the same folder that is still RUNNING under another lock holder belongs to a retrain
        that died (SIGKILL, a lost node) without ending its runs.
        """
        query = (
            f"attributes.status = 'RUNNING' and tags.`{_OWNER_FOLDER_TAG}` = '{owner.folder_id}'"
        )
        with _mlflow_errors("searching abandoned runs", self.uri):
            runs = self.client.search_runs([self.experiment_id], filter_string=query)
        closed = []
        for found in runs:
            holder = found.data.tags.get(_OWNER_LOCK_TAG)
            if holder == owner.lock:
                continue
            with _mlflow_errors("closing an abandoned run", self.uri):
                self.client.set_tag(found.info.run_id, "retrain.closed_by", owner.lock)
                self.client.set_terminated(found.info.run_id, status="KILLED")
            closed.append(found.info.run_id)
        if closed:
            logger.warning(
                "marked %d run(s) of an earlier retrain of %s that did not end as KILLED: %s",
                len(closed),
                owner.folder,
                ", ".join(closed),
            )
        return closed


_OWNER_FOLDER_TAG = "retrain.folder_id"
_OWNER_LOCK_TAG = "retrain.lock"


@dataclass(frozen=True)
class RetrainOwner:
    """Which retrain made a run: its output folder and the lock holder (`host:pid:started`)."""

    folder: Path
    lock: str

    @property
    def folder_id(self) -> str:
        """A filter-safe id of the folder (sha256 of its absolute path, 16 hex digits)."""
        return hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        """The run tags that identify the owner."""
        return {
            "retrain.output_dir": str(self.folder.resolve()),
            _OWNER_FOLDER_TAG: self.folder_id,
            _OWNER_LOCK_TAG: self.lock,
        }


def _start_system_metrics(run_id: str, uri: str) -> Any:
    """CPU/memory (GPU with pynvml) every 2 s into the parent run; None without psutil."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=2, tracking_uri=uri)
        monitor.start()
    except Exception as exc:  # psutil missing or a platform without the probes: degrade
        logger.warning("system metrics disabled: %s", exc)
        return None
    return monitor


def open_tracking(config: Config, uri: str | None = None) -> Tracking:
    """Connect to the resolved tracking URI and get (or create) the config's experiment.

    Raises:
        TrackingError: the server is unreachable or the store refuses the experiment.
    """
    from mlflow import MlflowClient

    target = resolve_tracking(config.output_dir, uri, experiment=config.name)
    _check_reachable(target.uri)
    with _mlflow_errors(f"opening experiment '{config.name}'", target.uri):
        client = MlflowClient(tracking_uri=target.uri, registry_uri=target.uri)
        experiment = client.get_experiment_by_name(config.name)
        if experiment is None:
            experiment_id = client.create_experiment(
                config.name, artifact_location=target.artifact_location
            )
        else:
            experiment_id = experiment.experiment_id
    shown = redact(target.uri, target.uri)
    logger.info("tracking %s (%s), experiment '%s'", shown, target.source, config.name)
    return Tracking(
        target=target, client=client, experiment_id=experiment_id, config_name=config.name
    )


@dataclass
class RetrainRun:
    """The parent run of one retrain; creates nested runs, logs them, registers and promotes."""

    tracking: Tracking
    parent: MlflowTracker
    monitor: Any = None
    owner_tags: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The parent run's id."""
        return self.parent._id()

    def child(self, role: str, **tags: str) -> MlflowTracker:
        """A started nested run; pass it to `run_training(callbacks=[...])`."""
        t = self.tracking
        tracker = MlflowTracker(
            t.client,
            t.experiment_id,
            t.uri,
            parent_run_id=self.run_id,
            tags={"role": role, "config": t.config_name, **self.owner_tags, **tags},
        )
        tracker.start(role)
        return tracker

    def log_data(self, config: Config, prepared: PreparedData) -> dict[str, Any]:
        """On the parent run: flattened config, data fingerprint, stationarity and gate decision."""
        fingerprint = data_fingerprint(prepared)
        decision = prepared.decision
        params = flatten_config(config)
        params.update(
            {
                "data.sha256": fingerprint["sha256"],
                "data.rows": fingerprint["rows"],
                "data.n_series": fingerprint["n_series"],
                "data.freq": fingerprint["freq"],
                "gate.method": decision.method,
                "gate.differences": decision.differences,
            }
        )
        for uid, info in fingerprint["series"].items():
            params[f"data.series.{uid}"] = f"{info['rows']} rows {info['start']}..{info['end']}"
        self.parent.log_params(params)
        self.parent.set_tags(
            {
                "data_sha256": fingerprint["sha256"],
                "gate": decision.method,
                "gate_reason": decision.reason,
                "model_name": config.model.name,
            }
        )
        self.parent.log_metrics({"gate.pass_fraction": decision.pass_fraction})
        self.parent.log_json(fingerprint, "data_fingerprint.json")
        self.parent.log_json(decision.to_dict(), STATIONARITY_FILE)
        return fingerprint

    def log_training(
        self,
        tracker: MlflowTracker,
        config: Config,
        prepared: PreparedData,
        outcome: Any,
        *,
        role: str,
        wall_seconds: float | None = None,
        checkpoint: Callable[[str], None] | None = None,
    ) -> LoggedCandidate:
        """Log a finished `TrainOutcome` into its nested run and end that run.

        `checkpoint(f"{role}_log_model")` is called once the metrics, plots and bundle files are
        uploaded and before the ONNX model is (a hook for the retrain job's crash tests).

        Logs the config as params, val/test MSE, MAE, window counts, test MASE and sMAPE, the
        training wall time, the loss curve and forecast-vs-actual PNGs, the bundle's JSON files
        and the ONNX window model (onnx flavour, signature and `[1, L, 1]` input example; the
        step graph and JSON files ride along as extra files).
        """

        bundle: Path = outcome.bundle
        lookback, horizon = config.window.lookback, config.window.horizon
        tracker.log_params(flatten_config(config))
        tracker.log_params({"method": outcome.method, "method_reason": outcome.method_reason})
        metrics: dict[str, float | None] = {}
        for part, values in outcome.evaluations.items():
            for key, value in values.items():
                metrics[f"{part}_{key}"] = value
        results = outcome.test_forecasts
        if results is None:  # an outcome from elsewhere: forecast the test windows again
            from forecaster.inference import open_session
            from pipelines.train import forecast_part, model_inputs

            session = open_session(bundle / MODEL_FILE, device="cpu")
            results = forecast_part(session, prepared, model_inputs(prepared), horizon, "test")
        series = _test_forecasts(prepared, results)
        metrics.update({f"test_{k}": v for k, v in _extra_metrics(series).items()})
        metrics["train_wall_seconds"] = outcome.history.total_seconds
        if wall_seconds is not None:
            metrics["job_wall_seconds"] = wall_seconds
        tracker.log_metrics(metrics)
        eval_window = evaluation_window(prepared, lookback, horizon)
        tracker.set_tags(
            {
                "method": outcome.method,
                "device": outcome.history.device,
                "model_name": config.model.name,
                "eval_window": eval_window,
                **({"git_commit": c} if (c := _git_commit()) else {}),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            tracker.log_artifact(_plot_losses(outcome.history, folder / "loss_curve.png"), "plots")
            tracker.log_artifact(
                _plot_forecasts(series, lookback, folder / "forecast_vs_actual.png"), "plots"
            )
        for name in (PREPROCESSING_FILE, METADATA_FILE, STATIONARITY_FILE, CALIBRATION_FILE):
            if (bundle / name).is_file():
                tracker.log_artifact(bundle / name, "bundle")
        if checkpoint is not None:
            checkpoint(f"{role}_log_model")
        example = _input_example(prepared, lookback)
        model_uri = self._log_onnx(
            tracker,
            bundle / MODEL_FILE,
            example,
            extra=[
                bundle / n
                for n in (STEP_MODEL_FILE, PREPROCESSING_FILE, METADATA_FILE, CALIBRATION_FILE)
            ],
        )
        tracker.finish()
        test_mse = float(outcome.evaluations["test"]["mse"])
        self.parent.log_metrics({f"{role}.test_mse": test_mse})
        return LoggedCandidate(
            role=role,
            run_id=tracker._id(),
            model_uri=model_uri,
            bundle=bundle,
            test_mse=test_mse,
            eval_window=eval_window,
            input_example=example,
        )

    def _log_onnx(
        self,
        tracker: MlflowTracker,
        path: Path,
        example: npt.NDArray[np.float32],
        extra: list[Path],
    ) -> str:
        import mlflow
        import mlflow.onnx
        import onnx
        import onnxruntime
        from mlflow.models import infer_signature

        from forecaster.inference import forecast_window, open_session

        output = forecast_window(open_session(path, device="cpu"), example)
        signature = infer_signature(example, output)
        uri = self.tracking.uri
        with (
            _mlflow_errors("logging the ONNX model", uri),
            _fluent(uri),
            mlflow.start_run(run_id=tracker._id()),
        ):
            info = mlflow.onnx.log_model(
                onnx.load(str(path)),
                name=MODEL_NAME_IN_RUN,
                signature=signature,
                input_example=example,
                extra_files=[str(p) for p in extra if p.is_file()],
                save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
                # Inferring requirements imports the model in a subprocess (seconds per model).
                pip_requirements=[
                    f"onnx=={onnx.__version__}",
                    f"onnxruntime=={onnxruntime.__version__}",
                ],
            )
        return str(info.model_uri)

    def log_baselines(self, scores: Mapping[str, Mapping[str, float]], part: str = "test") -> None:
        """One nested run per baseline with its metrics, beside the models in the UI."""
        for name, values in scores.items():
            tracker = self.child(f"baseline:{name}", baseline=name)
            tracker.log_params({"baseline": name})
            tracker.log_metrics({f"{part}_{k}": v for k, v in values.items()})
            tracker.finish()
            self.parent.log_metrics({f"baseline.{name}.{part}_mse": values["mse"]})

    def register_and_promote(
        self,
        candidate: LoggedCandidate,
        alias: Alias,
        prepared: PreparedData,
        horizon: int,
        checkpoint: Callable[[str], None] | None = None,
    ) -> PromotionDecision:
        """Register the candidate, verify the registered copy, and move `alias` if it is better.

        The holder of `alias` is scored on the candidate's test windows: its logged test MSE when
        its `eval_window` tag matches, else its registered ONNX model with its own preprocessing
        re-evaluated on `prepared`. The decision is logged on the parent run (tags
        `promotion.<alias>.*` and `promotions/<alias>_v<version>.json`).

        Raises:
            TrackingError: registration, download or verification failed; the alias is untouched.
        """
        client, uri, name = self.tracking.client, self.tracking.uri, self.tracking.config_name
        step = checkpoint if checkpoint is not None else (lambda _: None)
        version = _register(client, uri, name, candidate)
        step(f"{alias}_registered")
        _verify(client, uri, name, version, candidate)
        step(f"{alias}_verified")
        previous = _alias_holder(client, uri, name, alias)
        previous_score: float | None = None
        if previous is None:
            promoted, reason = True, f"no '{alias}' yet"
        else:
            scored = _score_holder(client, uri, previous, candidate, prepared, horizon)
            if isinstance(scored, list):
                promoted = True
                reason = (
                    f"v{previous.version} cannot forecast series {scored} of this config "
                    "(added since it was trained); the candidate covers every series"
                )
            else:
                previous_score = scored
                promoted = candidate.test_mse < previous_score
                comparison = "<" if promoted else ">="
                reason = (
                    f"candidate test MSE {candidate.test_mse:.6g} {comparison} "
                    f"v{previous.version} {previous_score:.6g} on the same test windows"
                )
        if promoted:
            _move_alias(client, uri, name, alias, version)
        decision = PromotionDecision(
            alias=alias,
            promoted=promoted,
            candidate_version=version,
            previous_version=str(previous.version) if previous is not None else None,
            candidate_score=candidate.test_mse,
            previous_score=previous_score,
            reason=reason,
        )
        self._log_decision(decision)
        logger.info("%s: %s v%s (%s)", alias, "promoted" if promoted else "kept", version, reason)
        return decision

    def _log_decision(self, decision: PromotionDecision) -> None:
        """Tags `promotion.<alias>.*` (the latest decision per alias, both scores) and a JSON
        artifact per decision, so a run that decides twice keeps both records."""
        prefix = f"promotion.{decision.alias}"
        self.parent.set_tags(
            {
                f"{prefix}.promoted": decision.promoted,
                f"{prefix}.candidate_version": decision.candidate_version,
                f"{prefix}.previous_version": decision.previous_version,
                f"{prefix}.candidate_score": repr(decision.candidate_score),
                f"{prefix}.previous_score": repr(decision.previous_score),
                f"{prefix}.reason": decision.reason,
            }
        )
        name = f"{decision.alias}_v{decision.candidate_version}.json"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(asdict(decision), indent=2) + "\n")
            self.parent.log_artifact(path, "promotions")

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Stop system metrics and end the parent run."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        self.parent.finish(status)

    def __enter__(self) -> RetrainRun:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


# --------------------------------------------------------------------------- registry internals


def _register(client: Any, uri: str, name: str, candidate: LoggedCandidate) -> str:
    from mlflow.exceptions import MlflowException

    with _mlflow_errors(f"registering '{name}'", uri):
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        import mlflow

        with _fluent(uri):
            version = mlflow.register_model(
                candidate.model_uri,
                name,
                tags={
                    "role": candidate.role,
                    "test_mse": repr(candidate.test_mse),
                    "eval_window": candidate.eval_window,
                    "run_id": candidate.run_id,
                    "verified": "false",
                },
            )
    return str(version.version)


def _download(uri: str, name: str, version: str, folder: Path) -> Path:
    """Download a registered version's model folder; returns the folder holding `model.onnx`."""
    import mlflow.artifacts

    # `models:/` downloads resolve the registry from the global URI, not from `registry_uri`.
    with _mlflow_errors(f"downloading {name} v{version}", uri), _fluent(uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(folder)
        )
    found = find_bundle(Path(local))
    if found is None:
        raise TrackingError(f"{name} v{version} at {uri}: no model.onnx in the registered model")
    return found


def _verify(client: Any, uri: str, name: str, version: str, candidate: LoggedCandidate) -> None:
    """The registered copy must load and reproduce the local bundle's forecast (≤ 1e-5)."""
    from forecaster.inference import forecast_window, open_session

    with tempfile.TemporaryDirectory() as tmp:
        folder = _download(uri, name, version, Path(tmp))
        try:
            remote = forecast_window(
                open_session(folder / MODEL_FILE, device="cpu"), candidate.input_example
            )
        except ForecasterError as exc:
            raise TrackingError(f"{name} v{version} at {uri} does not load: {exc}") from exc
    local = forecast_window(
        open_session(candidate.bundle / MODEL_FILE, device="cpu"), candidate.input_example
    )
    gap = float(np.max(np.abs(remote - local)))
    if not gap <= PARITY_TOLERANCE:
        raise TrackingError(
            f"{name} v{version} at {uri}: registered model differs from the bundle by {gap:.3g} "
            f"(> {PARITY_TOLERANCE})"
        )
    with _mlflow_errors(f"tagging {name} v{version}", uri):
        client.set_model_version_tag(name, version, "verified", "true")
        client.set_model_version_tag(name, version, "parity_max_abs", f"{gap:.3g}")


def _alias_holder(client: Any, uri: str, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    with _mlflow_errors(f"reading alias '{alias}' of '{name}'", uri):
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise


def _score_holder(
    client: Any,
    uri: str,
    holder: Any,
    candidate: LoggedCandidate,
    prepared: PreparedData,
    horizon: int,
) -> float | list[str]:
    """The alias holder's test MSE on the candidate's test windows; or, when its preprocessing
    does not know some of the candidate's series (added to the config since), those series."""
    tags = dict(holder.tags or {})
    if tags.get("eval_window") == candidate.eval_window and "test_mse" in tags:
        return float(tags["test_mse"])
    from forecaster.inference import open_session
    from forecaster.transform import PreprocessingSpec
    from pipelines.train import evaluate_session, model_inputs, summary

    with tempfile.TemporaryDirectory() as tmp:
        folder = _download(uri, holder.name, str(holder.version), Path(tmp))
        specs = sorted(Path(tmp).rglob(PREPROCESSING_FILE))
        if not specs:
            raise TrackingError(
                f"{holder.name} v{holder.version} at {uri}: no {PREPROCESSING_FILE} to re-score "
                f"it on the new test windows"
            )
        spec = PreprocessingSpec.load(specs[0])
        missing = [uid for uid in prepared.splits if uid not in spec.series]
        if missing:
            return missing
        own = PreparedData(
            data=prepared.data,
            splits=prepared.splits,
            spec=spec,
            decision=prepared.decision,
        )
        session = open_session(folder / MODEL_FILE, device="cpu")
        score = summary(evaluate_session(session, own, model_inputs(own), horizon, "test"))
    return float(score["mse"])


def _history(client: Any, name: str, alias: str) -> list[str]:
    model = client.get_registered_model(name)
    raw = dict(model.tags or {}).get(HISTORY_TAG.format(alias=alias))
    return list(json.loads(raw)) if raw else []


def _move_alias(client: Any, uri: str, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version` and append it to the alias' history (a registered-model tag)."""
    with _mlflow_errors(f"moving alias '{alias}' of '{name}' to v{version}", uri):
        history = _history(client, name, alias)
        holder = _alias_holder(client, uri, name, alias)
        if holder is not None and (not history or history[-1] != str(holder.version)):
            history.append(str(holder.version))
        client.set_registered_model_alias(name, alias, version)
        if not history or history[-1] != version:
            history.append(version)
        client.set_registered_model_tag(
            name, HISTORY_TAG.format(alias=alias), json.dumps(history[-_HISTORY_KEEP:])
        )
        if holder is not None and str(holder.version) != version:
            client.set_model_version_tag(name, version, f"previous.{alias}", str(holder.version))


# --------------------------------------------------------------------------- operator functions


def _client(uri: str | None, output_dir: Path) -> tuple[Any, str]:
    from mlflow import MlflowClient

    target = resolve_tracking(output_dir, uri)
    _check_reachable(target.uri)
    return MlflowClient(tracking_uri=target.uri, registry_uri=target.uri), target.uri


def list_versions(
    name: str, *, uri: str | None = None, output_dir: Path = Path("runs")
) -> list[VersionInfo]:
    """Every version of a registered model, newest first."""
    client, resolved = _client(uri, output_dir)
    with _mlflow_errors(f"listing versions of '{name}'", resolved):
        versions = client.search_model_versions(f"name = '{name}'")
        infos = [_version_info(client.get_model_version(name, v.version)) for v in versions]
    return sorted(infos, key=lambda v: int(v.version), reverse=True)


def show(
    name: str, alias_or_version: str, *, uri: str | None = None, output_dir: Path = Path("runs")
) -> VersionInfo:
    """One version, by number (`3`) or alias (`champion`)."""
    client, resolved = _client(uri, output_dir)
    with _mlflow_errors(f"reading '{name}' {alias_or_version}", resolved):
        if alias_or_version.isdigit():
            return _version_info(client.get_model_version(name, alias_or_version))
        return _version_info(client.get_model_version_by_alias(name, alias_or_version))


def promote(
    name: str,
    version: str,
    alias: str,
    *,
    uri: str | None = None,
    output_dir: Path = Path("runs"),
) -> VersionInfo:
    """Point `alias` at `version` by hand, after checking that its ONNX model loads."""
    from forecaster.inference import open_session

    client, resolved = _client(uri, output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _download(resolved, name, version, Path(tmp))
        try:
            open_session(folder / MODEL_FILE, device="cpu")
        except ForecasterError as exc:
            raise TrackingError(f"{name} v{version} at {resolved} does not load: {exc}") from exc
    _move_alias(client, resolved, name, alias, version)
    return show(name, version, uri=resolved)


def rollback(
    name: str, alias: str, *, uri: str | None = None, output_dir: Path = Path("runs")
) -> VersionInfo:
    """Point `alias` back at the version that held it before the current one.

    Raises:
        TrackingError: the alias has no earlier holder.
    """
    client, resolved = _client(uri, output_dir)
    with _mlflow_errors(f"rolling back '{alias}' of '{name}'", resolved):
        history = _history(client, name, alias)
        current = _alias_holder(client, resolved, name, alias)
        if current is not None and history and history[-1] != str(current.version):
            history.append(str(current.version))
        if len(history) < 2:
            raise TrackingError(f"'{name}' alias '{alias}' has no earlier version to roll back to")
        history.pop()
        target = history[-1]
        client.set_registered_model_alias(name, alias, target)
        client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))
    logger.info("%s: rolled back to v%s", alias, target)
    return show(name, target, uri=resolved)
