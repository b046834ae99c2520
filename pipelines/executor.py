"""Run per-series stages locally, in a process pool or on Ray (DESIGN.md §8, issue 9).

A per-series stage is one function "pandas frame of one series in, report out" (the contract
StatsForecast uses on Spark, Dask and Ray); `run_per_series` maps it over the series of a job and
gathers the results in input order:

- `local`: in this process, one series after the other (the default; needs no extra package);
- `processes`: a `concurrent.futures.ProcessPoolExecutor` with the `spawn` start method;
- `ray`: `ray.remote` tasks; joins the cluster at `RAY_ADDRESS` when set, else starts a local
  Ray with `workers` CPUs, unless Ray is already initialised (extra `[ray]`).

Series travel in chunks (one task per chunk) so the per-task cost of a pool or of Ray is paid
once per chunk, not once per series. A failure in any series is raised in the driver as the same
`ForecasterError` class (other exceptions as `RuntimeError`), naming the series, whatever the
backend.

`preprocess_and_gate` is the preprocessing + stationarity gate of `pipelines.prepare` written as
such a stage (`prepare_series`) plus a reduction (`pipelines.stationarity.decide`): every series
is fitted and tested at each differencing order the gate may try, then the set-level decision is
taken from the reports, with the same result as `fit_preprocessor` + `gate` on the whole frame.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
import logging
import math
import multiprocessing
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import pandas as pd

from forecaster import errors
from forecaster.config import Execution, PreprocessConfig, StationarityConfig
from forecaster.data import ID_COL
from forecaster.errors import ConfigError, DataError, ForecasterError
from forecaster.transform import PreprocessingSpec, SeriesTransform
from pipelines.preprocess import fit_preprocessor, residuals
from pipelines.stationarity import GateDecision, StationarityReport, check_named, decide, max_order

__all__ = [
    "EXECUTIONS",
    "Execution",
    "SeriesPrepared",
    "WorkerTraceback",
    "fit_series_frame",
    "prepare_series",
    "preprocess_and_gate",
    "process_pool",
    "run_per_series",
    "split_series",
]

EXECUTIONS: tuple[Execution, ...] = ("local", "processes", "ray")

logger = logging.getLogger(__name__)

R = TypeVar("R")

_CHUNKS_PER_WORKER = 4  # enough to balance uneven series, few enough to amortise task overhead


@dataclass(frozen=True)
class _Failure:
    """An exception raised by a per-series function, as plain data (it crosses processes)."""

    series: str
    kind: str
    message: str
    field: str | None
    detail: str | None
    trace: str
    problems: tuple[str, ...] = ()  # a DataError's full list of problems


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker, as the `__cause__` of the one the
    driver raises (the worker's frames do not cross processes)."""


@dataclass(frozen=True)
class _Outcome(Generic[R]):
    value: R | None
    failure: _Failure | None


def split_series(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """One frame per `unique_id`, in order of first appearance, each with a fresh index.

    Raises:
        DataError: the frame has no `unique_id` column or no rows.
    """
    if ID_COL not in frame.columns:
        raise DataError(f"frame has no {ID_COL!r} column", field=ID_COL)
    if frame.empty:
        raise DataError("frame has no rows", field="y")
    return [
        group.reset_index(drop=True)
        for _, group in frame.groupby(ID_COL, sort=False, observed=True)
    ]


def _series_name(frame: pd.DataFrame, position: int) -> str:
    if ID_COL in frame.columns and not frame.empty:
        return str(frame[ID_COL].iloc[0])
    return f"#{position}"


def _run_chunk(
    fn: Callable[[pd.DataFrame], R], chunk: Sequence[tuple[int, pd.DataFrame]]
) -> list[_Outcome[R]]:
    """Apply `fn` to each frame of a chunk; exceptions are returned, not raised."""
    outcomes: list[_Outcome[R]] = []
    for position, frame in chunk:
        try:
            outcomes.append(_Outcome(value=fn(frame), failure=None))
        except Exception as exc:  # returned to the driver, which raises it
            outcomes.append(
                _Outcome(
                    value=None,
                    failure=_Failure(
                        series=_series_name(frame, position),
                        kind=type(exc).__name__,
                        message=str(exc),
                        field=getattr(exc, "field", None),
                        detail=getattr(exc, "detail", None),
                        trace=traceback.format_exc(),
                        problems=tuple(getattr(exc, "problems", ()) or ()),
                    ),
                )
            )
    return outcomes


def _raise(failure: _Failure, execution: Execution) -> None:
    name = repr(failure.series)
    message = failure.message if name in failure.message else f"series {name}: {failure.message}"
    cls = getattr(errors, failure.kind, None)
    cause = WorkerTraceback(failure.trace)
    if isinstance(cls, type) and issubclass(cls, ForecasterError):
        # A DataError's own list of problems, when it has several (one: the message says it).
        several = issubclass(cls, DataError) and len(failure.problems) > 1
        extra = {"problems": list(failure.problems)} if several else {}
        raise cls(message, field=failure.field, detail=failure.detail, **extra) from cause
    raise RuntimeError(
        f"series {name} failed under execution {execution!r}: {failure.kind}: {failure.message}\n"
        f"{failure.trace}"
    )


def _chunks(
    frames: Sequence[pd.DataFrame], workers: int, chunk_size: int | None
) -> list[list[tuple[int, pd.DataFrame]]]:
    size = chunk_size or max(1, math.ceil(len(frames) / (workers * _CHUNKS_PER_WORKER)))
    indexed = list(enumerate(frames))
    return [indexed[i : i + size] for i in range(0, len(indexed), size)]


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            "execution: ray needs the Ray package, which is not installed; "
            "install it with pip install '.[ray]' or use execution: local | processes",
            field="execution",
        ) from exc


