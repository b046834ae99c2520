"""Train and evaluate one forecaster for a config: the job behind `forecaster train/evaluate`.

prepare (pipelines/prepare.py) → model inputs per series (the fitted transform) → forking
windows per split part → trainer (method from the config, overridden by the stationarity gate
when the residuals failed it) → ONNX export → split-conformal calibration of the exported model
on every validation window → evaluation on every test window with the standard protocol
(MSE/MAE on the training-z-scored scale, interval coverage and width) → a local bundle.

A bundle (DESIGN.md §7) is a folder holding `model.onnx` (full window), `model_step.onnx`
(stateful step), `preprocessing.json`, `metadata.json` (model, method, metrics, history),
`calibration.json` (conformal interval quantiles) and `stationarity.json`; it is written to a
temporary folder and renamed, so it is whole or absent.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from forecaster.bundle import (
    METADATA_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    STATIONARITY_FILE,
    STEP_MODEL_FILE,
)
from forecaster.calibration import (
    CALIBRATION_FILE,
    DEFAULT_LEVELS,
    Calibration,
    fit_calibration,
    level_label,
)
from forecaster.config import Config, Execution
from forecaster.data import ID_COL, Split
from forecaster.errors import ConfigError, ModelError
from forecaster.evaluation import Evaluation, evaluate_forecaster, part_windows
from forecaster.files import atomic_write_text, replace_dir, staging_dir
from forecaster.inference import forecast_window, open_session
from forecaster.metrics import coverage, interval_width
from forecaster.transform import SeriesTransform, Transformed, inverse_forecast, transform
from pipelines.prepare import PreparedData, prepare

logger = logging.getLogger(__name__)

Method = Literal["feedback", "bptt", "tbptt"]
Part = Literal["val", "test"]


@dataclass(frozen=True)
class ModelInputs:
    """Each series' transform over its whole length: `values[j]` belongs to row `j + offset`."""

    transformed: dict[str, Transformed]

    @property
    def offsets(self) -> dict[str, int]:
        """Per series, the row of the first model input (the differencing order)."""
        return {uid: t.difference for uid, t in self.transformed.items()}

    def values(self) -> dict[str, npt.NDArray[np.float64]]:
        """Per series, the 1-D model input."""
        return {uid: t.values for uid, t in self.transformed.items()}


@dataclass(frozen=True)
class TrainOutcome:
    """A trained model, how it was trained, and where its bundle is."""

    model: Any  # RecurrentForecaster; typed loosely so importing this module needs no torch
    method: str
    method_reason: str
    history: Any  # TrainHistory
    evaluations: dict[str, dict[str, float]]
    bundle: Path | None  # None on the ranks other than 0 of a data-parallel run: they write nothing
    calibration: Calibration | None = None
    test_forecasts: dict[str, PartForecasts] | None = None  # the exported model's, per series


def model_inputs(prepared: PreparedData) -> ModelInputs:
    """Apply the fitted transform to every series (training, validation and test rows)."""
    transformed: dict[str, Transformed] = {}
    for uid, frame in prepared.data.frame.groupby("unique_id", sort=False):
        name = str(uid)
        spec = prepared.spec.for_series(name)
        transformed[name] = transform(
            spec, frame["y"].to_numpy(), frame["ds"].to_numpy(), series_id=name
        )
    return ModelInputs(transformed=transformed)


def choose_method(config: Config, prepared: PreparedData, requested: str | None) -> tuple[str, str]:
    """The training method and why: the config's (or the override), unless the gate said no.

    Raises:
        ModelError: the gate refused (strict mode) and feedback training was asked for.
    """
    method = requested or config.train.method
    decision = prepared.decision
    if method != "feedback":
        return method, f"method '{method}' requested"
    if decision.method == "refuse":
        raise ModelError(f"stationarity gate refused fixed-feedback training: {decision.reason}")
    if decision.method == "bptt":
        return "bptt", f"stationarity gate chose BPTT: {decision.reason}"
    return "feedback", f"stationarity gate passed: {decision.reason}"


