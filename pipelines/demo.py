"""The demo: the whole path that exists, end to end, on embedded synthetic plant data.

Steps (DESIGN.md §9): generate and validate data, fit preprocessing on the training window, run
the stationarity gate, train the fixed-feedback champion candidate and the BPTT fallback, export
both to ONNX (full-window and stateful step graphs, parity-checked against PyTorch), track every
run in the embedded MLflow store and register both under the `champion` / `fallback` aliases,
score them and the baselines on every test window, forecast every series through ONNX
Runtime with the preprocessing inverted, score every point for anomalies with the causal detector
(checked against the generator's labels), and answer one forecast over HTTP from a real
`bentoml serve` of the two bundles, plus one anomaly request checked against the in-process
detector and one screened against the champion's one-step forecasts. Progress goes to a
`report` callback; the CLI renders it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from forecaster.config import Config
from forecaster.data import ID_COL, generate_plant
from forecaster.inference import forecast_step, forecast_window, initial_state, open_session
from forecaster.redaction import redact
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

# `forecaster demo` without `--config`: the settings of configs/demo.yaml (a test keeps the two
# equal), so an installed package runs the same quick demo without the repository's files.
DEMO_SETTINGS: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "output_dir": ".demo",
    "data": {
        "source": "synthetic",
        "synthetic": {
            "n_series": 3,
            "length": 2016,
            "freq": "h",
            "n_anomalies": 3,
            "n_level_shifts": 1,
            "seed": 0,
        },
        "split": {"kind": "holdout", "val_size": 168, "test_size": 168},
    },
    "window": {"lookback": 168, "horizon": 24},
    "preprocess": {
        "trend": "robust",
        "seasonality": "mstl",
        "periods": [24, 168],
        "scaling": "standard",
    },
    "stationarity": {"alpha": 0.05, "remedy": "difference", "d_max": 1},
    "model": {"name": "mi_gru", "hidden_size": 32},
    "train": {
        "method": "feedback",
        "epochs": 4,
        "batch_size": 32,
        "max_windows": 512,
        "patience": 2,
    },
}

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
    served_max_abs_diff: float


def run_demo(config: Config, out_dir: Path, report: Report) -> DemoResult:
    """Run every stage that exists on the config's data and write the artifacts to `out_dir`."""
    report(f"[1/7] data and preprocessing ({config.data.source}) → {out_dir}")
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
    report(f"[2/7] stationarity gate: {decision.method} (d={decision.differences})")
    report(f"      {decision.reason}")

    outcomes: dict[str, TrainOutcome] = {}
    horizon = config.window.horizon
    tracking = open_tracking(config.model_copy(update={"output_dir": out_dir}))
    with tracking.start_retrain("demo") as run:
        run.log_data(config, prepared)
        logged = {}
        for method, role in (("feedback", "champion candidate"), ("bptt", "fallback")):
            report(f"[3/7] training the {role}: {config.model.name}, method {method}")
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

    report("[4/7] test windows, z-scored MSE / MAE (every window of the test part)")
    scores = {f"{config.model.name} ({m})": o.evaluations["test"] for m, o in outcomes.items()}
    scores.update(baselines)
    for name, score in scores.items():
        report(f"      {name:<22} MSE {score['mse']:.4f}  MAE {score['mae']:.4f}")

    champion = outcomes["feedback"].bundle
    report(f"[5/7] forecasts through ONNX Runtime from {champion}")
    forecasts = _forecast_all(prepared, config, champion / MODEL_FILE, champion / STEP_MODEL_FILE)
    for item in forecasts:
        head = ", ".join(f"{v:.3f}" for v in item.forecast[:4])
        report(
            f"      {item.unique_id}: {len(item.forecast)} steps from "
            f"{np.datetime_as_string(item.ds[0], unit='s')}: {head}, … "
            f"(step graph agrees: {item.step_matches_window})"
        )
    report("[6/7] anomaly scores, causal (fitted on each series' first 15%, then online)")
    _detect_all(prepared, config, report)

    report(
        "[7/7] serving: bentoml serve of the two bundles on 127.0.0.1, "
        "one POST /forecast and one POST /anomaly"
    )
    fallback = outcomes["bptt"].bundle
    served = _serve_once(prepared, champion, fallback, out_dir / "bentoml")
    diff = float(np.max(np.abs(served["point"] - forecasts[0].forecast)))
    report(
        f"      {forecasts[0].unique_id}: answered by {served['model']} in {served['ms']:.0f} ms; "
        f"max |served - in-process| = {diff:.2e}"
    )
    report(
        f"      {forecasts[0].unique_id}: /anomaly flagged {served['flagged']} points in "
        f"{served['anomaly_ms']:.0f} ms; same flags as in process: {served['flags_match']}, "
        f"max |score difference| = {served['score_diff']:.2e}"
    )
    report(
        f"      {forecasts[0].unique_id}: /anomaly with the series' start, on the "
        f"{served['model_forecaster']}'s one-step forecasts: "
        f"flagged {served['model_flagged']} points"
    )
    report(
        "compare runs and versions: mlflow ui --backend-store-uri "
        + redact(tracking.uri, tracking.uri)
    )
    return DemoResult(
        prepared=prepared,
        outcomes=outcomes,
        scores=scores,
        forecasts=forecasts,
        served_max_abs_diff=diff,
    )


