"""benchmarks/stats_baseline.py spreads each batch of windows over processes: the pooled forecasts
must be the per-window fits themselves, in the windows' order."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from benchmark_scripts import load_benchmark

from forecaster.baselines import statsforecast_forecast

stats_baseline = load_benchmark("stats_baseline")


def test_pooled_forecasts_equal_the_direct_fits_in_order() -> None:
    rng = np.random.default_rng(5)
    t = np.arange(96)
    inputs = np.stack(
        [3.0 * k + np.sin(2 * np.pi * t / 12) + 0.05 * rng.normal(size=t.size) for k in range(3)]
    )  # three windows of different levels: a reordering would show
    direct = statsforecast_forecast(inputs, 6, model="auto_ets", season=12)
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        pooled = stats_baseline.pooled_forecast(
            inputs, pool=pool, jobs=2, horizon=6, model="auto_ets", season=12
        )
    np.testing.assert_allclose(pooled, direct, rtol=1e-12)
    assert pooled.shape == (3, 6)