def train_model(
    config: Config,
    prepared: PreparedData,
    inputs: ModelInputs,
    *,
    method: str | None = None,
    device: str | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool = False,
) -> tuple[Any, str, str, Any]:
    """Build the configured model and train it; returns (model, method, reason, history)."""
    import torch

    from forecaster.models.registry import build
    from forecaster.training.trainer import train
    from forecaster.training.windows import ForkingWindows

    chosen, reason = choose_method(config, prepared, method)
    torch.manual_seed(config.seed)
    model = build(
        config.model.name,
        input_size=1,
        hidden_size=config.model.hidden_size,
        horizon=config.window.horizon,
        linear_lags=config.model.linear_lags,
        **config.model.params,
    )
    windows = {
        part: ForkingWindows.from_split(
            inputs.values(),
            prepared.splits,
            part,  # type: ignore[arg-type]
            horizon=config.window.horizon,
            lookback=config.window.lookback,
            offset=inputs.offsets,
            stride=config.train.stride if part == "train" else 1,
        )
        for part in ("train", "val")
    }
    overrides: dict[str, Any] = {"method": chosen}
    if device is not None:
        overrides["device"] = device
    result = train(
        model,
        windows["train"],
        windows["val"],
        config.train.model_copy(update=overrides),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        callbacks=callbacks,
        progress=progress,
        seed=config.seed,
        method_reason=reason,
        requested_method=method or config.train.method,
    )
    return result.model, result.history.method, result.history.method_reason, result.history


