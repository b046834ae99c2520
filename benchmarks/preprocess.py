"""Preprocessing + stationarity gate throughput against a plain statsmodels loop.

Question (issue 3): how many hourly series per second does the per-series front of the pipeline
(fit trend + STL + scaling, then ADF + KPSS on the residual) handle on one and two processes, at
what peak memory, and what does it cost next to a loop that calls statsmodels directly with the
same settings (linear trend by least squares, the same STL options, `adfuller(regression="ct",
autolag="AIC")`, `kpss("c")`, `kpss("ct")`)? Targets: >= 30 series/s per core, <= 1.1x the
direct loop; validating the whole 2M-row frame within 4 s. Both sides run with single-threaded
BLAS in every worker, on the same series.

Writes benchmarks/results/preprocess.json and .md. Run: python benchmarks/preprocess.py
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402

from forecaster.config import PreprocessConfig, StationarityConfig  # noqa: E402
from forecaster.data import generate_plant, validate  # noqa: E402
from forecaster.transform import transform  # noqa: E402
from pipelines.preprocess import (  # noqa: E402
    STL_INNER_ITER,
    STL_OUTER_ITER,
    fit_series,
    stl_options,
)
from pipelines.stationarity import check  # noqa: E402

PERIOD = 24
CONFIG = PreprocessConfig(trend="linear", seasonality="stl", periods=[PERIOD], scaling="standard")
ALPHA = StationarityConfig().alpha

Series = tuple[str, npt.NDArray[np.float64], npt.NDArray[np.datetime64]]


def _single_thread_blas() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def ours(series: Series) -> str:
    """The pipeline's per-series stage: fit the preprocessing, test the residual."""
    uid, y, ds = series
    spec = fit_series(y, ds, CONFIG, series_id=uid)
    residual = transform(spec, y, ds, series_id=uid).residual
    return check(residual, alpha=ALPHA).verdict


def direct(series: Series) -> float:
    """The same work written as direct statsmodels calls."""
    from statsmodels.tsa.seasonal import STL
    from statsmodels.tsa.stattools import adfuller, kpss

    _, y, _ = series
    t = np.arange(y.shape[0], dtype=np.float64)
    slope, intercept = np.polyfit(t, y, 1)
    detrended = y - (intercept + slope * t)
    stl = STL(detrended, period=PERIOD, **stl_options(PERIOD)).fit(
        inner_iter=STL_INNER_ITER, outer_iter=STL_OUTER_ITER
    )
    residual = detrended - stl.seasonal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adf = adfuller(residual, regression="ct", autolag="AIC")
        kpss(residual, regression="c", nlags="auto")
        kpss(residual, regression="ct", nlags="auto")
    return float(adf[1])


def _run(fn: Any, series: list[Series], processes: int) -> float:
    start = time.perf_counter()
    if processes == 1:
        for item in series:
            fn(item)
    else:
        ctx = mp.get_context("fork")
        with ctx.Pool(processes, initializer=_single_thread_blas) as pool:
            pool.map(fn, series, chunksize=max(1, len(series) // (processes * 8)))
    return time.perf_counter() - start


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def _timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    _single_thread_blas()
    plant = generate_plant(n_series=args.series, length=args.length, freq="h", seed=0)
    series: list[Series] = [
        (str(uid), g["y"].to_numpy(np.float64), g["ds"].to_numpy())
        for uid, g in plant.frame.groupby("unique_id", sort=False)
    ]
    # Warm both paths (imports, statsmodels' lazy tables) before timing.
    for item in series[:3]:
        ours(item)
        direct(item)
    base_mb = _peak_mb(resource.RUSAGE_SELF)

    rows = []
    for processes in args.processes:
        t_ours = _run(ours, series, processes)
        t_direct = _run(direct, series, processes)
        peak = _peak_mb(resource.RUSAGE_SELF if processes == 1 else resource.RUSAGE_CHILDREN)
        rows.append(
            {
                "processes": processes,
                "ours_s": round(t_ours, 3),
                "direct_s": round(t_direct, 3),
                "ours_series_per_s": round(len(series) / t_ours, 1),
                "ours_series_per_s_per_core": round(len(series) / t_ours / processes, 1),
                "direct_series_per_s": round(len(series) / t_direct, 1),
                "ratio_to_direct": round(t_ours / t_direct, 3),
                "peak_rss_mb": round(peak, 1),
            }
        )
        print(rows[-1])

    # Validation of the whole long-format frame (the first step of every job): best of 3.
    validate_s = min(_timed(validate, plant.frame) for _ in range(3))
    print(f"validate: {len(plant.frame)} rows in {validate_s:.3f} s")

    verdicts: dict[str, int] = {}
    for item in series:
        verdict = ours(item)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1

    per_core = min(r["ours_series_per_s_per_core"] for r in rows)
    worst_ratio = max(r["ratio_to_direct"] for r in rows)
    payload = {
        "question": "per-series preprocessing + ADF/KPSS gate throughput vs direct statsmodels",
        "n_series": len(series),
        "length": args.length,
        "freq": "h",
        "stl_period": PERIOD,
        "baseline_rss_mb": round(base_mb, 1),
        "runs": rows,
        "verdicts": verdicts,
        "validate_rows": len(plant.frame),
        "validate_s": round(validate_s, 3),
        "targets": {
            "series_per_s_per_core >= 30": per_core >= 30,
            "ratio_to_direct <= 1.1": worst_ratio <= 1.1,
            "validate_s <= 4": validate_s <= 4.0,
        },
    }
    table = [
        "# Preprocessing + stationarity gate throughput (issue 3)",
        "",
        f"{len(series)} synthetic hourly plant series x {args.length} points; per series: linear "
        f"trend, robust STL (period {PERIOD}), standard scaling, ADF (ct, AIC) + KPSS (c, ct). "
        "`direct` = the same steps as plain statsmodels calls. Single-threaded BLAS everywhere.",
        "",
        "| processes | ours s | direct s | ours series/s | per core | direct series/s "
        "| ours / direct | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['processes']} | {r['ours_s']} | {r['direct_s']} | {r['ours_series_per_s']} "
            f"| {r['ours_series_per_s_per_core']} | {r['direct_series_per_s']} "
            f"| {r['ratio_to_direct']} | {r['peak_rss_mb']} |"
        )
    table += [
        "",
        f"Targets: >= 30 series/s per core: {'met' if per_core >= 30 else 'missed'} "
        f"({per_core}); <= 1.1x direct: {'met' if worst_ratio <= 1.1 else 'missed'} "
        f"({worst_ratio}x). Verdicts: {verdicts}.",
        "",
        f"Validation of the whole frame ({len(plant.frame):,} rows, `forecaster.data.validate`, "
        f"best of 3): {validate_s:.3f} s (budget 4 s: "
        f"{'met' if validate_s <= 4.0 else 'missed'}).",
    ]
    write_results("preprocess", payload, "\n".join(table))


if __name__ == "__main__":
    main()
