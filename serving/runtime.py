"""Resolve and load the champion and fallback models once, and answer forecasts with them.

A model is a bundle folder (pipelines/train.py `write_bundle`, or a registry download where the
JSON files and the step graph sit in `extra_files/`): `model.onnx`, `preprocessing.json`,
`metadata.json` and optionally `model_step.onnx` and `calibration.json`. Sessions are opened and
warmed up when a model set is built; a request reads the current set once, so a reload that swaps
in a new set never disturbs requests in flight. Every series of a request runs in one ORT call,
which concurrent requests share (serving/batching.py); on CUDA, small calls run on a CPU session
of the same model (`cuda_min_rows`). The per-series work (transform, inversion, bounds) runs on
whole arrays of same-shaped series at once.

Champion → fallback: when the champion did not load, raises, or returns non-finite values, the
fallback answers and the `Observer` hears why. Input problems raise `DataError`/`ServingError`
(4xx) before any model runs and never trigger the fallback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, ValidationError

from forecaster.bundle import METADATA_FILE, MODEL_FILE, PREPROCESSING_FILE, STEP_MODEL_FILE
from forecaster.calibration import CALIBRATION_FILE, Calibration
from forecaster.errors import DataError, ForecasterError, ModelError, ModelUnavailable
from forecaster.inference import (
    forecast_step,
    forecast_window,
    initial_state,
    model_metadata,
    open_session,
)
from forecaster.redaction import redact
from forecaster.transform import (
    PreprocessingSpec,
    SeriesTransform,
    TransformBatch,
    format_timestamp,
    inverse_forecast_steps,
    shape_key,
    steps_since_anchor,
    transform,
    transform_steps,
)
from serving.batching import Arrival, MicroBatcher
from serving.schemas import (
    AnomalySeriesInput,
    ForecastRequest,
    ForecastResponse,
    ModelInfo,
    SeriesForecast,
    SeriesInput,
)
from serving.settings import ServingSettings
from serving.state import Carried, StateCache, new_points

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE",
    "LoadedModel",
    "ModelSet",
    "Observer",
    "PreparedBatch",
    "Runtime",
    "Status",
    "forgets_within_lookback",
    "load_model",
    "one_step_forecasts",
    "prefer_cpu",
    "prepare_batch",
    "request_timestamps",
]

Role = Literal["champion", "fallback"]
Status = Literal["ready", "degraded", "unavailable"]
_EXTRA = "extra_files"  # where MLflow's onnx flavour keeps a logged model's extra files
_CUDA = "CUDAExecutionProvider"
_T = TypeVar("_T")


def prefer_cpu(providers: Sequence[str], rows: int, cuda_min_rows: int) -> bool:
    """Whether a call of `rows` series should run on the CPU session of a model whose main
    session has `providers`: only when that session runs on CUDA and the call is smaller than
    `cuda_min_rows` (ORT's CUDA GRU costs about 28 ms whatever the batch up to hundreds of
    series on an H100, the CPU one 3 ms for one series)."""
    return bool(providers) and providers[0] == _CUDA and rows < cuda_min_rows


class Observer(Protocol):
    """What the runtime reports to the metrics layer."""

    def fallback(self, reason: str) -> None:
        """The fallback answered a request; `reason` is a short label."""

    def inference(self, role: Role, seconds: float) -> None:
        """One ORT call of `role` took `seconds`."""

    def carried(self, hits: int, misses: int) -> None:
        """Series answered from carried state (`hits`) or from their whole window (`misses`)."""


class _NullObserver:
    def fallback(self, reason: str) -> None:
        return None

    def inference(self, role: Role, seconds: float) -> None:
        return None

    def carried(self, hits: int, misses: int) -> None:
        return None


class _Metadata(BaseModel):
    """The fields of `metadata.json` serving reads (the rest is training history)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    lookback: int
    horizon: int
    freq: str | None = None
    training_method: str | None = None
    model: dict[str, Any] = {}
    metrics: dict[str, dict[str, float]] = {}


@dataclass(frozen=True)
class _Grid:
    """What the request path reads of a series' transform again and again, computed once."""

    anchor_ns: int
    step_ns: int
    shape: tuple[int, bool, tuple[int, ...]]  # `shape_key`: which series transform together

    @classmethod
    def of(cls, spec: SeriesTransform) -> _Grid:
        return cls(anchor_ns=spec.anchor_ns, step_ns=spec.step_ns, shape=shape_key(spec))


@dataclass(frozen=True)
class LoadedModel:
    """An opened, warmed-up model with its preprocessing and (optional) calibration."""

    role: Role
    source: str
    version: str | None
    folder: Path
    window: ort.InferenceSession
    step: ort.InferenceSession | None
    spec: PreprocessingSpec
    metadata: _Metadata
    calibration: Calibration | None
    fingerprint: str
    cpu_window: ort.InferenceSession | None = None  # small calls when `window` runs on CUDA
    cuda_min_rows: int = 0
    grids: dict[str, _Grid] = field(default_factory=dict)  # of every series of `spec`
    # Whether a carried state answers as the window does (`forgets_within_lookback`): only then
    # does the state cache serve this model.
    carries_state: bool = False

    def window_for(self, rows: int) -> ort.InferenceSession:
        """The window session a call of `rows` series runs on (see `prefer_cpu`)."""
        if self.cpu_window is not None and prefer_cpu(
            self.window.get_providers(), rows, self.cuda_min_rows
        ):
            return self.cpu_window
        return self.window

    @property
    def key(self) -> str:
        """Identity of this model's files: carried states are valid for this key only."""
        return f"{self.role}|{self.source}|{self.fingerprint}"

    @property
    def lookback(self) -> int:
        """Input window length in steps."""
        return self.metadata.lookback

    @property
    def horizon(self) -> int:
        """Largest forecast horizon in steps."""
        return self.metadata.horizon

    def info(self) -> ModelInfo:
        """What `/model` shows about this model."""
        calibration = self.calibration
        return ModelInfo(
            role=self.role,
            loaded=True,
            source=self.source,
            version=self.version,
            model=str(self.metadata.model.get("name")) if self.metadata.model else None,
            training_method=self.metadata.training_method,
            lookback=self.lookback,
            horizon=self.horizon,
            freq=self.metadata.freq,
            series=sorted(self.spec.series),
            calibrated=calibration is not None,
            levels=list(calibration.levels) if calibration is not None else [],
            metrics=self.metadata.metrics,
            providers=list(self.window.get_providers()),
        )


