"""The demo: the whole path that exists, end to end, on embedded synthetic plant data.

Steps (DESIGN.md §9): generate and validate data, fit preprocessing on the training window, run
the stationarity gate, build the model family's MI-GRU, export it to ONNX (full-window and
stateful step graphs, parity-checked against PyTorch), and forecast every series through ONNX
Runtime, inverting the preprocessing. Progress goes to a `report` callback; the CLI renders it.
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
from forecaster.transform import future_timestamps, inverse_forecast, transform
from pipelines.prepare import PreparedData, prepare

logger = logging.getLogger(__name__)

Report = Callable[[str], None]

# The demo's model: small enough to build and export in about a second on a laptop CPU.
DEMO_MODEL = "mi_gru"
DEMO_HIDDEN_SIZE = 32


@dataclass(frozen=True)
class SeriesForecast:
    """One series' forecast from the last look-back window, in the units of `y`."""

    unique_id: str
    ds: npt.NDArray[np.datetime64]
    forecast: npt.NDArray[np.float64]
    step_matches_window: bool


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: the prepared data, files written and per-series forecasts."""

    prepared: PreparedData
    files: list[Path]
    forecasts: list[SeriesForecast]


def run_demo(config: Config, out_dir: Path, report: Report) -> DemoResult:
    """Run every stage that exists on the config's data and write the artifacts to `out_dir`."""
    report(f"[1/4] data and preprocessing ({config.data.source}) → {out_dir}")
    prepared = prepare(config)
    files = prepared.write(out_dir / "preprocess")
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
    report(f"[2/4] stationarity gate: {decision.method} (d={decision.differences})")
    report(f"      {decision.reason}")

    report(f"[3/4] model: {DEMO_MODEL} (hidden {DEMO_HIDDEN_SIZE}) → ONNX")
    window_path, step_path = _export_demo_model(config, out_dir / "model", report)
    files += [window_path, step_path]

    report("[4/4] forecasts through ONNX Runtime (untrained weights: the path, not the accuracy)")
    forecasts = _forecast_all(prepared, config, window_path, step_path)
    for item in forecasts:
        head = ", ".join(f"{v:.3f}" for v in item.forecast[:4])
        report(
            f"      {item.unique_id}: {len(item.forecast)} steps from "
            f"{np.datetime_as_string(item.ds[0], unit='s')}: {head}, … "
            f"(step graph agrees: {item.step_matches_window})"
        )
    return DemoResult(prepared=prepared, files=files, forecasts=forecasts)


def _export_demo_model(config: Config, folder: Path, report: Report) -> tuple[Path, Path]:
    import torch

    from forecaster.export import export_onnx
    from forecaster.models.registry import build

    torch.manual_seed(config.seed)
    model = build(
        DEMO_MODEL, input_size=1, hidden_size=DEMO_HIDDEN_SIZE, horizon=config.window.horizon
    )
    model.eval()
    paths = []
    for graph in ("window", "step"):
        exported = export_onnx(
            model,
            folder / f"model_{graph}.onnx",
            lookback=config.window.lookback,
            graph=graph,  # type: ignore[arg-type]
        )
        report(
            f"      {graph} graph: {exported.node_count} nodes, export {exported.export_s:.2f} s, "
            f"parity max |Δ| {exported.parity_max_abs_diff:.1e}"
        )
        paths.append(exported.path)
    return paths[0], paths[1]


def _forecast_all(
    prepared: PreparedData, config: Config, window_path: Path, step_path: Path
) -> list[SeriesForecast]:
    lookback, horizon = config.window.lookback, config.window.horizon
    window_session = open_session(window_path)
    step_session = open_session(step_path)
    results = []
    for uid, frame in prepared.data.frame.groupby(ID_COL, sort=False):
        spec = prepared.spec.for_series(str(uid))
        ds = frame["ds"].to_numpy()
        transformed = transform(spec, frame["y"].to_numpy(), ds, series_id=str(uid))
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
