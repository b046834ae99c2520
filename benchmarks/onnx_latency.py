"""ONNX Runtime latency of every model's window and step graphs next to the native GRU op.

Question: how close do the exported recurrences (standard ONNX ops, one Scan/Loop) come to ONNX
Runtime's fused `GRU` op of the same size, and how fast is the stateful step graph that serves
known series? For L = 336, hidden 64, H = 96, batch 1 and 256 (issue 11, ALGORITHMS.md §7):
p50/p99 of the window graph and of the step graph with k = 1 and k = 4, export time, session load
time, file size and node count, at intra-op threads 1 and 2, plus PyTorch eager for reference.
All calls go through `forecaster.inference` (the serving path). Cases at the same batch and
thread count are timed in several sweeps (see `_rounds`) so machine noise hits them alike.

Writes benchmarks/results/onnx_latency.json and .md. Run: python benchmarks/onnx_latency.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, write_results  # noqa: E402

from forecaster.errors import ModelError  # noqa: E402
from forecaster.export import export_onnx  # noqa: E402
from forecaster.inference import (  # noqa: E402
    forecast_step,
    forecast_window,
    initial_state,
    open_session,
)
from forecaster.models.base import RecurrentForecaster  # noqa: E402
from forecaster.models.registry import build, model_names  # noqa: E402

NATIVE = "gru"  # the GRU baseline's window graph is ONNX Runtime's native GRU op
TARGET_MODELS = ("mi_gru", "lmn")
LOOP_VARIANTS = ("mi_gru", "lmn")


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _rounds(cases: dict[str, Callable[[], object]], runs: int, warmup: int, rounds: int) -> dict:
    """Time every case `runs` times in `rounds` sweeps; returns percentiles per case.

    Each sweep runs every case for `warmup` untimed then `runs / rounds` timed consecutive calls,
    so each case is measured warm (a strict call-by-call alternation measured the first call
    after another session's run, cold caches included) while the sweeps spread machine noise
    over all cases alike.
    """
    per_round = max(1, -(-runs // rounds))
    samples: dict[str, list[float]] = {key: [] for key in cases}
    for _ in range(rounds):
        for key, call in cases.items():
            for _ in range(warmup):
                call()
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                samples[key].append(time.perf_counter() - start)
    return {key: _percentiles(values) for key, values in samples.items()}


def _build_models(args: argparse.Namespace) -> tuple[dict[str, RecurrentForecaster], list[str]]:
    models, missing = {}, []
    for name in model_names():
        torch.manual_seed(0)
        try:
            models[name] = build(name, args.input_size, args.hidden, args.horizon).eval()
        except ModelError as exc:
            missing.append(f"{name}: {exc}")
    return models, missing


def _export_all(models: dict[str, RecurrentForecaster], folder: Path, lookback: int) -> dict:
    """Export window, step and (for some) Loop-variant window graphs; parity checked."""
    exports: dict[tuple[str, str], Any] = {}
    for name, model in models.items():
        variants = [("window", "scan"), ("step", "scan")]
        if name in LOOP_VARIANTS:
            variants.append(("window", "loop"))
        for graph, recurrence in variants:
            key = (name, graph if recurrence == "scan" else "window_loop")
            path = folder / f"{key[0]}_{key[1]}.onnx"
            started = time.perf_counter()
            report = export_onnx(
                model,
                path,
                lookback=lookback,
                graph=graph,
                recurrence=recurrence,  # type: ignore[arg-type]
            )
            exports[key] = {
                "path": path,
                "export_s": report.export_s,
                "export_with_parity_s": time.perf_counter() - started,
                "parity_max_abs_diff": report.parity_max_abs_diff,
                "node_count": report.node_count,
                "file_size_bytes": report.file_size_bytes,
            }
    return exports


def _load_sessions(exports: dict, threads: int) -> tuple[dict, dict[tuple[str, str], float]]:
    sessions, load_s = {}, {}
    for key, info in exports.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            session = open_session(info["path"], device="cpu", intra_op_threads=threads)
            times.append(time.perf_counter() - started)
        sessions[key], load_s[key] = session, statistics.median(times)
    return sessions, load_s


def _ort_cases(sessions: dict, batch: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(batch)
    window = rng.standard_normal((batch, args.lookback, args.input_size)).astype(np.float32)
    cases: dict[str, Callable[[], object]] = {}
    for (name, graph), session in sessions.items():
        if graph in ("window", "window_loop"):
            cases[f"{name}|{graph}"] = lambda s=session: forecast_window(s, window)
            continue
        state = forecast_step(session, window, initial_state(session, batch)).state
        for k in (1, 4):
            x_new = rng.standard_normal((batch, k, args.input_size)).astype(np.float32)
            cases[f"{name}|step_k{k}"] = lambda s=session, x=x_new, st=state: forecast_step(
                s, x, st
            )
    return cases


def _torch_cases(models: dict[str, RecurrentForecaster], batch: int, lookback: int) -> dict:
    x = torch.randn(batch, lookback, next(iter(models.values())).input_size)

    def run(model: RecurrentForecaster) -> None:
        with torch.inference_mode():
            model.forecast(x)

    return {name: (lambda m=model: run(m)) for name, model in models.items()}


def _markdown(payload: dict) -> str:
    lines = [
        "# ONNX Runtime latency (issue 11)",
        "",
        f"L = {payload['config']['lookback']}, hidden {payload['config']['hidden_size']}, "
        f"H = {payload['config']['horizon']}, d = {payload['config']['input_size']}; p50/p99 in "
        "ms through `forecaster.inference`; best of the intra-op thread settings "
        f"{payload['config']['threads']} (per-setting p50 in the last columns); ratio = p50 / "
        "native GRU op's full-window p50 at the same batch.",
        "",
        "| model | graph | batch | p50 ms | p99 ms | ratio to native | threads | "
        + " | ".join(f"p50 @{t}t" for t in payload["config"]["threads"])
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(payload["config"]["threads"]),
    ]
    for run in payload["runs"]:
        per = " | ".join(
            f"{run['by_threads'][str(t)]['p50_ms']:.3f}" for t in payload["config"]["threads"]
        )
        lines.append(
            f"| {run['model']} | {run['graph']} | {run['batch']} | {run['p50_ms']:.3f} | "
            f"{run['p99_ms']:.3f} | {run['ratio_to_native']:.2f} | {run['threads']} | {per} |"
        )
    lines += [
        "",
        "Loop variant (the TorchScript exporter's `Loop`, `recurrence='loop'`) "
        "vs the default Scan:",
        "",
        "| model | batch | Loop p50 ms | Scan p50 ms | Loop ratio to native |",
        "|---|---|---|---|---|",
    ]
    for entry in payload["loop_variant"]:
        lines.append(
            f"| {entry['model']} | {entry['batch']} | {entry['p50_ms']:.3f} | "
            f"{entry['scan_p50_ms']:.3f} | {entry['ratio_to_native']:.2f} |"
        )
    lines += [
        "",
        "PyTorch eager (`model.forecast`, `torch.inference_mode`, same thread settings, best):",
        "",
        "| model | batch | p50 ms | p99 ms | ratio to native ONNX op |",
        "|---|---|---|---|---|",
    ]
    for entry in payload["torch_eager"]:
        lines.append(
            f"| {entry['model']} | {entry['batch']} | {entry['p50_ms']:.3f} | "
            f"{entry['p99_ms']:.3f} | {entry['ratio_to_native']:.2f} |"
        )
    lines += [
        "",
        "Export (float32, opset 17, parity checked at batch 1/17 × T 1/50/L) and session load "
        "(median of 3 opens, 1 thread):",
        "",
        "| model | graph | export s | export + parity s | load s | nodes | file KiB "
        "| parity max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in payload["exports"]:
        lines.append(
            f"| {entry['model']} | {entry['graph']} | {entry['export_s']:.3f} | "
            f"{entry['export_with_parity_s']:.2f} | {entry['load_s']:.4f} | "
            f"{entry['node_count']} | {entry['file_size_bytes'] / 1024:.1f} | "
            f"{entry['parity_max_abs_diff']:.1e} |"
        )
    lines += ["", "Targets:", ""]
    for target in payload["targets"]:
        mark = "met" if target["met"] else "**missed**"
        lines.append(
            f"- {target['name']}: {target['value']:.3g} (limit {target['limit']}) — {mark}"
        )
    if payload["missing_models"]:
        lines += ["", "Not benchmarked: " + "; ".join(payload["missing_models"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookback", type=int, default=336)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=96)
    parser.add_argument("--input-size", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs-b1", type=int, default=200)
    parser.add_argument("--runs-b256", type=int, default=50)
    parser.add_argument("--torch-runs-b256", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="onnx_latency")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    batches = {1: (args.runs_b1, 3), 256: (args.runs_b256, 1)}

    models, missing = _build_models(args)
    if NATIVE not in models:
        raise SystemExit("the gru baseline (native ONNX GRU op) is required as the reference")
    timings: dict[tuple[str, str, int, int], dict[str, float]] = {}
    torch_timings: dict[tuple[str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        print(f"exporting {len(models)} models ...", flush=True)
        exports = _export_all(models, Path(folder), args.lookback)
        load_by_threads = {}
        for threads in args.threads:
            sessions, load_s = _load_sessions(exports, threads)
            load_by_threads[threads] = load_s
            torch.set_num_threads(threads)
            for batch, (runs, warmup) in batches.items():
                print(f"threads {threads}, batch {batch}: ONNX Runtime ...", flush=True)
                result = _rounds(_ort_cases(sessions, batch, args), runs, warmup, args.rounds)
                for key, value in result.items():
                    name, graph = key.split("|")
                    timings[(name, graph, batch, threads)] = value
                torch_runs = runs if batch == 1 else args.torch_runs_b256
                print(f"threads {threads}, batch {batch}: PyTorch eager ...", flush=True)
                eager = _rounds(
                    _torch_cases(models, batch, args.lookback), torch_runs, 1, args.rounds
                )
                for name, value in eager.items():
                    torch_timings[(name, batch, threads)] = value

    def best(name: str, graph: str, batch: int) -> tuple[int, dict[str, float]]:
        options = [(t, timings[(name, graph, batch, t)]) for t in args.threads]
        return min(options, key=lambda item: item[1]["p50_ms"])

    native = {batch: best(NATIVE, "window", batch)[1]["p50_ms"] for batch in batches}
    runs_out = []
    for name in models:
        for graph in ("window", "step_k1", "step_k4"):
            for batch in batches:
                threads, value = best(name, graph, batch)
                runs_out.append(
                    {
                        "model": name,
                        "graph": graph,
                        "batch": batch,
                        **value,
                        "ratio_to_native": value["p50_ms"] / native[batch],
                        "threads": threads,
                        "by_threads": {
                            str(t): timings[(name, graph, batch, t)] for t in args.threads
                        },
                    }
                )
    loop_variant = []
    for name in LOOP_VARIANTS:
        if name not in models:
            continue
        for batch in batches:
            threads, value = best(name, "window_loop", batch)
            loop_variant.append(
                {
                    "model": name,
                    "batch": batch,
                    **value,
                    "threads": threads,
                    "scan_p50_ms": best(name, "window", batch)[1]["p50_ms"],
                    "ratio_to_native": value["p50_ms"] / native[batch],
                }
            )
    torch_out = []
    for name in models:
        for batch in batches:
            threads, value = min(
                ((t, torch_timings[(name, batch, t)]) for t in args.threads),
                key=lambda item: item[1]["p50_ms"],
            )
            torch_out.append(
                {
                    "model": name,
                    "batch": batch,
                    **value,
                    "threads": threads,
                    "ratio_to_native": value["p50_ms"] / native[batch],
                }
            )
    exports_out = [
        {
            "model": name,
            "graph": graph,
            **{k: v for k, v in info.items() if k != "path"},
            "load_s": load_by_threads[args.threads[0]][(name, graph)],
            "load_s_by_threads": {str(t): load_by_threads[t][(name, graph)] for t in args.threads},
        }
        for (name, graph), info in exports.items()
    ]

    def ratio(name: str, graph: str, batch: int) -> float:
        return next(
            r["ratio_to_native"]
            for r in runs_out
            if (r["model"], r["graph"], r["batch"]) == (name, graph, batch)
        )

    targets = []
    for name in TARGET_MODELS:
        if name not in models:
            continue
        for batch, limit in ((256, 1.5), (1, 8.0)):
            value = ratio(name, "window", batch)
            targets.append(
                {
                    "name": f"{name} window / native, batch {batch}",
                    "value": value,
                    "limit": limit,
                    "met": value <= limit,
                }
            )
    slowest_export = max(e["export_s"] for e in exports_out)
    slowest_load = max(max(e["load_s_by_threads"].values()) for e in exports_out)
    targets.append(
        {
            "name": "slowest export (s)",
            "value": slowest_export,
            "limit": 5.0,
            "met": slowest_export <= 5.0,
        }
    )
    targets.append(
        {
            "name": "slowest session load (s)",
            "value": slowest_load,
            "limit": 0.1,
            "met": slowest_load <= 0.1,
        }
    )
    for name in models:
        value = ratio(name, "step_k1", 1)
        targets.append(
            {
                "name": f"{name} step k=1 batch 1 / native full window",
                "value": value,
                "limit": 1.0,
                "met": value <= 1.0,
            }
        )
    payload = {
        "config": {
            "lookback": args.lookback,
            "hidden_size": args.hidden,
            "horizon": args.horizon,
            "input_size": args.input_size,
            "threads": args.threads,
            "runs": {str(b): r for b, (r, _) in batches.items()},
            "rounds": args.rounds,
            "torch_runs_batch_256": args.torch_runs_b256,
            "session": "ORT_ENABLE_ALL, sequential, inter_op 1, CPUExecutionProvider",
            "native_reference": "gru window graph: torch.nn.GRU exported as the ONNX GRU op",
        },
        "native_p50_ms": {str(b): v for b, v in native.items()},
        "runs": runs_out,
        "loop_variant": loop_variant,
        "torch_eager": torch_out,
        "exports": exports_out,
        "targets": targets,
        "missing_models": missing,
    }
    write_results(args.name, payload, _markdown(payload), results_dir=args.results_dir)
    print(_markdown(payload))


if __name__ == "__main__":
    main()