def _bundle_file(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/extra_files/name` in a registry download; the first that exists."""
    direct = folder / name
    extra = folder / _EXTRA / name
    return extra if not direct.exists() and extra.exists() else direct


def _fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of the bundle's files: changes when any is replaced."""
    parts = []
    for name in (MODEL_FILE, STEP_MODEL_FILE, PREPROCESSING_FILE, METADATA_FILE, CALIBRATION_FILE):
        path = _bundle_file(folder, name)
        if path.is_file():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _read_metadata(path: Path) -> _Metadata:
    try:
        return _Metadata.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelUnavailable(f"{path} does not exist", field="metadata") from None
    except (OSError, ValueError, ValidationError) as exc:
        raise ModelUnavailable(f"{path} is not valid bundle metadata: {exc}") from exc


# A carried state must answer as the whole window does, within this on the model's scale.
CARRY_TOLERANCE = 1e-4


def forgets_within_lookback(step: ort.InferenceSession, lookback: int, role: str = "model") -> bool:
    """Whether the step graph's answer from a state carried over a long history equals its
    answer from the last `lookback` points alone (the window's), within `CARRY_TOLERANCE`.

    A carried state has seen every point since the series entered the cache; the window, only
    the last `lookback`. They agree when the model forgets faster than `lookback` steps (a
    gated cell trained on those windows, usually); a longer memory (an SCRN context with `α`
    near 1 at a short look-back) would make a stream's answers depend on the cache's history
    and differ between replicas. Probed at load on standard-normal inputs (the model's scale):
    4 series of `3 · lookback` points, carried in chunks, against the window of the last
    `lookback`; a model that fails is served from windows only, with a WARNING.
    """
    rng = np.random.default_rng(0)
    steps = 3 * lookback
    x = rng.standard_normal((4, steps, 1)).astype(np.float32)
    state = initial_state(step, len(x))
    carried = None
    for start in range(0, steps, lookback):
        result = forecast_step(step, x[:, start : start + lookback], state)
        carried, state = result.forecast, result.state
    window = forecast_window(step, x[:, -lookback:])
    gap = float(np.max(np.abs(np.asarray(carried) - window)))
    if gap <= CARRY_TOLERANCE:
        return True
    logger.warning(
        "%s: carried state off for this model: after %d points its forecast differs from the "
        "window of the last %d by %.3g (> %g; its memory outlasts the look-back), so streams "
        "are answered from whole windows",
        role,
        steps,
        lookback,
        gap,
        CARRY_TOLERANCE,
    )
    return False


def load_model(
    role: Role,
    folder: Path,
    *,
    source: str | None = None,
    version: str | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    intra_op_threads: int | None = None,
    cuda_min_rows: int = 0,
) -> LoadedModel:
    """Open a bundle folder's window model, read its JSON files and warm the session up; on
    CUDA with `cuda_min_rows` > 0, also a CPU session for calls of fewer series.

    A local bundle (no registry `version`) can be swapped while it is read (a retrain writing
    it, `forecaster.files.replace_dir`): its files' fingerprint is taken before and after, and a
    load that straddled a swap is done again, so the model never mixes two bundles' files.

    Raises:
        ModelUnavailable: a file is missing or invalid, the model's metadata disagrees with the
            bundle's, the warm-up forecast is not finite, or the folder changed during each of
            `_LOAD_TRIES` loads.
    """
    folder = Path(folder)
    for _ in range(_LOAD_TRIES):
        before = version or _fingerprint(folder)
        model = _load_once(
            role, folder, source, version, device, intra_op_threads, cuda_min_rows, before
        )
        if version is not None or _fingerprint(folder) == before:
            return model
        logger.info("%s: bundle %s changed while it was loaded; loading it again", role, folder)
    raise ModelUnavailable(
        f"bundle folder {str(folder)!r} changed during each of {_LOAD_TRIES} loads", field=role
    )


_LOAD_TRIES = 3


def _load_once(
    role: Role,
    folder: Path,
    source: str | None,
    version: str | None,
    device: Literal["auto", "cpu", "cuda"],
    intra_op_threads: int | None,
    cuda_min_rows: int,
    fingerprint: str,
) -> LoadedModel:
    """One read of the bundle (`load_model`); `fingerprint` identifies what it read."""
    if not folder.is_dir():
        raise ModelUnavailable(f"bundle folder {str(folder)!r} does not exist", field=role)
    metadata = _read_metadata(_bundle_file(folder, METADATA_FILE))
    try:
        spec = PreprocessingSpec.load(_bundle_file(folder, PREPROCESSING_FILE))
    except DataError as exc:
        raise ModelUnavailable(exc.message, field=role) from exc
    calibration_path = _bundle_file(folder, CALIBRATION_FILE)
    calibration = None
    if calibration_path.is_file():
        try:
            calibration = Calibration.load(calibration_path)
        except ModelError as exc:
            raise ModelUnavailable(exc.message, field=role) from exc
    session = open_session(_bundle_file(folder, MODEL_FILE), device, intra_op_threads)
    step_path = _bundle_file(folder, STEP_MODEL_FILE)
    step = open_session(step_path, device, intra_op_threads) if step_path.is_file() else None
    for name, graph in ((MODEL_FILE, session), (STEP_MODEL_FILE, step)):
        meta = model_metadata(graph) if graph is not None else {}
        for key in ("lookback", "horizon") if graph is not None else ():
            if meta.get(key) != str(getattr(metadata, key)):
                raise ModelUnavailable(
                    f"{folder}: {name} has {key} {meta.get(key)!r} but metadata.json says "
                    f"{getattr(metadata, key)}",
                    field=role,
                )
    if calibration is not None and calibration.horizon < metadata.horizon:
        raise ModelUnavailable(
            f"{folder}: calibration covers {calibration.horizon} steps, the model forecasts "
            f"{metadata.horizon}",
            field=role,
        )
    # The first run allocates and plans; do it now rather than in the first request.
    warm = forecast_window(session, np.zeros((1, metadata.lookback, 1), dtype=np.float32))
    if not np.isfinite(warm).all():
        raise ModelUnavailable(f"{folder}: the model emits non-finite values", field=role)
    carries_state = step is not None and forgets_within_lookback(step, metadata.lookback, role)
    cpu_window = None
    if prefer_cpu(session.get_providers(), 0, cuda_min_rows):
        cpu_window = open_session(_bundle_file(folder, MODEL_FILE), "cpu", intra_op_threads)
        forecast_window(cpu_window, np.zeros((1, metadata.lookback, 1), dtype=np.float32))
    logger.info("loaded %s from %s (%s)", role, source or folder, session.get_providers()[0])
    return LoadedModel(
        role=role,
        source=source or str(folder),
        version=version,
        folder=folder,
        window=session,
        step=step,
        spec=spec,
        metadata=metadata,
        calibration=calibration,
        fingerprint=fingerprint,
        cpu_window=cpu_window,
        carries_state=carries_state,
        cuda_min_rows=cuda_min_rows,
        grids={uid: _Grid.of(series) for uid, series in spec.series.items()},
    )


@dataclass(frozen=True)
class _Failed:
    role: Role
    source: str
    error: str

    def info(self) -> ModelInfo:
        return ModelInfo(role=self.role, loaded=False, source=self.source, error=self.error)


@dataclass(frozen=True)
class ModelSet:
    """Champion and fallback as loaded at one moment (immutable; a reload builds a new one).

    `stale` says, per role, why the last reload could not refresh a model it kept serving (its
    registry alias could not be resolved or downloaded).
    """

    champion: LoadedModel | _Failed
    fallback: LoadedModel | _Failed
    loaded_at: str
    stale: dict[Role, str] = field(default_factory=dict)

    def loaded(self) -> list[LoadedModel]:
        """The loaded models, champion first."""
        return [m for m in (self.champion, self.fallback) if isinstance(m, LoadedModel)]

    def infos(self) -> list[ModelInfo]:
        """`/model`'s view of both roles; a kept model's `error` says why it was not refreshed."""
        infos = []
        for model in (self.champion, self.fallback):
            info = model.info()
            if model.role in self.stale:
                info = info.model_copy(update={"error": _stale(model.role, self.stale)})
            infos.append(info)
        return infos


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class _SeriesPlan:
    """One series on the model's scale: `x` is its window `[L]` (from a zero state) or, with a
    carried `state`, only its new points `[k]`; `tail` holds the raw values to keep after it."""

    unique_id: str
    spec: SeriesTransform
    grid: _Grid
    last_ns: int
    last_levels: npt.NDArray[np.float64]
    x: npt.NDArray[np.float32]
    state: npt.NDArray[np.float32] | None
    tail: npt.NDArray[np.float64]


@dataclass(frozen=True)
class PreparedBatch:
    """Every series of a request on one model's scale, and what inverting needs."""

    plans: list[_SeriesPlan]
    horizon: int
    level: float | None


def _timestamps_ns(
    series: SeriesInput | AnomalySeriesInput, step_ns: int, prefix: str
) -> npt.NDArray[np.int64]:
    """`[n]` integer ns, naive UTC; strictly increasing or a `DataError` naming the row."""
    if series.timestamps is None:
        if series.start is None:
            raise DataError(f"{prefix}: give 'timestamps' or 'start'", field=f"{prefix}.start")
        first = _naive_ns([series.start], f"{prefix}.start")[0]
        return first + np.arange(len(series.values), dtype=np.int64) * step_ns
    return _increasing_ns(series.timestamps, prefix)


def request_timestamps(
    series: SeriesInput | AnomalySeriesInput, prefix: str
) -> npt.NDArray[np.int64] | None:
    """A series' `timestamps` as `[n]` integer ns, naive UTC (None when it sends none).

    Raises:
        DataError: a timestamp out of range, repeated or before the previous one (field
            `<prefix>.timestamps`, the message names the row).
    """
    return None if series.timestamps is None else _increasing_ns(series.timestamps, prefix)


def _increasing_ns(timestamps: Sequence[datetime], prefix: str) -> npt.NDArray[np.int64]:
    """`timestamps` as integer ns, naive UTC; strictly increasing or a `DataError`."""
    ns = _naive_ns(timestamps, f"{prefix}.timestamps")
    steps = np.diff(ns)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        row = int(bad[0]) + 1
        what = "duplicates" if steps[row - 1] == 0 else "comes before"
        raise DataError(
            f"{prefix}.timestamps[{row}]: {format_timestamp(ns[row])} {what} the previous "
            f"timestamp {format_timestamp(ns[row - 1])}; timestamps must be strictly increasing",
            field=f"{prefix}.timestamps",
        )
    return ns


# Nanosecond timestamps cover 1677-09-21 to 2262-04-11; numpy wraps outside silently.
_FIRST, _LAST = datetime(1678, 1, 1), datetime(2262, 1, 1)


def _naive_ns(values: Sequence[datetime], field: str) -> npt.NDArray[np.int64]:
    naive = [v.astimezone(UTC).replace(tzinfo=None) if v.tzinfo else v for v in values]
    for row, value in enumerate(naive):
        if not _FIRST <= value < _LAST:
            where = f"{field}[{row}]" if field.endswith("timestamps") else field
            raise DataError(
                f"{where}: {value.isoformat()} is outside the supported range "
                f"{_FIRST.year}-{_LAST.year - 1}",
                field=where,
            )
    return np.array(naive, dtype="datetime64[ns]").astype(np.int64)


def _window_scaling(
    model: LoadedModel, values: npt.NDArray[np.float64], first_ns: int
) -> SeriesTransform:
    """A transform for a series the model was not fitted on: its own window's mean and scale."""
    reference = next(iter(model.spec.series.values()))
    d = reference.difference
    differenced = np.diff(values, n=d) if d else values
    with np.errstate(all="ignore"):
        center, scale = float(np.mean(differenced)), float(np.std(differenced))
    if not (np.isfinite(center) and np.isfinite(scale)):
        raise DataError("values overflow when scaled by their own window", field="y")
    return SeriesTransform(
        anchor=format_timestamp(first_ns),
        step_s=reference.step_s,
        n_train=len(values),
        scaling={"kind": "standard", "center": center, "scale": scale or 1.0},
        difference=d,
    )


def _require_finite(values: npt.NDArray[np.float64]) -> None:
    """Finite inputs can still overflow once detrended, scaled and cast to the model's float32."""
    if not (np.abs(values) <= np.finfo(np.float32).max).all():
        raise DataError(
            "values overflow once the preprocessing is applied; send values in the series' "
            "usual range",
            field="y",
        )


def _prefixed(exc: DataError, prefix: str) -> DataError:
    """The transform's error with the request field it concerns."""
    field = {"ds": "timestamps", "y": "values"}.get(exc.field or "", exc.field or "values")
    return DataError(f"{prefix}.{field}: {exc.message}", field=f"{prefix}.{field}")


def prepare_batch(
    request: ForecastRequest,
    model: LoadedModel,
    unknown_series: Literal["reject", "window_scaling"] = "reject",
    max_series: int = 1024,
    cache: StateCache | None = None,
) -> PreparedBatch:
    """Validate a request against `model` and transform every series' last window (or, for a
    series continuing a carried state in `cache`, only its new points).

    Raises:
        DataError: more than `max_series` series, a window is too short, timestamps are
            unsorted, duplicated, off the grid or not consecutive, a series is unknown (policy
            `reject`), a series id repeats, or the horizon exceeds the model's; the message
            and `field` name the request field.
        ModelError: the requested level is not calibrated.
    """
    if len(request.series) > max_series:
        raise DataError(
            f"series: {len(request.series)} series exceed the limit of {max_series} per request",
            field="series",
        )
    horizon = request.horizon if request.horizon is not None else model.horizon
    if horizon > model.horizon:
        raise DataError(
            f"horizon: {horizon} exceeds the model's horizon {model.horizon}", field="horizon"
        )
    level = None
    if model.calibration is not None:
        level = request.level if request.level is not None else model.calibration.levels[-1]
        model.calibration.level_index(level)  # ModelError naming the calibrated levels
    reference = next(iter(model.spec.series.values()))  # the grid and order all series share
    use_cache = cache is not None and cache.enabled and model.carries_state
    plans: list[_SeriesPlan | None] = []
    windows: list[_Window] = []  # whole windows, transformed together below
    seen: set[str] = set()
    for i, series in enumerate(request.series):
        prefix = f"series[{i}]"
        uid = series.unique_id
        if uid in seen:
            raise DataError(
                f"{prefix}.unique_id: {uid!r} appears more than once", field=f"{prefix}.unique_id"
            )
        seen.add(uid)
        spec = model.spec.series.get(uid)
        if spec is None and unknown_series == "reject":
            known = ", ".join(repr(k) for k in sorted(model.spec.series)[:10])
            raise DataError(
                f"{prefix}.unique_id: series {uid!r} is unknown to the model; known: {known}",
                field=f"{prefix}.unique_id",
            )
        d = (spec or reference).difference
        need = model.lookback + d
        n = len(series.values)
        step_ns = (spec or reference).step_ns
        all_ds = _timestamps_ns(series, step_ns, prefix)
        carried = cache.get((uid, model.key)) if use_cache and spec is not None else None
        if carried is not None and spec is not None:
            start = new_points(carried, all_ds, np.asarray(series.values, np.float64), step_ns)
            if start is not None:
                try:
                    new = series.values[start:]
                    grid = model.grids.get(uid) or _Grid.of(spec)
                    plans.append(_continue(spec, grid, carried, all_ds[start:], new, uid))
                except DataError as exc:
                    raise _prefixed(exc, prefix) from None
                continue
            cache.drop((uid, model.key))  # type: ignore[union-attr]
        if n < need:
            raise DataError(
                f"{prefix}.values: {n} points are too few; the model needs {need} "
                f"(lookback {model.lookback}" + (f" + differencing order {d})" if d else ")"),
                field=f"{prefix}.values",
            )
        ds = all_ds[n - need :]
        values = np.asarray(series.values[n - need :], dtype=np.float64)
        try:
            if spec is None:
                spec = _window_scaling(model, values, int(ds[0]))
            grid = model.grids.get(uid) or _Grid.of(spec)
            if series.timestamps is None:  # consecutive from `start`: check its grid only
                offset = int(ds[0]) - grid.anchor_ns
                if offset % grid.step_ns:  # off the grid: the transform's error names it
                    steps_since_anchor(spec, ds[:1].astype("datetime64[ns]"), series_id=uid)
                t = offset // grid.step_ns + np.arange(need, dtype=np.int64)
            else:
                t = steps_since_anchor(spec, all_ds.astype("datetime64[ns]"), series_id=uid)
                t = t[n - need :]
                gaps = np.flatnonzero(np.diff(t) != 1)
                if gaps.size:
                    row = n - need + int(gaps[0]) + 1
                    raise DataError(
                        f"row {row}: timestamp {format_timestamp(all_ds[row])} is not one "
                        f"{spec.step_s:g} s step after {format_timestamp(all_ds[row - 1])}; the "
                        f"last {need} points must be consecutive",
                        field="ds",
                    )
        except DataError as exc:
            raise _prefixed(exc, prefix) from None
        windows.append(_Window(len(plans), prefix, uid, spec, grid, t, values, int(ds[-1])))
        plans.append(None)
    for group in _same_shaped(windows, lambda w: w.grid):
        _transform_windows(group, model.lookback, plans)
    return PreparedBatch(plans=plans, horizon=horizon, level=level)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Window:
    """A validated whole window waiting to be transformed: `t` its steps, `values` raw."""

    index: int
    prefix: str
    unique_id: str
    spec: SeriesTransform
    grid: _Grid
    t: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    last_ns: int


def _same_shaped(items: Sequence[_T], grid_of: Callable[[_T], _Grid]) -> list[list[_T]]:
    """`items` grouped by the shape of their transform, each group in the original order."""
    groups: dict[tuple[int, bool, tuple[int, ...]], list[_T]] = {}
    for item in items:
        groups.setdefault(grid_of(item).shape, []).append(item)
    return list(groups.values())


def _transform_windows(
    group: list[_Window], lookback: int, plans: list[_SeriesPlan | None]
) -> None:
    """Transform same-shaped windows in one pass and put their plans in place; a window that
    overflows once transformed raises for the first such series of the request."""
    transformed = transform_steps(
        TransformBatch.stack([w.spec for w in group]),
        np.stack([w.values for w in group]),
        np.stack([w.t for w in group]),
    )
    limit = np.finfo(np.float32).max
    fits = (np.abs(transformed.values) <= limit).all(axis=1)
    if not fits.all():
        bad = group[int(np.flatnonzero(~fits)[0])]
        try:
            _require_finite(transformed.values[~fits][0])
        except DataError as exc:
            raise _prefixed(exc, bad.prefix) from None
    x = transformed.values[:, -lookback:].astype(np.float32)
    last_levels = transformed.last_levels
    for row, window in enumerate(group):
        plans[window.index] = _SeriesPlan(
            unique_id=window.unique_id,
            spec=window.spec,
            grid=window.grid,
            last_ns=window.last_ns,
            last_levels=last_levels[row],
            x=x[row],
            state=None,
            tail=window.values,
        )


def _continue(
    spec: SeriesTransform,
    grid: _Grid,
    carried: Carried,
    ds: npt.NDArray[np.int64],
    values: Sequence[float],
    uid: str,
) -> _SeriesPlan:
    """The plan of a series that continues its carried state with new points `ds`, `values`."""
    d = spec.difference
    tail = np.concatenate([carried.tail, np.asarray(values, dtype=np.float64)])
    # The last d kept points let the new ones be differenced exactly as in the whole window.
    head_ds = carried.last_ns - spec.step_ns * np.arange(d - 1, -1, -1, dtype=np.int64)
    window_ds = np.concatenate([head_ds, ds]).astype("datetime64[ns]")
    transformed = transform(spec, tail[len(tail) - len(ds) - d :], window_ds, series_id=uid)
    _require_finite(transformed.values)
    return _SeriesPlan(
        unique_id=uid,
        spec=spec,
        grid=grid,
        last_ns=int(ds[-1]),
        last_levels=transformed.last_levels,
        x=transformed.values.astype(np.float32),
        state=carried.state,
        tail=tail[-carried.tail.size :],
    )


_Outputs = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, float]


@dataclass(frozen=True)
class _Call:
    """One model's ORT work for a request: its plans, through the step graph when `stateful`."""

    model: LoadedModel
    plans: list[_SeriesPlan]
    stateful: bool


def _windows(plans: list[_SeriesPlan]) -> npt.NDArray[np.float32]:
    """The plans' windows as one model input `[N, L, 1]`."""
    return np.stack([p.x for p in plans])[:, :, None]


def _run(
    model: LoadedModel,
    plans: list[_SeriesPlan],
    stateful: bool,
    batcher: MicroBatcher,
    arrival: Arrival | None = None,
) -> _Outputs:
    """Forecasts `[N, H]` of every plan, their new states `[N, S]` when `stateful`, and the
    seconds of ORT calls they took.

    Windows run in one call, shared with concurrent requests through `batcher` (the step graph
    from a zero state when states are kept); carried series run the step graph on their new
    points, one call per number of new points.
    """
    if not stateful or model.step is None:
        z, seconds = batcher.forecast(model, _windows(plans), arrival)
        return z, None, seconds
    if arrival is not None:
        arrival.settle()
    started = time.perf_counter()
    forecasts = np.empty((len(plans), model.horizon), dtype=np.float32)
    states = np.empty((len(plans), initial_state(model.step, 1).shape[1]), dtype=np.float32)
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault((plan.state is None, len(plan.x)), []).append(i)
    for (fresh, _), rows in groups.items():
        x = np.stack([plans[i].x for i in rows])[:, :, None]  # [b, k, 1]
        if fresh:
            state = initial_state(model.step, len(rows))
        else:
            state = np.stack([plans[i].state for i in rows])  # type: ignore[misc]
        result = forecast_step(model.step, x, state)
        forecasts[rows], states[rows] = result.forecast, result.state
    return forecasts, states, time.perf_counter() - started


def _forecast_rows(model: LoadedModel, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One window call of `x [B, L, 1]` on the session that suits its size."""
    return forecast_window(model.window_for(len(x)), x)


_ISO_UNITS = (("s", 10**9), ("ms", 10**6), ("us", 10**3), ("ns", 1))


@functools.lru_cache(maxsize=4096)
def _future_texts(first_ns: int, step_ns: int, horizon: int) -> tuple[str, ...]:
    """ISO text of `horizon` grid timestamps from `first_ns` (`format_timestamp` of each, the
    coarsest unit exact for all); cached, as concurrent requests mostly share their future."""
    ns = first_ns + step_ns * np.arange(horizon, dtype=np.int64)
    unit = next(u for u, size in _ISO_UNITS if not (ns % size).any())
    return tuple(np.datetime_as_string(ns.astype("datetime64[ns]"), unit=unit).tolist())


def _finish(
    model: LoadedModel, batch: PreparedBatch, z: npt.NDArray[np.float32]
) -> list[SeriesForecast]:
    """Invert the model outputs `z [N, H]` to the series' units and add calibrated bounds,
    same-shaped series together.

    Raises:
        ModelError: a series' forecast is not finite (the first such series is named).
    """
    h, plans = batch.horizon, batch.plans
    steps = np.arange(1, h + 1, dtype=np.int64)
    calibration = model.calibration
    index = None
    if calibration is not None and batch.level is not None:
        index = calibration.level_index(batch.level)
    point: list[list[float]] = [[] for _ in plans]
    lower: list[list[float] | None] = [None] * len(plans)
    upper: list[list[float] | None] = [None] * len(plans)
    future: list[tuple[int, int]] = [(0, 0)] * len(plans)  # first timestamp and step, ns
    for rows in _same_shaped(range(len(plans)), lambda i: plans[i].grid):
        specs = [plans[i].spec for i in rows]
        anchors = np.array([plans[i].grid.anchor_ns for i in rows], dtype=np.int64)[:, None]
        step_ns = np.array([plans[i].grid.step_ns for i in rows], dtype=np.int64)[:, None]
        last = np.array([plans[i].last_ns for i in rows], dtype=np.int64)[:, None]
        t = (last - anchors) // step_ns + steps  # [g, h] steps since each anchor
        values = inverse_forecast_steps(
            TransformBatch.stack(specs),
            z[rows, :h].astype(np.float64),
            t,
            np.stack([plans[i].last_levels for i in rows]),
        )
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            first = min(rows[j] for j in np.flatnonzero(~finite))
            raise ModelError(
                f"{model.role} returned non-finite values for {plans[first].unique_id!r}"
            )
        first = (anchors + t[:, :1] * step_ns)[:, 0].tolist()
        for j, i in enumerate(rows):
            point[i], future[i] = values[j].tolist(), (first[j], int(step_ns[j, 0]))
        if index is None or calibration is None:
            continue
        known = [j for j, i in enumerate(rows) if plans[i].unique_id in calibration.series]
        if known:
            q = np.stack(
                [calibration.series[plans[rows[j]].unique_id].quantiles[index, :h] for j in known]
            )
            low, high = (values[known] - q).tolist(), (values[known] + q).tolist()
            for j, lo, hi in zip(known, low, high, strict=True):
                lower[rows[j]], upper[rows[j]] = lo, hi
    forecasts = []
    for i, plan in enumerate(plans):
        forecasts.append(
            # Built from our own float arrays: validating 3 x H floats per series again costs.
            SeriesForecast.model_construct(
                unique_id=plan.unique_id,
                timestamps=list(_future_texts(*future[i], h)),
                point=point[i],
                lower=lower[i],
                upper=upper[i],
                level=batch.level if lower[i] is not None else None,
            )
        )
    return forecasts


# --------------------------------------------------------------------------- one-step forecasts


def one_step_forecasts(
    model: LoadedModel,
    unique_id: str,
    values: npt.NDArray[np.float64],
    ns: npt.NDArray[np.int64],
    chunk_rows: int = 1024,
) -> npt.NDArray[np.float64]:
    """The model's one-step forecast of every point of a series it knows, from the `lookback`
    points before it, as `/forecast` gives it for the history up to that point: `[n]` in the
    series' units, NaN where the window before a point is not `lookback + d` known, consecutive
    points on the model's grid (the first ones, around gaps and missing values).

    All windows are transformed in one pass (the series' transform is pointwise but for the
    differencing) and run through the window graph `chunk_rows` at a time.

    Raises:
        DataError: the series is unknown to the model.
        ModelError: the model returned non-finite values for a complete window.
    """
    spec = model.spec.series.get(unique_id)
    if spec is None:
        raise DataError(f"series {unique_id!r} is unknown to the model", field="unique_id")
    grid = model.grids.get(unique_id) or _Grid.of(spec)
    d, lookback = spec.difference, model.lookback
    need, n = lookback + d, len(values)
    out = np.full(n, np.nan)
    if n <= need:
        return out
    offset = ns - grid.anchor_ns
    t = offset // grid.step_ns
    on_grid = offset % grid.step_ns == 0
    usable = np.isfinite(values) & on_grid & (np.abs(values) <= np.finfo(np.float32).max)
    # Row i follows row i - 1 by one grid step (row 0 by none).
    steps = np.concatenate([[False], (np.diff(t) == 1) & on_grid[1:] & on_grid[:-1]])
    known, consecutive = (np.concatenate([[0], np.cumsum(a)]) for a in (usable, steps))
    rows = np.arange(need, n)
    # Window r: rows r - need .. r - 1 usable, and the need steps up to row r all one step.
    complete = known[rows] - known[rows - need] == need
    complete &= consecutive[rows + 1] - consecutive[rows - need + 1] == need
    rows = rows[complete]
    if not rows.size:
        return out
    batch = TransformBatch.stack([spec])
    # Points outside every complete window only need to be finite here.
    filled = np.where(usable, values, 0.0)
    transformed = transform_steps(batch, filled[None], t[None])
    z = np.lib.stride_tricks.sliding_window_view(transformed.values[0], lookback)
    with np.errstate(all="ignore"):
        x = z[rows - need].astype(np.float32)  # window r: transformed points r - L .. r - 1
    fits = np.isfinite(x).all(axis=1)
    rows, x = rows[fits], x[fits]
    forecast = np.empty(len(rows), dtype=np.float64)
    for begin in range(0, len(rows), chunk_rows):
        window = x[begin : begin + chunk_rows, :, None]
        forecast[begin : begin + chunk_rows] = forecast_window(
            model.window_for(len(window)), window
        )[:, 0]
    if not np.isfinite(forecast).all():
        raise ModelError(f"{model.role} returned non-finite values for {unique_id!r}")
    residual = transformed.residual[0]
    last_levels = (
        np.lib.stride_tricks.sliding_window_view(residual, d)[rows - d]
        if d
        else np.zeros((len(rows), 0))
    )
    out[rows] = inverse_forecast_steps(
        batch.repeat(len(rows)), forecast[:, None], t[rows][:, None], last_levels
    )[:, 0]
    return out


def _unanswerable(
    model: LoadedModel,
    spec: SeriesTransform,
    series: AnomalySeriesInput,
    ns: npt.NDArray[np.int64],
    prefix: str,
) -> DataError | None:
    """Why `model` can forecast no point of an anomaly request's series (its `start` or a
    timestamp off the model's grid, or no more than `lookback + d` points), as the 4xx to
    answer when its forecasts are required; None when it can try."""
    field = f"{prefix}.start" if series.timestamps is None else f"{prefix}.timestamps"
    try:  # `start`: every later point is as far off the grid as the first
        stamps = (ns[:1] if series.timestamps is None else ns).astype("datetime64[ns]")
        steps_since_anchor(spec, stamps, series_id=series.unique_id)
    except DataError as exc:
        return DataError(f"{field}: {exc.message}", field=field)
    d, need, n = spec.difference, model.lookback + spec.difference, len(series.values)
    if n <= need:
        return DataError(
            f"{prefix}.values: {n} points are too few for the model's one-step forecasts; a "
            f"point needs the {need} before it (lookback {model.lookback}"
            + (f" + differencing order {d})" if d else ")")
            + f", so send more than {need}",
            field=f"{prefix}.values",
        )
    return None


def _no_complete_window(model: LoadedModel, spec: SeriesTransform, prefix: str) -> DataError:
    """The 4xx for a series none of whose points has a complete window before it."""
    need = model.lookback + spec.difference
    return DataError(
        f"{prefix}.values: no point has the {need} known, consecutive points on the model's "
        f"{spec.step_s:g} s grid before it that its one-step forecast needs (missing values "
        "or timestamp gaps break every window)",
        field=f"{prefix}.values",
    )


# --------------------------------------------------------------------------- the runtime


@dataclass
class _Health:
    """Whether the champion's last call failed (the set stays degraded until it succeeds)."""

    champion_failing: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Runtime:
    """Holds the current `ModelSet`, answers forecasts, and reloads without dropping requests."""

    def __init__(self, settings: ServingSettings, observer: Observer | None = None) -> None:
        self.settings = settings
        self.observer: Observer = observer or _NullObserver()
        self._reload_lock = threading.Lock()
        self._health = _Health()
        self._download_dir = settings.download_dir or Path(tempfile.mkdtemp(prefix="forecaster-"))
        self.state_cache = StateCache(settings.state_cache_size)
        self.batcher = MicroBatcher(
            settings.batch_max_rows, settings.batch_max_wait_ms / 1000.0, run=_forecast_rows
        )
        self._models = self._build(previous=None)

    @property
    def models(self) -> ModelSet:
        """The set requests are answered with now."""
        return self._models

    def reload(self) -> bool:
        """Re-resolve the sources and swap in a new set; True when a model changed.

        Requests in flight keep the set they started with; a model whose version (registry) or
        files (bundle) did not change is reused as it is, sessions included.
        """
        with self._reload_lock:
            previous = self._models
            new = self._build(previous=previous)
            changed = [_identity(m) for m in (new.champion, new.fallback)] != [
                _identity(m) for m in (previous.champion, previous.fallback)
            ]
            self._models = new
            if changed:
                self.state_cache.clear()
                with self._health.lock:
                    self._health.champion_failing = None
            logger.info("reload: %s", "models changed" if changed else "no change")
            return changed

    def status(self) -> tuple[Status, str]:
        """`ready` (champion answers), `degraded` (fallback answers), `unavailable` (none); the
        detail also names a kept model the last reload could not refresh."""
        models = self._models
        if not models.loaded():
            return "unavailable", "no model is loaded: " + _errors(models)
        stale = "".join(f"; {_stale(role, models.stale)}" for role in models.stale)
        if not isinstance(models.champion, LoadedModel):
            return "degraded", f"fallback answers; champion: {models.champion.error}{stale}"
        failing = self._health.champion_failing
        if failing is not None and isinstance(models.fallback, LoadedModel):
            return (
                "degraded",
                f"fallback answers; champion's last call failed: {failing}{stale}",
            )
        return "ready", f"champion {models.champion.source} answers{stale}"

    def forecast(self, request: ForecastRequest) -> ForecastResponse:
        """Answer with the champion, else the fallback.

        Raises:
            DataError, ModelError: the request is invalid for the answering model (4xx).
            ModelUnavailable: no model is loaded, or every loaded model failed (503).
        """
        models = self._models
        loaded = models.loaded()
        if not loaded:
            raise ModelUnavailable("no model is loaded: " + _errors(models))
        with self.batcher.arriving() as arrival:
            steps = self._attempts(request, models, loaded)
            step = _resume(steps, None, failed=False)
            while isinstance(step, _Call):
                try:
                    value, failed = self._call(step, arrival), False
                except Exception as exc:  # thrown into the attempt, which moves on
                    value, failed = exc, True
                step = _resume(steps, value, failed)
            return step

    async def forecast_async(self, request: ForecastRequest) -> ForecastResponse:
        """`forecast` on an event loop: the Python work runs on the loop (it holds the GIL
        anyway), the ORT calls in the micro-batching worker or a worker thread.

        Raises:
            DataError, ModelError, ModelUnavailable: as `forecast`.
        """
        models = self._models
        loaded = models.loaded()
        if not loaded:
            raise ModelUnavailable("no model is loaded: " + _errors(models))
        with self.batcher.arriving() as arrival:
            steps = self._attempts(request, models, loaded)
            step = _resume(steps, None, failed=False)
            while isinstance(step, _Call):
                try:
                    value, failed = await self._call_async(step, arrival), False
                except Exception as exc:  # thrown into the attempt, which moves on
                    value, failed = exc, True
                step = _resume(steps, value, failed)
            return step

    def one_step(
        self,
        series: AnomalySeriesInput,
        values: npt.NDArray[np.float64],
        prefix: str,
        required: bool,
    ) -> tuple[npt.NDArray[np.float64], Role, str] | None:
        """The one-step forecasts of every point of an anomaly request's series by the champion,
        else the fallback (`one_step_forecasts`), with the role and source of the model that
        gave them (`serving.detect.ModelForecasts`; `values` are the series' values, NaN where
        missing); None when no model can (no timestamps, unknown series, timestamps off the
        model's grid, too few points, no model loaded, every model failed) and they are not
        `required`. A model that forecasts no point of the series has not answered.

        Raises:
            DataError: bad timestamps; `required` and the series has no timestamps or start, no
                loaded model knows it, its start or a timestamp is off the model's grid, or no
                point has `lookback + d` known consecutive points before it.
            ModelUnavailable: `required` and no model is loaded or every model failed.
        """
        uid = series.unique_id
        if series.timestamps is None and series.start is None:
            if required:
                raise DataError(
                    f"{prefix}.start: the model's forecasts need the series' 'start' or "
                    "'timestamps'",
                    field=f"{prefix}.start",
                )
            return None
        models = self._models
        loaded = models.loaded()
        if not loaded:
            if required:
                raise ModelUnavailable("no model is loaded: " + _errors(models))
            return None
        failures: list[str] = []
        refusals: list[DataError] = []  # input the model cannot forecast: 4xx, not a failure
        known = [model for model in loaded if uid in model.spec.series]
        for model in known:
            spec = model.spec.series[uid]
            ns = _timestamps_ns(series, spec.step_ns, prefix)
            refusal = _unanswerable(model, spec, series, ns, prefix) if required else None
            if refusal is not None:
                refusals.append(refusal)
                continue
            started = time.perf_counter()
            try:
                expected = one_step_forecasts(
                    model, uid, values, ns, chunk_rows=self.settings.batch_max_rows
                )
            except Exception as exc:  # ORT raises untyped errors; any failure moves on
                failures.append(self._failed(model, exc, "on anomaly forecasts"))
                continue
            self.observer.inference(model.role, time.perf_counter() - started)
            if not np.isfinite(expected).any():
                refusals.append(_no_complete_window(model, spec, prefix))
                continue
            if model.role == "fallback" and not isinstance(models.champion, LoadedModel):
                self.observer.fallback("champion_unavailable")
            elif model.role == "fallback" and failures:
                self.observer.fallback("champion_failed")
            return expected, model.role, model.source
        if not required:
            return None
        if not known:
            raise DataError(
                f"{prefix}.unique_id: series {uid!r} is unknown to the served models",
                field=f"{prefix}.unique_id",
            )
        if refusals:
            raise refusals[0]
        raise ModelUnavailable("every model failed: " + "; ".join(failures))

    def close(self) -> None:
        """Stop the micro-batching worker (requests after this raise)."""
        self.batcher.close()

    def _call(self, call: _Call, arrival: Arrival) -> _Outputs:
        return _run(call.model, call.plans, call.stateful, self.batcher, arrival)

    async def _call_async(self, call: _Call, arrival: Arrival) -> _Outputs:
        if call.stateful:  # step-graph calls, unbatched, off the loop
            arrival.settle()
            return await asyncio.to_thread(self._call, call, arrival)
        z, seconds = await self.batcher.forecast_async(call.model, _windows(call.plans), arrival)
        return z, None, seconds

    def _attempts(
        self, request: ForecastRequest, models: ModelSet, loaded: list[LoadedModel]
    ) -> Generator[_Call, _Outputs, ForecastResponse]:
        """Champion, then fallback: yields each model's ORT call and gets its outputs back (or
        the error it raised thrown in); returns the first answer.

        Raises:
            DataError, ModelError: the request is invalid for the answering model (4xx).
            ModelUnavailable: every loaded model failed (503).
        """
        failures = []
        if not isinstance(models.champion, LoadedModel):
            failures.append(f"champion: {models.champion.error}")
        for model in loaded:
            settings, cache = self.settings, self.state_cache
            batch = prepare_batch(
                request, model, settings.unknown_series, settings.max_series, cache
            )
            stateful = cache.enabled and model.carries_state
            try:
                z, states, seconds = yield _Call(model, batch.plans, stateful)
                self.observer.inference(model.role, seconds)
                if not np.isfinite(z).all():
                    raise ModelError(f"{model.role} returned non-finite values")
                forecasts = _finish(model, batch, z)
            except Exception as exc:  # ORT raises untyped errors; any failure moves on
                failures.append(self._failed(model, exc))
                continue
            if states is not None:
                hits = sum(plan.state is not None for plan in batch.plans)
                self.observer.carried(hits, len(batch.plans) - hits)
                for plan, state in zip(batch.plans, states, strict=True):
                    if plan.unique_id in model.spec.series:  # window-scaled series: no state
                        entry = Carried(last_ns=plan.last_ns, state=state, tail=plan.tail)
                        cache.put((plan.unique_id, model.key), entry)
            if model.role == "champion" and self._health.champion_failing is not None:
                with self._health.lock:
                    self._health.champion_failing = None
            if model.role == "fallback":
                self.observer.fallback(
                    "champion_unavailable"
                    if not isinstance(models.champion, LoadedModel)
                    else "champion_failed"
                )
            return ForecastResponse(
                model=model.role,
                model_version=model.source,
                forecasts=forecasts,
            )
        raise ModelUnavailable("every model failed: " + "; ".join(failures))

    def _failed(self, model: LoadedModel, exc: Exception, what: str = "") -> str:
        """Log a model's failure (a failing champion degrades the set) and say it for the
        `every model failed` message."""
        reason = exc.message if isinstance(exc, ForecasterError) else repr(exc)
        logger.warning("%s failed%s: %s", model.role, f" {what}" if what else "", reason)
        if model.role == "champion":
            with self._health.lock:
                self._health.champion_failing = reason
        return f"{model.role}: {reason}"

    def _build(self, previous: ModelSet | None) -> ModelSet:
        settings = self.settings
        stale: dict[Role, str] = {}
        champion = self._load("champion", settings.champion_bundle, previous, stale)
        fallback = self._load("fallback", settings.fallback_bundle, previous, stale)
        loaded_at = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
        return ModelSet(champion=champion, fallback=fallback, loaded_at=loaded_at, stale=stale)

    def _load(
        self,
        role: Role,
        bundle: Path | None,
        previous: ModelSet | None,
        stale: dict[Role, str],
    ) -> LoadedModel | _Failed:
        """The model of `role` now: reused when unchanged, else loaded. When its registry alias
        cannot be resolved or downloaded (an outage, say), a model `previous` holds for the
        role is kept and `stale[role]` says why it was not refreshed; else the role fails."""
        settings = self.settings
        old = getattr(previous, role) if previous is not None else None
        source = str(bundle) if bundle is not None else "not configured"
        version: str | None = None
        try:
            if settings.model_name is not None:
                from serving.registry import fetch_alias

                tracking_uri = settings.tracking_uri or ""
                source = (
                    f"models:/{settings.model_name}@{role} at {redact(tracking_uri, tracking_uri)}"
                )
                try:
                    fetched = fetch_alias(
                        tracking_uri, settings.model_name, role, self._download_dir
                    )
                except ForecasterError as exc:
                    if not isinstance(old, LoadedModel):
                        raise
                    logger.warning("%s not refreshed, %s kept: %s", role, old.source, exc.message)
                    stale[role] = exc.message
                    return old
                folder, version, source = fetched.folder, fetched.version, fetched.uri
            elif bundle is None:
                return _Failed(role=role, source=source, error=f"no {role} bundle configured")
            else:
                folder = bundle
            if isinstance(old, LoadedModel) and old.folder == folder:
                current = version or _fingerprint(folder)
                if current == old.fingerprint:
                    return old
            return load_model(
                role,
                folder,
                source=source,
                version=version,
                device=settings.device,
                intra_op_threads=settings.intra_op_threads or None,
                cuda_min_rows=settings.cuda_min_rows,
            )
        except ForecasterError as exc:
            logger.warning("%s not loaded: %s", role, exc.message)
            return _Failed(role=role, source=source, error=exc.message)


def _resume(
    steps: Generator[_Call, _Outputs, ForecastResponse], value: Any, failed: bool
) -> _Call | ForecastResponse:
    """Send an ORT call's outputs into the attempts (or throw its error in): the next call to
    make, or the answer."""
    try:
        return steps.throw(value) if failed else steps.send(value)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _identity(model: LoadedModel | _Failed) -> tuple[str, str]:
    if isinstance(model, LoadedModel):
        return (model.source, model.fingerprint)
    return (model.source, "failed: " + model.error)


def _stale(role: Role, stale: dict[Role, str]) -> str:
    return f"{role} kept, the last reload could not refresh it: {stale[role]}"


def _errors(models: ModelSet) -> str:
    return "; ".join(
        f"{m.role}: {m.error}" for m in (models.champion, models.fallback) if isinstance(m, _Failed)
    )
