"""Load on the real service over loopback: throughput, latency percentiles, errors, HTTP overhead.

Question (issue 7): how many series per second does `bentoml serve` answer on this machine, with
what p50/p95/p99 latency, and what does HTTP add to the in-process ONNX Runtime call? Setup:
an MI-GRU (hidden 64, L = 336, H = 96) trained briefly on 64 synthetic hourly series (accuracy
is not the question), served from its bundle by a real `bentoml serve` process on 127.0.0.1;
a bounded asyncio client (httpx) runs `c` concurrent clients for `--duration` seconds each, with
requests of 1 and 64 series (each series sends its last L + 1 points with a start timestamp).
"In-process" times the same requests through `serving.runtime.Runtime.forecast` (validation,
preprocessing, one ORT call, inversion) and the bare ORT call, in this process. Streaming: 8
clients each follow one series, sending its next 1-4 points per request, against a server that
carries the recurrent state (only the new points are sent and run) and one that recomputes the
whole window (the last L + 1 points are sent every time).

The client shares the machine's cores with the server, so figures are a lower bound for a
dedicated server. Writes benchmarks/results/serve_load.json and .md.
Run: python benchmarks/serve_load.py [--duration 60]
Quick A/B runs: `--workdir DIR` trains once and reuses the bundle, `--server-env K=V` sets a
server variable (e.g. FORECASTER_BATCH_MAX_ROWS=0), `--skip-streaming`, `--no-write`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402

from forecaster.config import parse_config  # noqa: E402
from forecaster.inference import forecast_window  # noqa: E402
from forecaster.transform import format_timestamp  # noqa: E402
from serving.launch import server_command  # noqa: E402
from serving.runtime import Runtime  # noqa: E402
from serving.schemas import ForecastRequest  # noqa: E402
from serving.settings import ServingSettings  # noqa: E402

LOOKBACK, HORIZON, HIDDEN, N_SERIES = 336, 96, 64, 64


def _train(folder: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A quickly trained bundle and each series' history (a bundle already in `folder` is
    reused)."""
    from pipelines.prepare import prepare
    from pipelines.train import run_training

    config = parse_config(
        {
            "name": "serve_load",
            "output_dir": str(folder),
            "data": {
                "synthetic": {"n_series": N_SERIES, "length": 1200, "seed": 7},
                "split": {"val_size": 168, "test_size": 168},
            },
            "window": {"lookback": LOOKBACK, "horizon": HORIZON},
            "preprocess": {"trend": "linear", "seasonality": "stl", "periods": [24]},
            "model": {"name": "mi_gru", "hidden_size": HIDDEN},
            "train": {"epochs": 1, "batch_size": 64, "max_windows": 128, "stride": 8},
        }
    )
    prepared = prepare(config)
    bundle = folder / "bundle_feedback"
    if not (bundle / "model.onnx").is_file():
        bundle = run_training(config, method="feedback", prepared=prepared, resume=False).bundle
    history = {
        str(uid): (frame["ds"].to_numpy(), frame["y"].to_numpy(np.float64))
        for uid, frame in prepared.data.frame.groupby("unique_id", sort=False)
    }
    return bundle, history


