"""The demo: the whole path that exists, end to end, on embedded synthetic plant data.

Steps (DESIGN.md §9): generate and validate data, fit preprocessing on the training window, run
the stationarity gate, train the fixed-feedback champion candidate and the BPTT fallback, export
both to ONNX (full-window and stateful step graphs, parity-checked against PyTorch), track every
run in the embedded MLflow store and register both under the `champion` / `fallback` aliases,
score them and the baselines on every test window, and forecast every series through ONNX
Runtime with the preprocessing inverted. Progress goes to a `report` callback; the CLI renders it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from forecaster.config import Config
from forecaster.data import ID_COL
from forecaster.inference import forecast_step, forecast_window, initial_state, open_session
from forecaster.transform import future_timestamps, inverse_forecast
from pipelines.prepare import PreparedData, prepare
from pipelines.tracking import CHAMPION, FALLBACK, open_tracking
from pipelines.train import (
    MODEL_FILE,
    STEP_MODEL_FILE,
    TrainOutcome,
    evaluate_baselines,
    model_inputs,
    run_training,
)

logger = logging.getLogger(__name__)

Report = Callable[[str], None]


@dataclass(frozen=True)
class SeriesForecast:
    """One series' forecast from the last look-back window, in the units of `y`."""

    unique_id: str
    ds: npt.NDArray[np.datetime64]
    forecast: npt.NDArray[np.float64]
    step_matches_window: bool


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: the prepared data, trained models, scores and forecasts."""

    prepared: PreparedData
    outcomes: dict[str, TrainOutcome]
    scores: dict[str, dict[str, float]]
    forecasts: list[SeriesForecast]


def run_demo(config: Config, out_dir: Path, report: Report) -> DemoResult:
    """Run every stage that exists on the config's data and write the artifacts to `out_dir`."""
    report(f"[1/5] data and preprocessing ({config.data.source}) → {out_dir}")
    prepared = prepare(config)
    prepared.write(out_dir / "preprocess")
    data = prepared.data
    report(
        f"      {data.n_series} series, frequency {data.freq}, "
        f"{sum(data.rows_per_series.values())} rows; warnings: {len(data.warnings)}"
    )
    for uid, series in prepared.spec.series.items():
        periods = [p.period for p in series.seasonality.profiles]
        report(
            f"      {uid}: trend slope {series.trend.slope:+.3g}/step, periods {periods}, "
            f"scale {series.scaling.scale:.3g}, differencing {series.difference}"
        )
    decision = prepared.decision
    report(f"[2/5] stationarity gate: {decision.method} (d={decision.differences})")
    report(f"      {decision.reason}")

    outcomes: dict[str, TrainOutcome] = {}
    horizon = config.window.horizon
    tracking = open_tracking(config.model_copy(update={"output_dir": out_dir}))
    with tracking.start_retrain("demo") as run:
        run.log_data(config, prepared)
        logged = {}
        for method, role in (("feedback", "champion candidate"), ("bptt", "fallback")):
            report(f"[3/5] training the {role}: {config.model.name}, method {method}")
            tracker = run.child(method)
            outcome = run_training(
                config,
                method=method,
                out_dir=out_dir,
                resume=False,
                prepared=prepared,
                callbacks=[tracker],
            )
            logged[method] = run.log_training(tracker, config, prepared, outcome, role=method)
            history = outcome.history
            report(
                f"      trained with {outcome.method}: {len(history.epochs)} epochs, "
                f"{history.total_seconds:.1f} s, best validation loss {history.best_val_loss:.4f}"
            )
            outcomes[method] = outcome
        baselines = evaluate_baselines(prepared, horizon)
        run.log_baselines(baselines)
        for method, alias in (("feedback", CHAMPION), ("bptt", FALLBACK)):
            decision = run.register_and_promote(logged[method], alias, prepared, horizon)
            verb = "promoted" if decision.promoted else "kept"
            report(f"      registry @{alias}: {verb} — {decision.reason}")

    report("[4/5] test windows, z-scored MSE / MAE (every window of the test part)")
    scores = {f"{config.model.name} ({m})": o.evaluations["test"] for m, o in outcomes.items()}
    scores.update(baselines)
    for name, score in scores.items():
        report(f"      {name:<22} MSE {score['mse']:.4f}  MAE {score['mae']:.4f}")

    champion = outcomes["feedback"].bundle
    report(f"[5/5] forecasts through ONNX Runtime from {champion}")
    forecasts = _forecast_all(prepared, config, champion / MODEL_FILE, champion / STEP_MODEL_FILE)
    for item in forecasts:
        head = ", ".join(f"{v:.3f}" for v in item.forecast[:4])
        report(
            f"      {item.unique_id}: {len(item.forecast)} steps from "
            f"{np.datetime_as_string(item.ds[0], unit='s')}: {head}, … "
            f"(step graph agrees: {item.step_matches_window})"
        )
    report(f"compare runs and versions: mlflow ui --backend-store-uri {tracking.uri}")
    return DemoResult(prepared=prepared, outcomes=outcomes, scores=scores, forecasts=forecasts)


def _forecast_all(
    prepared: PreparedData, config: Config, window_path: Path, step_path: Path
) -> list[SeriesForecast]:
    lookback, horizon = config.window.lookback, config.window.horizon
    window_session = open_session(window_path)
    step_session = open_session(step_path)
    inputs = model_inputs(prepared)
    results = []
    for uid, frame in prepared.data.frame.groupby(ID_COL, sort=False):
        spec = prepared.spec.for_series(str(uid))
        ds = frame["ds"].to_numpy()
        transformed = inputs.transformed[str(uid)]
        x = transformed.values[-lookback:].astype(np.float32)[None, :, None]  # [1, L, 1]
        z = forecast_window(window_session, x)[0]  # [H]
        # The serving path for known series: the same window fed in chunks through the step graph.
        state = initial_state(step_session, 1)
        for start in range(0, lookback, 48):
            step = forecast_step(step_session, x[:, start : start + 48], state)
            state = step.state
        future = future_timestamps(spec, ds[-1], horizon)
        forecast = inverse_forecast(
            spec, z.astype(np.float64), future, transformed.last_levels, series_id=str(uid)
        )
        results.append(
            SeriesForecast(
                unique_id=str(uid),
                ds=future,
                forecast=forecast,
                step_matches_window=bool(np.allclose(step.forecast[0], z, atol=1e-4)),
            )
        )
    return results