def _detect_all(prepared: PreparedData, config: Config, report: Report) -> None:
    """Score every series; with the synthetic source, count the injected events found."""
    from pipelines.detect import detect_values, settings_from

    labels = None
    if config.data.source == "synthetic":
        labels = generate_plant(**config.data.synthetic.model_dump()).anomalies
    for uid, frame in prepared.data.frame.groupby(ID_COL, sort=False):
        result, probation = detect_values(frame["y"].to_numpy(), settings_from(config))
        flagged = np.flatnonzero(result.is_anomaly)
        line = f"      {uid}: {len(flagged)} points flagged after {probation} fitting points"
        if labels is not None:
            ds = frame["ds"].to_numpy()
            events = labels.loc[labels[ID_COL] == uid, "ds"].to_numpy()
            scored = events[events >= ds[probation]]
            rows = np.sort(np.searchsorted(ds, scored))
            events = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(rows) else []
            found = sum(
                bool(np.any((flagged >= e[0] - 3) & (flagged <= e[-1] + 3))) for e in events
            )
            line += f"; injected events found: {found}/{len(events)} (within 3 rows)"
        report(line)


def _serve_once(
    prepared: PreparedData, champion: Path, fallback: Path, home: Path
) -> dict[str, object]:
    """Start the service on a free port, POST one forecast and one anomaly request, stop it.

    The anomaly answer is compared with the in-process detector on the same points (fitted on
    the same leading 15%).
    """
    from forecaster.anomaly import AnomalyDetector, probationary_length
    from serving.launch import server_command
    from serving.settings import ServingSettings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = ServingSettings(champion_bundle=champion, fallback_bundle=fallback)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    env.update(settings.to_env(), BENTOML_HOME=str(home))
    process = subprocess.Popen(
        server_command("127.0.0.1", port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with code {process.returncode}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("bentoml serve was not ready within 180 s")
            time.sleep(0.5)
        uid, frame = next(iter(prepared.data.frame.groupby(ID_COL, sort=False)))
        values = frame["y"].to_numpy()  # the whole history, as a client of a known series would
        start = np.datetime_as_string(frame["ds"].to_numpy()[0], unit="s")
        body = {"series": [{"unique_id": str(uid), "start": start, "values": values.tolist()}]}
        answer, elapsed_ms = _post(f"{base}/forecast", body)
        fit = probationary_length(len(values))
        anomaly_body = {"series": [{"unique_id": str(uid), "values": values.tolist()}]}
        anomalies, anomaly_ms = _post(f"{base}/anomaly", {**anomaly_body, "fit_size": fit})
        # With its start, the known series is screened against the champion's forecasts.
        on_model, _ = _post(f"{base}/anomaly", {**body, "fit_size": fit})
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    expected = AnomalyDetector().fit(values[:fit]).score(values, start=fit)
    served = anomalies["series"][0]
    flags = np.asarray(served["is_anomaly"], dtype=bool)
    return {
        "model": answer["model"],
        "ms": elapsed_ms,
        "point": np.asarray(answer["forecasts"][0]["point"], dtype=np.float64),
        "anomaly_ms": anomaly_ms,
        "flagged": int(flags.sum()),
        "flags_match": bool(np.array_equal(flags, expected.is_anomaly[fit:])),
        "score_diff": float(np.max(np.abs(np.asarray(served["score"]) - expected.score[fit:]))),
        "model_forecaster": on_model["series"][0]["forecaster"],
        "model_flagged": int(np.sum(on_model["series"][0]["is_anomaly"])),
    }


def _post(url: str, body: dict[str, object]) -> tuple[dict[str, Any], float]:
    """POST JSON, return the decoded answer and the round trip in milliseconds."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    return answer, 1000 * (time.perf_counter() - started)


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
