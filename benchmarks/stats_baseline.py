"""A statistical baseline on ETT: statsforecast's AutoETS on every test window (issue 12).

Question: what test MSE / MAE does a per-window statistical model reach on the standard ETT
protocol (univariate OT, look-back 336, every test window, z-scored on the train part), next to
repeat-last and the seasonal naive, scored by the same harness
(`forecaster.evaluation.evaluate_forecaster` with `forecaster.baselines.baseline`)?

AutoETS (or AutoARIMA) is selected and fitted afresh on each 336-step window, with the season of
the data's day (24 hourly steps, 96 quarter-hours); about 0.3 s a window for AutoETS on one core,
so the windows of each batch are spread over `--jobs` processes. AutoARIMA takes ~40 s a window
at season 24: a full test part would take days on two cores.

Needs the optional package statsforecast (`pip install 'forecaster[stats]'`). Writes
benchmarks/results/stats_baseline.json and .md. Run: python benchmarks/stats_baseline.py
(`--horizons 96` for one horizon).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from _common import write_results  # noqa: E402

from forecaster.baselines import baseline, statsforecast_forecast  # noqa: E402
from forecaster.data import ett_split, read_wide  # noqa: E402
from forecaster.evaluation import Evaluation, evaluate_forecaster  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ett"
SEASON = {"ETTh": 24, "ETTm": 96}
BATCH = 64  # windows per harness call, spread over the processes


def pooled_forecast(
    inputs: np.ndarray,
    *,
    pool: ProcessPoolExecutor,
    jobs: int,
    horizon: int,
    model: str,
    season: int,
) -> np.ndarray:
    """`statsforecast_forecast` of a batch `[b, L] -> [b, H]`, its windows split over the pool."""
    chunks = np.array_split(inputs, min(jobs, len(inputs)))
    fit = partial(statsforecast_forecast, horizon=horizon, model=model, season=season)
    return np.concatenate(list(pool.map(fit, chunks)))


def _mse_mae(result: Evaluation) -> dict[str, float]:
    return {k: round(float(result.metrics[k]), 5) for k in ("mse", "mae")}


def score(
    values: np.ndarray,
    family: str,
    horizon: int,
    lookback: int,
    model: str,
    *,
    pool: ProcessPoolExecutor,
    jobs: int,
) -> dict[str, Any]:
    """Repeat-last, the seasonal naive and `model` (fitted on `jobs` processes of `pool`) on
    every test window at `horizon`."""
    split = ett_split(len(values), dataset=family, lookback=lookback)  # type: ignore[arg-type]
    season = SEASON[family]
    row: dict[str, Any] = {"horizon": horizon, "season": season}
    for name, fn in (
        ("repeat_last", baseline("repeat_last", horizon)),
        ("seasonal_naive", baseline("seasonal_naive", horizon, season=season)),
    ):
        row[name] = _mse_mae(evaluate_forecaster(fn, values, split, horizon))
    started = time.perf_counter()
    fit = partial(
        pooled_forecast, pool=pool, jobs=jobs, horizon=horizon, model=model, season=season
    )
    result = evaluate_forecaster(fit, values, split, horizon, batch_size=BATCH)
    seconds = time.perf_counter() - started
    row[model] = _mse_mae(result)
    row["windows"] = result.n_evaluated
    row["seconds"] = round(seconds, 1)
    row["seconds_per_window_per_process"] = round(seconds * jobs / result.n_evaluated, 3)
    return row


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    model = s["model"]
    lines = [
        f"# {model} on {s['dataset']} (OT, univariate): every test window, standard protocol",
        "",
        f"Look-back {s['lookback']}, season {s['season']}; MSE / MAE on the train-z-scored scale "
        f"over all test windows; {model} selected and fitted afresh on each window "
        f"(statsforecast {s['statsforecast']}), {s['jobs']} processes.",
        "",
        f"| H | windows | repeat-last MSE | seasonal naive MSE | {model} MSE | {model} MAE "
        "| seconds | s / window / process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['horizon']} | {r['windows']} | {r['repeat_last']['mse']:.4f} "
            f"| {r['seasonal_naive']['mse']:.4f} | {r[model]['mse']:.4f} | {r[model]['mae']:.4f} "
            f"| {r['seconds']:.0f} | {r['seconds_per_window_per_process']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ETTh1", choices=["ETTh1", "ETTh2", "ETTm1", "ETTm2"])
    parser.add_argument("--horizons", type=int, nargs="+", default=[96, 192, 336, 720])
    parser.add_argument("--model", default="auto_ets", choices=["auto_ets", "auto_arima"])
    parser.add_argument("--lookback", type=int, default=336)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of ETT*.csv")
    args = parser.parse_args()
    try:
        import statsforecast
    except ImportError:
        parser.error("needs the optional package statsforecast: pip install 'forecaster[stats]'")
    path = args.data_dir / f"{args.dataset}.csv"
    if not path.is_file():
        parser.error(f"{path}: no such file (ETT data lives in ../shared/data/ett)")
    values = read_wide(path, columns=["OT"])["y"].to_numpy()
    family = args.dataset[:4]
    started = time.perf_counter()
    rows = []
    # One pool for every horizon: its processes import statsforecast and compile its models once.
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for horizon in args.horizons:
            rows.append(
                score(values, family, horizon, args.lookback, args.model, pool=pool, jobs=args.jobs)
            )
            print(rows[-1], flush=True)
    payload = {
        "settings": {
            "dataset": args.dataset,
            "model": args.model,
            "lookback": args.lookback,
            "season": SEASON[family],
            "jobs": args.jobs,
            "statsforecast": statsforecast.__version__,
            "protocol": "../shared/data/README.md §1 (all test windows)",
            "seconds": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
    }
    write_results("stats_baseline", payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