@functools.cache
def _ray_chunk_task(ray: Any) -> Any:
    return ray.remote(_run_chunk)


def _map_ray(
    fn: Callable[[pd.DataFrame], R],
    chunks: list[list[tuple[int, pd.DataFrame]]],
    workers: int | None,
) -> list[list[_Outcome[R]]]:
    ray = _import_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A running cluster has its own resources: Ray refuses num_cpus when joining one.
        ray.init(address=address, num_cpus=None if address else workers)
    task = _ray_chunk_task(ray)
    fn_ref = ray.put(fn)
    return list(ray.get([task.remote(fn_ref, chunk) for chunk in chunks]))


def _default_workers(execution: Execution) -> int:
    if execution == "ray":
        ray = _import_ray()
        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def process_pool(workers: int | None = None) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool with the `spawn` start method (safe with threads, same on every OS)."""
    context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)


def run_per_series(
    fn: Callable[[pd.DataFrame], R],
    frames: Sequence[pd.DataFrame],
    *,
    execution: Execution = "local",
    workers: int | None = None,
    chunk_size: int | None = None,
    pool: concurrent.futures.ProcessPoolExecutor | None = None,
) -> list[R]:
    """Apply `fn` to every one-series frame and return the results in the order of `frames`.

    Args:
        fn: the per-series stage; for `processes` and `ray` it must be picklable (a module-level
            function, or a `functools.partial` of one) and deterministic.
        frames: one frame per series (`split_series`), each with its `unique_id` column.
        execution: `local`, `processes` or `ray` (module docstring).
        workers: processes of the pool, or CPUs of a local Ray started here; default: all CPUs
            (for Ray already running: the CPUs of its cluster). Ignored by `local`.
        chunk_size: series per task; default: about four tasks per worker.
        pool: a process pool to reuse (`processes` only; `process_pool`); default: a new one for
            this call, which costs each worker its imports again.

    Raises:
        ConfigError: unknown `execution`, `workers` below 1, or `ray` without Ray installed.
        ForecasterError: `fn` raised one (same class, message naming the series).
        RuntimeError: `fn` raised anything else (message naming the series, with its traceback).
    """
    if execution not in EXECUTIONS:
        raise ConfigError(
            f"execution: {execution!r} is not one of {', '.join(EXECUTIONS)}", field="execution"
        )
    if workers is not None and workers < 1:
        raise ConfigError(f"workers: {workers} is not at least 1", field="workers")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size: {chunk_size} is not at least 1", field="chunk_size")
    if not frames:
        return []
    if execution == "local":
        batches = [_run_chunk(fn, list(enumerate(frames)))]
    else:
        count = workers or _default_workers(execution)
        chunks = _chunks(frames, count, chunk_size)
        if execution == "processes":
            with contextlib.ExitStack() as stack:
                if pool is None:
                    pool = stack.enter_context(process_pool(count))
                batches = list(pool.map(_run_chunk, [fn] * len(chunks), chunks))
        else:
            batches = _map_ray(fn, chunks, workers)
    results: list[R] = []
    for outcome in (o for batch in batches for o in batch):
        if outcome.failure is not None:
            _raise(outcome.failure, execution)
        results.append(outcome.value)  # type: ignore[arg-type]  # no failure: a value
    return results


# --- preprocessing + stationarity gate as a per-series stage ------------------------------------


@dataclass(frozen=True)
class SeriesPrepared:
    """What `prepare_series` found for one series.

    Attributes:
        unique_id: the series.
        transform: its fitted preprocessing.
        reports: one stationarity report of its training residual per differencing order the
            gate may try (index = order, `0..d_max`, or only 0 with remedy `none`), up to the
            first order the tests reject (too short once differenced, constant).
        untestable: why the tests rejected the residual at the next order (None: every order
            was tested); the gate raises it only if it needs that order, as the local gate does.
    """

    unique_id: str
    transform: SeriesTransform
    reports: list[StationarityReport]
    untestable: str | None = None


def fit_series_frame(
    frame: pd.DataFrame,
    *,
    preprocess: PreprocessConfig,
    train_rows: int | Mapping[str, int] | None = None,
) -> SeriesTransform:
    """`fit_preprocessor` on a frame of one series: its `SeriesTransform`."""
    spec = fit_preprocessor(frame, preprocess, train_rows=train_rows)
    (transform,) = spec.series.values()
    return transform


def prepare_series(
    frame: pd.DataFrame,
    *,
    preprocess: PreprocessConfig,
    stationarity: StationarityConfig,
    train_rows: int | Mapping[str, int] | None = None,
) -> SeriesPrepared:
    """Fit one series' preprocessing and test its training residual at every order the gate may try.

    The residual is differenced `preprocess.difference` times first, as `pipelines.prepare` does,
    then tested at each further order `0..d_max`.

    Args:
        frame: the rows of one series (`unique_id`, `ds`, `y`), sorted by `ds`.
        preprocess: what to fit.
        stationarity: the gate's settings (`alpha`, `remedy`, `d_max`).
        train_rows: the first rows of the series to fit and test on (a mapping: per
            `unique_id`); `None`: all rows.

    Raises:
        DataError: as `fit_preprocessor`, or a residual the stationarity tests reject (too
            short, constant), naming the series and the order.
    """
    spec = fit_preprocessor(frame, preprocess, train_rows=train_rows)
    ((uid, transform),) = spec.series.items()
    train = frame.iloc[: transform.n_train]
    residual = residuals(spec, train)[uid]
    if preprocess.difference:
        residual = np.diff(residual, n=preprocess.difference)
    reports = []
    for order in range(max_order(stationarity) + 1):
        try:
            reports.append(check_named(residual, uid, order, stationarity.alpha))
        except DataError as exc:
            if not order:
                raise
            return SeriesPrepared(uid, transform, reports, untestable=exc.message)
    return SeriesPrepared(unique_id=uid, transform=transform, reports=reports)


def preprocess_and_gate(
    frames: Sequence[pd.DataFrame],
    preprocess: PreprocessConfig,
    stationarity: StationarityConfig,
    *,
    train_rows: int | Mapping[str, int] | None = None,
    execution: Execution = "local",
    workers: int | None = None,
    chunk_size: int | None = None,
) -> tuple[PreprocessingSpec, GateDecision]:
    """Preprocessing + stationarity gate of `pipelines.prepare.prepare`, per series on `execution`.

    When the gate chooses feedback after differencing, the series are refitted (a second map)
    with the remedied differencing order, as `prepare` does.

    Raises:
        DataError, ConfigError, RuntimeError: as `run_per_series` and `prepare_series`.
    """
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(process_pool(workers)) if execution == "processes" else None
        run = functools.partial(
            run_per_series, execution=execution, workers=workers, chunk_size=chunk_size, pool=pool
        )
        prepared = run(
            functools.partial(
                prepare_series,
                preprocess=preprocess,
                stationarity=stationarity,
                train_rows=train_rows,
            ),
            frames,
        )
        decision = decide(
            {p.unique_id: p.reports for p in prepared},
            stationarity,
            {p.unique_id: p.untestable for p in prepared if p.untestable is not None},
        )
        transforms = {p.unique_id: p.transform for p in prepared}
        if decision.method == "feedback" and decision.differences:
            remedied = preprocess.model_copy(
                update={"difference": preprocess.difference + decision.differences}
            )
            refit = run(
                functools.partial(fit_series_frame, preprocess=remedied, train_rows=train_rows),
                frames,
            )
            transforms = {p.unique_id: t for p, t in zip(prepared, refit, strict=True)}
    return PreprocessingSpec(series=transforms), decision