def _payload(history: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    series = []
    for uid in ids:
        ds, y = history[uid]
        points = LOOKBACK + 1
        series.append(
            {
                "unique_id": uid,
                "start": format_timestamp(ds[-points]),
                "values": y[-points:].tolist(),
            }
        )
    return {"series": series}


def _stats(latencies_s: list[float], seconds: float, series_per_request: int) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1e3
    return {
        "requests": len(latencies_s),
        "series_per_s": round(len(latencies_s) * series_per_request / seconds, 1),
        "requests_per_s": round(len(latencies_s) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if ms.size else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if ms.size else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
    }


async def _load(url: str, payload: dict[str, Any], clients: int, duration: float) -> dict:
    """`clients` concurrent loops posting `payload` for `duration` seconds."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    body = httpx.Request("POST", url, json=payload).content
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        deadline = time.perf_counter() + duration

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers)
                    status = response.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        **_stats(latencies, elapsed, len(payload["series"])),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def _overhead(
    url: str, bundle: Path, history: dict[str, Any], batches: list[int], runs: int
) -> dict[str, dict[str, float]]:
    """p50 of one HTTP request (one client, server otherwise idle), of the same request through
    `Runtime.forecast` in this process, and of the bare ORT call, interleaved call by call so
    that the machine's load drifts over all three alike."""
    runtime = Runtime(ServingSettings(champion_bundle=bundle, device="cpu"))
    model = runtime.models.loaded()[0]
    ids = sorted(history)
    results = {}
    with httpx.Client(timeout=30.0) as client, contextlib.closing(runtime):
        for batch in batches:
            payload = _payload(history, ids[:batch])
            request = ForecastRequest.model_validate(payload)
            body = httpx.Request("POST", url, json=payload).content
            headers = {"content-type": "application/json"}
            x = np.zeros((batch, LOOKBACK, 1), dtype=np.float32)
            timings: dict[str, list[float]] = {"http": [], "request_path": [], "ort_call": []}
            for _ in range(runs):
                started = time.perf_counter()
                client.post(url, content=body, headers=headers).raise_for_status()
                timings["http"].append(time.perf_counter() - started)
                started = time.perf_counter()
                runtime.forecast(request)
                timings["request_path"].append(time.perf_counter() - started)
                started = time.perf_counter()
                forecast_window(model.window, x)
                timings["ort_call"].append(time.perf_counter() - started)
            p50 = {key: statistics.median(values) * 1e3 for key, values in timings.items()}
            results[str(batch)] = {
                "http_p50_ms": round(p50["http"], 3),
                "request_path_ms": round(p50["request_path"], 3),
                "ort_call_ms": round(p50["ort_call"], 3),
                "overhead_p50_ms": round(p50["http"] - p50["request_path"], 3),
            }
    return results


async def _stream(
    url: str, history: dict[str, Any], clients: int, duration: float, incremental: bool
) -> dict:
    """Each client follows its own series, 1 to 4 new points a request: only the new points
    (`incremental`, the server carries the state) or its last L + 1 points every time."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ids = sorted(history)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        deadline = time.perf_counter() + duration

        async def one_client(c: int) -> None:
            uid = ids[c % len(ids)]
            ds, y = history[uid]
            rng = np.random.default_rng(c)
            first, end, fresh = LOOKBACK + 2, LOOKBACK + 2, True
            while time.perf_counter() < deadline:
                step = int(rng.integers(1, 5))
                if end + step > len(y):  # wrap around: the state no longer applies
                    end, fresh = first, True
                end += step
                count = LOOKBACK + 1 if fresh or not incremental else step
                item = {
                    "unique_id": uid,
                    "start": format_timestamp(ds[end - count]),
                    "values": y[end - count : end].tolist(),
                }
                started = time.perf_counter()
                response = await client.post(url, json={"series": [item]})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    fresh = False
                else:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                    fresh = True

        started = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "mode": "incremental" if incremental else "full_window",
        "clients": clients,
        **_stats(latencies, elapsed, 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


@contextlib.contextmanager
def _serving(
    bundle: Path, port: int, log: Path, extra: dict[str, str] | None = None
) -> Iterator[None]:
    """A `bentoml serve` of `bundle` on `port` for the block, ready when the block starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    env.update({"FORECASTER_CHAMPION_BUNDLE": str(bundle), "FORECASTER_DEVICE": "cpu"})
    env.update(extra or {})
    with log.open("wb") as handle:
        process = subprocess.Popen(
            server_command("127.0.0.1", port),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _ready(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready; see {log}")
            time.sleep(0.5)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _table(record: dict[str, Any]) -> str:
    server_env = ", ".join(f"{k}={v}" for k, v in record.get("server_env", {}).items())
    lines = [
        "# Serving load (loopback, real `bentoml serve`)",
        "",
        f"MI-GRU hidden {HIDDEN}, L = {LOOKBACK}, H = {HORIZON}; {record['duration_s']} s per "
        "row; the load generator shares the machine's cores with the server.",
        "",
        *([f"Server variables: {server_env}.", ""] if server_env else []),
        "| series / request | clients | series/s | requests/s | p50 ms | p95 ms | p99 ms "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["load"]:
        lines.append(
            f"| {row['series_per_request']} | {row['clients']} | {row['series_per_s']} | "
            f"{row['requests_per_s']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | "
            f"{row['errors']} |"
        )
    lines += [
        "",
        "| series / request | in-process request path p50 ms | bare ORT call p50 ms | "
        "HTTP p50 ms (1 client, interleaved) | HTTP overhead p50 ms |",
        "|---|---|---|---|---|",
    ]
    for batch, row in record["overhead"].items():
        lines.append(
            f"| {batch} | {row['request_path_ms']} | {row['ort_call_ms']} | {row['http_p50_ms']} "
            f"| {row['overhead_p50_ms']} |"
        )
    lines += [
        "",
        "Streaming: 8 clients, each sends the next 1-4 points of its own series per request, "
        "either only those points (the server carries the recurrent state) or its last L + 1 "
        "points (full-window recompute).",
        "",
        "| mode | series/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["streaming"]:
        lines.append(
            f"| {row['mode']} | {row['series_per_s']} | {row['p50_ms']} | {row['p95_ms']} | "
            f"{row['p99_ms']} | {row['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load row")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--port", type=int, default=3917)
    parser.add_argument("--overhead-runs", type=int, default=100, help="requests per batch size")
    parser.add_argument("--skip-streaming", action="store_true", help="no streaming scenario")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="K=V",
        help="an environment variable of the server (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, help="train here once and reuse the bundle")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.server_env)

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        folder = Path(tmp)
        print("training the benchmark model …")
        bundle, history = _train(args.workdir or folder)
        url = f"http://127.0.0.1:{args.port}/forecast"
        rows = []
        with _serving(bundle, args.port, folder / "server.log", server_env):
            ids = sorted(history)
            for batch in args.batches:
                payload = _payload(history, ids[:batch])
                asyncio.run(_load(url, payload, 1, min(3.0, args.duration)))  # warm-up
                for clients in args.clients:
                    row = asyncio.run(_load(url, payload, clients, args.duration))
                    row["series_per_request"] = batch
                    rows.append(row)
                    print(row)
            overhead = _overhead(url, bundle, history, args.batches, args.overhead_runs)
            print(overhead)
            streaming = []
            if not args.skip_streaming:
                full = asyncio.run(_stream(url, history, 8, args.duration, incremental=False))
                streaming.append(full)
                print(full)
        if not args.skip_streaming:
            cache = {**server_env, "FORECASTER_STATE_CACHE_SIZE": "1000"}
            with _serving(bundle, args.port, folder / "server_state.log", cache):
                incremental = asyncio.run(_stream(url, history, 8, args.duration, incremental=True))
                streaming.append(incremental)
                print(incremental)
    record = {
        "duration_s": args.duration,
        "model": {
            "name": "mi_gru",
            "hidden_size": HIDDEN,
            "lookback": LOOKBACK,
            "horizon": HORIZON,
        },
        "load": rows,
        "overhead": overhead,
        "streaming": streaming,
        "server_env": server_env,
    }
    if args.no_write:
        print(_table(record))
    else:
        write_results("serve_load", record, _table(record))


if __name__ == "__main__":
    main()