@dataclass(frozen=True)
class OnnxSeriesForecaster:
    """`forecast(inputs, origins)` for `evaluate_forecaster`: model input by origin row, ONNX
    forecast on the model scale, inverted to the series' units with the fitted transform."""

    session: Any
    spec: SeriesTransform
    transformed: Transformed
    ds: npt.NDArray[np.datetime64]
    lookback: int
    horizon: int
    name: str

    def __call__(
        self, inputs: npt.NDArray[np.float64], origins: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        d = self.transformed.difference
        values, residual = self.transformed.values, self.transformed.residual
        x = np.stack([values[r - self.lookback - d : r - d] for r in origins])  # [b, L]
        z = forecast_window(self.session, x.astype(np.float32)[:, :, None])  # [b, H]
        return np.stack(
            [
                inverse_forecast(
                    self.spec,
                    z[i].astype(np.float64),
                    self.ds[r : r + self.horizon],
                    residual[r - d : r],
                    series_id=self.name,
                )
                for i, r in enumerate(origins)
            ]
        )


@dataclass(frozen=True)
class PartForecasts:
    """One series' forecasts on every window of a split part, in its original units.

    Attributes:
        evaluation: the protocol's scores of these forecasts.
        forecasts: `[N, H]` forecasts, one row per window, in window order.
        targets: `[N, H]` the values they forecast.
        origins: `[N]` index of each window's first forecast step in the series.
    """

    evaluation: Evaluation
    forecasts: npt.NDArray[np.float64]
    targets: npt.NDArray[np.float64]
    origins: npt.NDArray[np.int64]

    @property
    def residuals(self) -> npt.NDArray[np.float64]:
        """`[N, H]` forecast minus truth."""
        return self.forecasts - self.targets


@dataclass
class _Recorder:
    """Hands a forecaster's batches to the evaluation and keeps them, in call order."""

    forecaster: OnnxSeriesForecaster
    batches: list[npt.NDArray[np.float64]] = field(default_factory=list)

    def __call__(
        self, inputs: npt.NDArray[np.float64], origins: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        self.batches.append(self.forecaster(inputs, origins))
        return self.batches[-1]


def forecast_part(
    session: Any,
    prepared: PreparedData,
    inputs: ModelInputs,
    horizon: int,
    part: Part = "test",
) -> dict[str, PartForecasts]:
    """Forecast every window of `part` per series with an ONNX window model, and score it.

    The model forecasts on its input scale; forecasts are inverted to the series' units with the
    fitted transform and then z-scored with the training mean and std (../shared/data/README.md).
    """
    results: dict[str, PartForecasts] = {}
    for uid, frame in prepared.data.frame.groupby("unique_id", sort=False):
        name = str(uid)
        split = prepared.splits[name]
        values = frame["y"].to_numpy(np.float64)
        forecaster = OnnxSeriesForecaster(
            session=session,
            spec=prepared.spec.for_series(name),
            transformed=inputs.transformed[name],
            ds=frame["ds"].to_numpy(),
            lookback=split.lookback,
            horizon=horizon,
            name=name,
        )
        recorder = _Recorder(forecaster)
        evaluation = evaluate_forecaster(
            recorder, values, split, horizon, part=part, with_origins=True
        )
        windows = part_windows(values, split, horizon, part=part)
        results[name] = PartForecasts(
            evaluation=evaluation,
            forecasts=np.concatenate(recorder.batches),
            targets=np.asarray(windows.targets, dtype=np.float64),
            origins=np.asarray(windows.origins, dtype=np.int64),
        )
    return results


def evaluate_session(
    session: Any,
    prepared: PreparedData,
    inputs: ModelInputs,
    horizon: int,
    part: Part = "test",
) -> dict[str, Evaluation]:
    """Score an ONNX window model on every window of `part`, per series, with the protocol."""
    return evaluations_of(forecast_part(session, prepared, inputs, horizon, part))


def evaluations_of(results: dict[str, PartForecasts]) -> dict[str, Evaluation]:
    """The protocol's scores of `forecast_part`'s results, per series."""
    return {name: result.evaluation for name, result in results.items()}


def interval_metrics(
    calibration: Calibration, results: dict[str, PartForecasts]
) -> dict[str, float]:
    """Coverage and mean width of the calibrated intervals at each level, over all windows.

    `coverage_<level%>` is the fraction of target values inside their interval;
    `width_<level%>` the mean interval width on the training-z-scored scale of the protocol (so
    series of different units average sensibly). Both are window-weighted means over series.
    """
    n = np.array([r.evaluation.n_windows for r in results.values()], dtype=np.float64)
    metrics: dict[str, float] = {}
    for level in calibration.levels:
        covered, widths = [], []
        for name, result in results.items():
            lower, upper = calibration.bounds(name, result.forecasts, level)
            covered.append(coverage(result.targets, lower, upper))
            widths.append(interval_width(lower, upper) / result.evaluation.scale.std)
        label = level_label(level)
        metrics[f"coverage_{label}"] = float(np.dot(n, covered) / n.sum())
        metrics[f"width_{label}"] = float(np.dot(n, widths) / n.sum())
    return metrics


def calibrate(
    results: dict[str, PartForecasts], levels: Sequence[float] = DEFAULT_LEVELS
) -> Calibration:
    """Split-conformal calibration from the residuals of every validation window, per series.

    Logs a warning for each series with too few windows for a level's exact quantile (its
    largest residual is used instead; `calibration.json` marks the level `capped`).
    """
    calibration = fit_calibration({name: r.residuals for name, r in results.items()}, levels)
    for name, series in calibration.series.items():
        for level, capped in zip(series.levels, series.capped, strict=True):
            if capped:
                logger.warning(
                    "series %s: %d validation windows are too few for a %g conformal interval; "
                    "its largest residual is used",
                    name,
                    series.n_residuals,
                    level,
                )
    return calibration


def summary(evaluations: dict[str, Evaluation]) -> dict[str, float]:
    """Window-weighted mean MSE and MAE over series (equal to the protocol for one series)."""
    n = np.array([e.n_windows for e in evaluations.values()], dtype=np.float64)
    mse = np.array([e.metrics["mse"] for e in evaluations.values()])
    mae = np.array([e.metrics["mae"] for e in evaluations.values()])
    return {
        "mse": float((n * mse).sum() / n.sum()),
        "mae": float((n * mae).sum() / n.sum()),
        "n_windows": int(n.sum()),
    }


@dataclass(frozen=True)
class BundleScore:
    """What scoring the exported model in the staging folder yields for the bundle."""

    metrics: dict[str, Any]
    calibration: Calibration | None = None


def write_bundle(
    folder: Path,
    model: Any,
    config: Config,
    prepared: PreparedData,
    *,
    method: str,
    method_reason: str,
    history: Any,
    score: Callable[[Path], BundleScore] | None = None,
) -> Path:
    """Export the model (window + step graphs) with its preprocessing into a bundle folder.

    Written to a temporary sibling folder and renamed into place, replacing an older bundle
    only once the new one is complete. `score(model_path)` evaluates the exported window model
    in the staging folder; its metrics are stored as the bundle's `metrics` and its calibration,
    if any, as `calibration.json`.
    """
    from forecaster.export import export_onnx

    staging = staging_dir(folder)
    try:
        metadata = {"training_method": method, "config_name": config.name}
        for graph, name in (("window", MODEL_FILE), ("step", STEP_MODEL_FILE)):
            export_onnx(
                model,
                staging / name,
                lookback=config.window.lookback,
                freq=prepared.data.freq,
                metadata=metadata,
                graph=graph,  # type: ignore[arg-type]
            )
        prepared.spec.save(staging / PREPROCESSING_FILE)
        from pipelines.stationarity import save_report

        save_report(prepared.decision, staging / STATIONARITY_FILE)
        scored = score(staging / MODEL_FILE) if score is not None else BundleScore(metrics={})
        if scored.calibration is not None:
            scored.calibration.save(staging / CALIBRATION_FILE)
        record = {
            "format_version": 1,
            "name": config.name,
            "model": config.model.model_dump(),
            "lookback": config.window.lookback,
            "horizon": config.window.horizon,
            "freq": prepared.data.freq,
            "training_method": method,
            "method_reason": method_reason,
            "metrics": scored.metrics,
            "history": history.to_dict(),
        }
        atomic_write_text(staging / METADATA_FILE, json.dumps(record, indent=2) + "\n")
        replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def run_training(
    config: Config,
    *,
    method: str | None = None,
    device: str | None = None,
    data_path: Path | None = None,
    out_dir: Path | None = None,
    resume: bool = True,
    progress: bool = False,
    callbacks: Sequence[Any] = (),
    prepared: PreparedData | None = None,
) -> TrainOutcome:
    """The whole job: prepare, train, export, evaluate the exported model, write the bundle.

    `prepared` skips the front of the pipeline when the caller already ran it on this config.
    In a data-parallel run (`torchrun`, `forecaster.training.distributed`) every rank prepares
    the data and trains; only rank 0 exports, scores and writes the bundle.
    """
    from forecaster.training.distributed import current

    if prepared is None:
        prepared = prepare(config, data_path=data_path)
    inputs = model_inputs(prepared)
    out = out_dir if out_dir is not None else config.output_dir
    requested = method or config.train.method
    model, used, reason, history = train_model(
        config,
        prepared,
        inputs,
        method=method,
        device=device,
        checkpoint_dir=out / "checkpoints" / requested,
        resume=resume,
        callbacks=callbacks,
        progress=progress,
    )
    if not current().is_main:
        return TrainOutcome(model, used, reason, history, evaluations={}, bundle=None)
    horizon = config.window.horizon
    evaluations: dict[str, dict[str, float]] = {}
    calibrations: list[Calibration] = []
    test_forecasts: list[dict[str, PartForecasts]] = []

    def score(model_path: Path) -> BundleScore:
        session = open_session(model_path)
        val = forecast_part(session, prepared, inputs, horizon, "val")
        test = forecast_part(session, prepared, inputs, horizon, "test")
        calibrations.append(calibrate(val))
        test_forecasts.append(test)
        evaluations["val"] = summary(evaluations_of(val))
        evaluations["test"] = {
            **summary(evaluations_of(test)),
            **interval_metrics(calibrations[-1], test),
        }
        return BundleScore(metrics=evaluations, calibration=calibrations[-1])

    bundle = write_bundle(
        out / f"bundle_{requested}",
        model,
        config,
        prepared,
        method=used,
        method_reason=reason,
        history=history,
        score=score,
    )
    return TrainOutcome(
        model=model,
        method=used,
        method_reason=reason,
        history=history,
        evaluations=evaluations,
        bundle=bundle,
        calibration=calibrations[-1],
        test_forecasts=test_forecasts[-1],
    )


def evaluate_baselines(
    prepared: PreparedData,
    horizon: int,
    part: Part = "test",
    *,
    execution: Execution = "local",
    workers: int | None = None,
) -> dict[str, dict[str, float]]:
    """Repeat-last and seasonal-naive on the same windows, one series per task of `execution`.

    The season is the shortest fitted seasonal period, else the daily period of the data's
    frequency (`seasonal_periods`), else 1. The per-series stage is `baseline_scores` (one
    series' frame in, its evaluations out), run by `pipelines.executor.run_per_series`.
    """
    from forecaster.data import seasonal_periods
    from pipelines.executor import run_per_series, split_series

    natural = seasonal_periods(prepared.data.freq)
    seasons: dict[str, int] = {}
    for name in prepared.splits:
        profiles = prepared.spec.for_series(name).seasonality.profiles
        seasons[name] = min((p.period for p in profiles), default=natural[0] if natural else 1)
    stage = functools.partial(
        baseline_scores, splits=prepared.splits, seasons=seasons, horizon=horizon, part=part
    )
    frames = split_series(prepared.data.frame)
    scored = run_per_series(stage, frames, execution=execution, workers=workers)
    results: dict[str, dict[str, Evaluation]] = {"repeat_last": {}, "seasonal_naive": {}}
    for frame, evaluations in zip(frames, scored, strict=True):
        for kind, evaluation in evaluations.items():
            results[kind][str(frame[ID_COL].iloc[0])] = evaluation
    return {kind: summary(per_series) for kind, per_series in results.items()}


def baseline_scores(
    frame: pd.DataFrame,
    *,
    splits: Mapping[str, Split],
    seasons: Mapping[str, int],
    horizon: int,
    part: Part = "test",
) -> dict[str, Evaluation]:
    """One series' repeat-last and seasonal-naive evaluations (a per-series executor stage)."""
    from forecaster.baselines import baseline

    name = str(frame[ID_COL].iloc[0])
    values = frame["y"].to_numpy(np.float64)
    return {
        kind: evaluate_forecaster(fn, values, splits[name], horizon, part=part)
        for kind, fn in (
            ("repeat_last", baseline("repeat_last", horizon)),
            ("seasonal_naive", baseline("seasonal_naive", horizon, season=seasons[name])),
        )
    }


def _check_bundle_window(config: Config, bundle: Path) -> None:
    """The config's look-back and horizon are the bundle's (`metadata.json`): a model exported
    for another window would be scored on windows it was not built for.

    Raises:
        ConfigError: naming the key, the config's value and the bundle's.
        ModelError: the bundle's metadata is not valid JSON.
    """
    path = bundle / METADATA_FILE
    if not path.is_file():
        return  # an older bundle without metadata: the model's own shapes decide
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path} is not valid bundle metadata: {exc}", field="bundle") from exc
    for key in ("lookback", "horizon"):
        ours, theirs = getattr(config.window, key), metadata.get(key)
        if theirs is not None and ours != theirs:
            raise ConfigError(
                f"window.{key}: {ours} in the config, but the bundle {bundle} was trained with "
                f"{theirs}: evaluate with the training config (or --set window.{key}={theirs})",
                field=f"window.{key}",
            )


def evaluate_bundle(
    config: Config, bundle: Path, *, data_path: Path | None = None, part: Part = "test"
) -> dict[str, dict[str, float]]:
    """Score a bundle's ONNX model and the baselines on the config's data with the protocol.

    The bundle's own `preprocessing.json` is applied (not a refit), so the score is the one the
    served model would get; when the bundle has a `calibration.json`, the model's score also has
    the coverage and width of its intervals (see `interval_metrics`).
    """
    from forecaster.transform import PreprocessingSpec

    _check_bundle_window(config, bundle)
    prepared = prepare(config, data_path=data_path)
    spec = PreprocessingSpec.load(bundle / PREPROCESSING_FILE)
    prepared = PreparedData(
        data=prepared.data, splits=prepared.splits, spec=spec, decision=prepared.decision
    )
    session = open_session(bundle / MODEL_FILE)
    horizon = config.window.horizon
    results = forecast_part(session, prepared, model_inputs(prepared), horizon, part)
    scores = {"model": summary(evaluations_of(results))}
    if (bundle / CALIBRATION_FILE).is_file():
        calibration = Calibration.load(bundle / CALIBRATION_FILE)
        scores["model"].update(interval_metrics(calibration, results))
    scores.update(
        evaluate_baselines(
            prepared, horizon, part, execution=config.execution, workers=config.workers
        )
    )
    return scores
