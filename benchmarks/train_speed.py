"""Seconds per training step and peak memory: fixed feedback vs BPTT (issue 12, Benchmarks).

Question: how long does one gradient step (`forecaster.training.gradients.compute_gradients`,
zero-grad included, optimizer step excluded) take for the MI-GRU and the LMN trained by fixed
feedback (d = `estimate_feedback` jacobian_mean at the initial parameters) and by full BPTT, and
for the registry's `gru` (`torch.nn.GRU`, fused kernel) trained by BPTT, at batch 32, H = 96,
T in {336, 720, 1440}, hidden in {64, 256}? Also timed: the mean-Jacobian matrix feedback and
the diagonal feedback with one Jacobian correction sweep (`corrections: 1`). Targets (CPU):
feedback >= 2x BPTT at T = 720, h = 64; never slower at any size; peak memory <= 1.2x BPTT's;
MI-GRU feedback step no slower than nn.GRU's fused BPTT step at h = 64. BPTT's step time must
grow linearly in T (1440/720 ~ 2).

Timing: per size, every variant gets one warm-up step, then `--rounds` timed rounds in which the
variants run round-robin (interleaved, so background noise hits all of them alike); median and
min per variant. On CPU the steps run inside `forecaster.training.heap.training_heap()`, as the
trainer runs them (freed blocks stay in the heap instead of being page-faulted back every step);
`--heap default` times glibc's default behaviour instead (results/train_speed_default_heap.*).
All variants see the same input/target tensors (seeded standard normal, 1 feature; the step cost
does not depend on the values).

Peak memory: each (model, method, size) runs in a fresh subprocess (same thread count, fixed
MALLOC_MMAP_THRESHOLD_ so large tensors are returned to the OS on free): one warm-up step, then
malloc_trim and a reset of the kernel's RSS high-water mark (/proc/self/clear_refs, Linux >= 4.0),
then a second step; reported: VmHWM after it minus VmRSS before it. `--memory-only` re-measures
the memory columns of an existing train_speed.json and keeps its timings.

BPTT is the trainer's (`compute_gradients("bptt")`): for the MI-GRU, the LMN and SCRN that is
exact BPTT from fixed feedback's own hand-written parts (the scripted forward, the batched cell
backward) with the exact reverse recursion in place of the fixed
feedback's scan (`forecaster.training.feedback.exact_bptt_gradients`), so the speed-up is the
fixed feedback's own. Also timed: plain autograd BPTT through the model's loop
(`autograd_bptt_gradients`, what a user would write), with its own speed-up column.

Also timed, in the same run: SCRN alone and the shipped ETTh1 model (SCRN + 336 lags) at that
config's window T = 336, h = 64, BPTT vs the matrix feedback the config trains with.

`--threads 1 2` times every variant at both torch thread counts in one round-robin and compares
each method at its fastest count (results/train_speed_threads.*; no memory or shipped-model runs):
the trainer uses torch's default count, and a speed-up is only fair if neither side is timed at
a count that slows it down.

Writes benchmarks/results/train_speed.json and .md. Run: python benchmarks/train_speed.py
(`--quick`: T in {336, 720}, h = 64 only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _common import write_results  # noqa: E402

from forecaster.config import FeedbackConfig  # noqa: E402
from forecaster.losses import ForecastLoss  # noqa: E402
from forecaster.models.registry import build  # noqa: E402
from forecaster.training.feedback import estimate_feedback  # noqa: E402
from forecaster.training.gradients import autograd_bptt_gradients, compute_gradients  # noqa: E402
from forecaster.training.heap import training_heap  # noqa: E402

BATCH = 32
HORIZON = 96
CELLS = ("mi_gru", "lmn")
MEMORY_METHOD = (
    "fresh subprocess per (model, method, size), MALLOC_MMAP_THRESHOLD_=131072: one warm-up "
    "step, malloc_trim, reset of the kernel high-water mark (/proc/self/clear_refs), then "
    "VmHWM after a second step minus VmRSS before it (the step's transient peak, grads included)"
)
CUDA_MEMORY_METHOD = (
    "in process, after timing: torch.cuda.max_memory_allocated during one step minus "
    "memory_allocated before it (the step's transient peak, grads included)"
)


def make_case(
    name: str, hidden: int, steps: int, seed: int = 0, device: str = "cpu", lags: int = 0
) -> dict[str, Any]:
    """Model, the shared batch, the loss and (for feedback-capable models) the fixed feedback."""
    torch.manual_seed(seed)
    model = build(name, 1, hidden, HORIZON, linear_lags=lags).to(device)
    gen = torch.Generator().manual_seed(1234 + steps)  # same data for every model at this T
    x = torch.randn(BATCH, steps, 1, generator=gen).to(device)
    y = torch.randn(BATCH, steps, HORIZON, generator=gen).to(device)
    mask = None  # every target valid, as in the trainer's batches (`WindowBatch.mask`)
    d = d_matrix = None
    if model.supports_feedback:
        d = estimate_feedback(model, [x], FeedbackConfig(kind="jacobian_mean")).d
        d_matrix = estimate_feedback(model, [x], FeedbackConfig(kind="jacobian_matrix")).d
    return {
        "model": model,
        "x": x,
        "y": y,
        "mask": mask,
        "loss": ForecastLoss(),
        "d": d,
        "d_matrix": d_matrix,
    }


def step_fn(
    method: str, case: dict[str, Any], feedback: str = "d", corrections: int = 0
) -> Callable[[], None]:
    """One gradient step; `method`: `bptt`, `feedback` (the trainer's) or `autograd_bptt`;
    `feedback`: the case's diagonal `d` or its `d_matrix`; `corrections`: Jacobian correction
    sweeps of the feedback backward."""
    model = case["model"]

    if method == "autograd_bptt":

        def reference() -> None:
            model.zero_grad(set_to_none=True)
            autograd_bptt_gradients(model, case["x"], case["y"], case["mask"], case["loss"])

        return reference

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compute_gradients(
            method,
            model,
            case["x"],
            case["y"],
            case["mask"],
            case["loss"],
            d=case[feedback],
            corrections=corrections,
        )

    return step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], None]],
    rounds: int,
    threads: dict[str, int] | None = None,
) -> dict[str, list[float]]:
    """Round-robin timing; on CUDA each step is bracketed by a device synchronize. `threads`:
    the torch thread count of each variant, set before its step, outside the timed span."""
    threads = threads or {}
    before = torch.get_num_threads()
    for key, fn in variants.items():  # warm-up: scripting, allocator, first-touch
        torch.set_num_threads(threads.get(key, before))
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            torch.set_num_threads(threads.get(key, before))
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[key].append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return times


def cuda_peak_mb(step: Callable[[], None]) -> float:
    """Peak CUDA memory allocated during one step above what was allocated before it (MB)."""
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    _sync()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(name: str, method: str, hidden: int, steps: int, threads: int) -> None:
    """Subprocess body: print the peak RSS above the pre-step baseline (MB) of one training step.

    One warm-up step (scripting, first-touch), then the allocator is trimmed, the kernel's
    high-water mark is reset (`/proc/self/clear_refs` <- 5, Linux >= 4.0) and a second step runs;
    the result is VmHWM after it minus VmRSS before it. The parent sets a fixed
    `MALLOC_MMAP_THRESHOLD_` so large tensors are mmapped and returned on free (RSS then follows
    live memory instead of glibc's retained heap).
    """
    import ctypes
    import gc

    torch.set_num_threads(threads)
    case = make_case(name, hidden, steps)
    step = step_fn(method, case)
    step()
    case["model"].zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mb("VmRSS")
    step()
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak - base, "base_mb": base}))


def peak_mb(name: str, method: str, hidden: int, steps: int, threads: int) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--_peak",
            name,
            method,
            str(hidden),
            str(steps),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return round(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"], 1)


def fill_memory(entries: list[dict[str, Any]], threads: int) -> None:
    """Peak memory per (model, method, size), each in a fresh subprocess; nn.GRU once per size."""
    gru_peaks: dict[tuple[int, int], float] = {}
    for entry in entries:
        for method in ("bptt", "feedback", "autograd_bptt"):
            entry[f"peak_mb_{method}"] = peak_mb(
                entry["model"], method, entry["hidden"], entry["T"], threads
            )
        entry["peak_ratio"] = round(entry["peak_mb_feedback"] / max(entry["peak_mb_bptt"], 0.1), 2)
        entry["peak_ratio_vs_autograd"] = round(
            entry["peak_mb_feedback"] / max(entry["peak_mb_autograd_bptt"], 0.1), 2
        )
        size = (entry["hidden"], entry["T"])
        if size not in gru_peaks:
            gru_peaks[size] = peak_mb("gru", "bptt", entry["hidden"], entry["T"], threads)
        entry["peak_mb_nn_gru"] = gru_peaks[size]
        print(
            f"memory {entry['model']} h={entry['hidden']} T={entry['T']}: bptt "
            f"{entry['peak_mb_bptt']} MB, autograd bptt {entry['peak_mb_autograd_bptt']} MB, "
            f"feedback {entry['peak_mb_feedback']} MB, nn.GRU {entry['peak_mb_nn_gru']} MB",
            flush=True,
        )


def time_sizes(
    entries: list[dict[str, Any]],
    device: str,
    hiddens: tuple[int, ...],
    lengths: tuple[int, ...],
    rounds_default: int,
    rounds_large: int,
    threads: tuple[int, ...] = (1,),
) -> None:
    """Time every variant at every (hidden, T); one entry per (model, hidden, T, thread count)
    into `entries`. With several thread counts every variant runs at each of them, all in the
    same round-robin (`torch.set_num_threads` before each step), so they share the noise."""
    for hidden in hiddens:
        for steps in lengths:
            rounds = rounds_large if (steps == 1440 and hidden == 256) else rounds_default
            cases = {name: make_case(name, hidden, steps, device=device) for name in CELLS}
            cases["gru"] = make_case("gru", hidden, steps, device=device)
            base: dict[str, Callable[[], None]] = {}
            for name in CELLS:
                base[f"{name}/bptt"] = step_fn("bptt", cases[name])
                base[f"{name}/feedback"] = step_fn("feedback", cases[name])
                base[f"{name}/matrix"] = step_fn("feedback", cases[name], "d_matrix")
                base[f"{name}/c1"] = step_fn("feedback", cases[name], corrections=1)
                base[f"{name}/autograd"] = step_fn("autograd_bptt", cases[name])
            base["gru/bptt"] = step_fn("bptt", cases["gru"])
            variants = {f"{key}@{n}": fn for n in threads for key, fn in base.items()}
            t0 = time.perf_counter()
            times = interleaved(
                variants, rounds, {f"{key}@{n}": n for n in threads for key in base}
            )
            for n, name in ((n, name) for n in threads for name in CELLS):
                bp, fb = times[f"{name}/bptt@{n}"], times[f"{name}/feedback@{n}"]
                gru = times[f"gru/bptt@{n}"]
                matrix, c1 = times[f"{name}/matrix@{n}"], times[f"{name}/c1@{n}"]
                autograd = times[f"{name}/autograd@{n}"]
                entry = {
                    "device": device,
                    "model": name,
                    "hidden": hidden,
                    "T": steps,
                    "threads": n,
                    "rounds": rounds,
                    "bptt_s": round(statistics.median(bp), 4),
                    "bptt_min_s": round(min(bp), 4),
                    "feedback_s": round(statistics.median(fb), 4),
                    "feedback_min_s": round(min(fb), 4),
                    "speedup": round(statistics.median(bp) / statistics.median(fb), 3),
                    "speedup_min": round(min(bp) / min(fb), 3),
                    "feedback_matrix_s": round(statistics.median(matrix), 4),
                    "speedup_matrix": round(statistics.median(bp) / statistics.median(matrix), 3),
                    "feedback_c1_s": round(statistics.median(c1), 4),
                    "speedup_c1": round(statistics.median(bp) / statistics.median(c1), 3),
                    "autograd_bptt_s": round(statistics.median(autograd), 4),
                    "speedup_vs_autograd": round(
                        statistics.median(autograd) / statistics.median(fb), 3
                    ),
                    "nn_gru_s": round(statistics.median(gru), 4),
                    "nn_gru_min_s": round(min(gru), 4),
                    "spectral_radius_d": round(float(cases[name]["d"].abs().max()), 4),
                }
                if device == "cuda":
                    pairs = (
                        ("bptt", "bptt"),
                        ("feedback", "feedback"),
                        ("autograd_bptt", "autograd"),
                    )
                    for method, key in pairs:
                        entry[f"peak_mb_{method}"] = cuda_peak_mb(base[f"{name}/{key}"])
                    entry["peak_ratio"] = round(
                        entry["peak_mb_feedback"] / max(entry["peak_mb_bptt"], 0.1), 2
                    )
                    entry["peak_ratio_vs_autograd"] = round(
                        entry["peak_mb_feedback"] / max(entry["peak_mb_autograd_bptt"], 0.1), 2
                    )
                    entry["peak_mb_nn_gru"] = cuda_peak_mb(base["gru/bptt"])
                entries.append(entry)
                print(
                    f"{name:7s} h={hidden:3d} T={steps:4d} x{n} thr  bptt {entry['bptt_s']:.3f}  "
                    f"autograd bptt {entry['autograd_bptt_s']:.3f}  "
                    f"feedback {entry['feedback_s']:.3f}  x{entry['speedup']:.2f}  "
                    f"nn.GRU {entry['nn_gru_s']:.3f}  ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            del cases, base, variants


# SCRN alone and the shipped ETTh1 model (configs/etth1.yaml: SCRN + 336 lags, matrix feedback)
# at that config's window (T = L = 336) and hidden size.
SHIPPED = (("scrn", 0), ("scrn", 336))
SHIPPED_T, SHIPPED_HIDDEN = 336, 64


def time_shipped(device: str, rounds: int) -> list[dict[str, Any]]:
    """BPTT vs the matrix feedback for `SHIPPED`, interleaved like `time_sizes`."""
    cases = {
        (name, lags): make_case(name, SHIPPED_HIDDEN, SHIPPED_T, device=device, lags=lags)
        for name, lags in SHIPPED
    }
    variants: dict[str, Callable[[], None]] = {}
    for (name, lags), case in cases.items():
        variants[f"{name}+{lags}/bptt"] = step_fn("bptt", case)
        variants[f"{name}+{lags}/matrix"] = step_fn("feedback", case, "d_matrix")
        variants[f"{name}+{lags}/autograd"] = step_fn("autograd_bptt", case)
    times = interleaved(variants, rounds)
    out = []
    for name, lags in SHIPPED:
        bp, fb = times[f"{name}+{lags}/bptt"], times[f"{name}+{lags}/matrix"]
        autograd = times[f"{name}+{lags}/autograd"]
        entry = {
            "model": name if lags == 0 else f"{name}+lin{lags}",
            "hidden": SHIPPED_HIDDEN,
            "T": SHIPPED_T,
            "bptt_s": round(statistics.median(bp), 4),
            "feedback_matrix_s": round(statistics.median(fb), 4),
            "speedup_matrix": round(statistics.median(bp) / statistics.median(fb), 3),
            "autograd_bptt_s": round(statistics.median(autograd), 4),
            "speedup_vs_autograd": round(statistics.median(autograd) / statistics.median(fb), 3),
        }
        print(
            f"{entry['model']:12s} h={SHIPPED_HIDDEN} T={SHIPPED_T}  bptt {entry['bptt_s']:.3f}  "
            f"matrix feedback {entry['feedback_matrix_s']:.3f}  x{entry['speedup_matrix']:.2f}",
            flush=True,
        )
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in {336, 720}, h = 64 only")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch threads (default 1); several, e.g. `1 2`: every variant at each count in one "
        "round-robin, no memory runs, results/train_speed_threads.*",
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per size (>= 5)")
    parser.add_argument("--rounds-large", type=int, default=5, help="rounds at T=1440, h=256")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="re-measure peak memory for the entries of the existing JSON",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: time on the GPU (synchronized), peak memory = CUDA max allocated; writes "
        "results/train_speed_cuda.*",
    )
    parser.add_argument(
        "--heap",
        choices=("training", "default"),
        default="training",
        help="CPU timing inside training_heap() as the trainer runs (default), or with glibc's "
        "defaults (writes results/train_speed_default_heap.*)",
    )
    parser.add_argument("--_peak", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._peak:
        name, method, hidden, steps = args._peak
        peak_child(name, method, int(hidden), int(steps), args.threads[0])
        return
    if min(args.rounds, args.rounds_large) < 5:
        parser.error("at least 5 timed rounds")
    if min(args.threads) < 1 or len(set(args.threads)) != len(args.threads):
        parser.error(f"--threads {args.threads}: distinct positive integers needed")
    threads: tuple[int, ...] = tuple(args.threads)
    compare = len(threads) > 1
    if compare and (args.memory_only or args.device == "cuda"):
        parser.error("several --threads compare CPU step times only (no --memory-only, no cuda)")
    torch.set_num_threads(threads[0])
    if args.memory_only:
        memory_only(threads[0])
        return
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    lengths = (336, 720) if args.quick else (336, 720, 1440)
    hiddens = (64,) if args.quick else (64, 256)
    load_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    heap = device == "cpu" and args.heap == "training"
    with training_heap() if heap else contextlib.nullcontext():
        time_sizes(entries, device, hiddens, lengths, args.rounds, args.rounds_large, threads)
        shipped = [] if compare else time_shipped(device, args.rounds)
    timing_s = time.perf_counter() - started
    load_after_timing = [round(v, 2) for v in os.getloadavg()]
    if device == "cuda":
        pass  # filled in-process per size above (CUDA max allocated)
    elif not (args.no_memory or compare):
        fill_memory(entries, threads[0])
    ratios = {}
    for name in CELLS:
        for hidden in hiddens:
            by_t = {
                e["T"]: e
                for e in entries
                if (e["model"], e["hidden"], e["threads"]) == (name, hidden, threads[0])
            }
            for key, prefix in (("bptt_s", ""), ("autograd_bptt_s", "autograd_")):
                if 720 in by_t and 1440 in by_t:
                    ratios[f"{prefix}{name}_h{hidden}"] = round(by_t[1440][key] / by_t[720][key], 2)
                if 336 in by_t and 720 in by_t:
                    ratios[f"{prefix}{name}_h{hidden}_720_over_336"] = round(
                        by_t[720][key] / by_t[336][key], 2
                    )
    targets = targets_report(best_of_threads(entries) if compare else entries)
    result_name = "train_speed" if device == "cpu" else "train_speed_cuda"
    if device == "cpu" and not heap:
        result_name = "train_speed_default_heap"
    if compare:
        result_name = "train_speed_threads"
    payload = {
        "settings": {
            "device": device
            if device == "cpu"
            else f"cuda ({torch.cuda.get_device_name()}, torch {torch.__version__})",
            "batch": BATCH,
            "horizon": HORIZON,
            "threads": threads[0] if not compare else list(threads),
            "rounds": args.rounds,
            "rounds_t1440_h256": args.rounds_large,
            "quick": args.quick,
            "heap": "training_heap (as the trainer on CPU)"
            if heap
            else ("glibc defaults" if device == "cpu" else "n/a (CUDA)"),
            "feedback_d": "estimate_feedback jacobian_mean (initial params); matrix column: "
            "jacobian_matrix; correction column: jacobian_mean + 1 Jacobian correction sweep",
            "memory_method": MEMORY_METHOD if device == "cpu" else CUDA_MEMORY_METHOD,
            "load_average_start": load_start,
            "load_average_after_timing": load_after_timing,
            "timing_seconds": round(timing_s, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "entries": entries,
        "shipped": shipped,
        "bptt_ratio_1440_over_720": ratios,
        "targets": targets,
    }
    render = markdown_threads if compare else markdown
    write_results(result_name, payload, render(payload))
    print(render(payload))


def best_of_threads(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, hidden, T): each method at its fastest thread count (median step time), so
    neither side of a speed-up is timed at a count that slows it down."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["model"], e["hidden"], e["T"]), []).append(e)
    out = []
    for (model, hidden, steps), group in groups.items():
        bp = min(group, key=lambda e: e["bptt_s"])
        fb = min(group, key=lambda e: e["feedback_s"])
        gru = min(group, key=lambda e: e["nn_gru_s"])
        auto = min(group, key=lambda e: e.get("autograd_bptt_s", math.inf))
        autograd = (
            {
                "autograd_bptt_s": auto["autograd_bptt_s"],
                "autograd_bptt_threads": auto["threads"],
                "speedup_vs_autograd": round(auto["autograd_bptt_s"] / fb["feedback_s"], 3),
            }
            if "autograd_bptt_s" in auto
            else {}
        )
        out.append(
            {
                "device": bp["device"],
                "model": model,
                "hidden": hidden,
                "T": steps,
                "bptt_s": bp["bptt_s"],
                "bptt_threads": bp["threads"],
                "feedback_s": fb["feedback_s"],
                "feedback_threads": fb["threads"],
                "speedup": round(bp["bptt_s"] / fb["feedback_s"], 3),
                "nn_gru_s": gru["nn_gru_s"],
                "nn_gru_threads": gru["threads"],
                **autograd,
            }
        )
    return out


def markdown_threads(payload: dict[str, Any]) -> str:
    """The thread-count comparison: every variant per count, then each method at its best."""
    s = payload["settings"]
    lines = [
        "# Training step time by torch thread count: fixed feedback vs BPTT (cpu)",
        "",
        f"Batch {s['batch']}, H = {s['horizon']}, thread counts {s['threads']} in one "
        f"round-robin; median (min) seconds per step over {s['rounds']} interleaved rounds after "
        f"one warm-up ({s['rounds_t1440_h256']} at T = 1440, h = 256); heap: {s['heap']}. "
        f"Load average at start {s['load_average_start']}, after timing "
        f"{s['load_average_after_timing']}.",
        "",
        "| model | h | T | threads | BPTT s | feedback s | speedup | matrix feedback s "
        "| feedback + 1 correction s | nn.GRU BPTT s | autograd BPTT s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in payload["entries"]:
        lines.append(
            f"| {e['model']} | {e['hidden']} | {e['T']} | {e['threads']} "
            f"| {e['bptt_s']:.3f} ({e['bptt_min_s']:.3f}) "
            f"| {e['feedback_s']:.3f} ({e['feedback_min_s']:.3f}) | {e['speedup']:.2f}x "
            f"| {e['feedback_matrix_s']:.3f} | {e['feedback_c1_s']:.3f} "
            f"| {e['nn_gru_s']:.3f} ({e['nn_gru_min_s']:.3f}) "
            f"| {_or_dash(e, 'autograd_bptt_s', '.3f')} |"
        )
    lines += [
        "",
        "Each method at its fastest thread count (median), and the speed-up between them:",
        "",
        "| model | h | T | BPTT s (threads) | feedback s (threads) | speedup "
        "| nn.GRU BPTT s (threads) | autograd BPTT s (threads) "
        "| feedback speedup vs it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in best_of_threads(payload["entries"]):
        exact = (
            f"{b['autograd_bptt_s']:.3f} ({b['autograd_bptt_threads']}) "
            f"| {b['speedup_vs_autograd']:.2f}x"
            if "autograd_bptt_s" in b
            else "– | –"
        )
        lines.append(
            f"| {b['model']} | {b['hidden']} | {b['T']} | {b['bptt_s']:.3f} ({b['bptt_threads']}) "
            f"| {b['feedback_s']:.3f} ({b['feedback_threads']}) | {b['speedup']:.2f}x "
            f"| {b['nn_gru_s']:.3f} ({b['nn_gru_threads']}) | {exact} |"
        )
    lines += ["", "Targets (best against best): " + json.dumps(payload["targets"])]
    return "\n".join(lines)


def memory_only(threads: int) -> None:
    """Re-measure the memory columns of benchmarks/results/train_speed.json, keeping its timings."""
    from _common import RESULTS_DIR

    old = json.loads((RESULTS_DIR / "train_speed.json").read_text())
    entries = old["entries"]
    fill_memory(entries, threads)
    payload = {k: old[k] for k in ("settings", "bptt_ratio_1440_over_720")}
    payload["shipped"] = old.get("shipped", [])
    payload["settings"]["memory_method"] = MEMORY_METHOD
    payload["settings"]["timing_run"] = {
        "command": old.get("timing_run", {}).get("command", old["command"]),
        "date": old.get("timing_run", {}).get("date", old["date"]),
        "machine": old.get("timing_run", {}).get("machine", old["machine"]),
    }
    payload["entries"] = entries
    payload["targets"] = targets_report(entries)
    write_results("train_speed", payload, markdown(payload))
    print(markdown(payload))


def targets_report(entries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if entries and entries[0]["device"] == "cuda":
        for name in CELLS:
            big = [e for e in entries if (e["model"], e["hidden"], e["T"]) == (name, 256, 720)]
            if big:
                out[f"cuda_feedback_3x_at_T720_h256_{name}"] = {
                    "speedup": big[0]["speedup"],
                    "met": big[0]["speedup"] >= 3,
                }
    main = [e for e in entries if e["model"] == "mi_gru" and e["hidden"] == 64 and e["T"] == 720]
    if main:
        out["feedback_2x_at_T720_h64_mi_gru"] = {
            "speedup": main[0]["speedup"],
            "met": main[0]["speedup"] >= 2,
        }
    lmn = [e for e in entries if e["model"] == "lmn" and e["hidden"] == 64 and e["T"] == 720]
    if lmn:
        out["feedback_2x_at_T720_h64_lmn"] = {
            "speedup": lmn[0]["speedup"],
            "met": lmn[0]["speedup"] >= 2,
        }
    for e in main + lmn:
        if "speedup_vs_autograd" in e:
            out[f"feedback_vs_autograd_bptt_T720_h64_{e['model']}"] = {
                "speedup": e["speedup_vs_autograd"],
                "met_2x": e["speedup_vs_autograd"] >= 2,
            }
    slower = [f"{e['model']} h={e['hidden']} T={e['T']}" for e in entries if e["speedup"] < 1]
    out["never_slower"] = {"met": not slower, "slower_at": slower}
    if all("peak_ratio" in e for e in entries):
        over = [
            f"{e['model']} h={e['hidden']} T={e['T']} ({e['peak_ratio']}x)"
            for e in entries
            if e["peak_ratio"] > 1.2
        ]
        out["peak_memory_le_1.2x"] = {"met": not over, "over_at": over}
    gru64 = [e for e in entries if e["model"] == "mi_gru" and e["hidden"] == 64]
    out["mi_gru_feedback_le_nn_gru_h64"] = {
        f"T{e['T']}": {
            "feedback_s": e["feedback_s"],
            "nn_gru_s": e["nn_gru_s"],
            "met": e["feedback_s"] <= e["nn_gru_s"],
        }
        for e in gru64
    }
    return out


def _or_dash(entry: dict[str, Any], key: str, spec: str) -> str:
    return format(entry[key], spec) if key in entry else "–"


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        f"# Training step time: fixed feedback vs BPTT ({s.get('device', 'cpu')})",
        "",
        f"Batch {s['batch']}, H = {s['horizon']}, {s['threads']} torch CPU thread(s); median (min) "
        f"seconds per step over {s['rounds']} interleaved rounds after one warm-up "
        f"({s['rounds_t1440_h256']} at T = 1440, h = 256); "
        f"heap: {s.get('heap', 'glibc defaults')}. Peak memory: {s['memory_method']}. "
        f"Load average at start {s['load_average_start']}, after timing "
        f"{s['load_average_after_timing']}.",
        "",
        "BPTT is the trainer's `bptt`: for the MI-GRU, the LMN and SCRN, exact BPTT from the "
        "same hand-written parts as feedback (the scripted forward, the exact reverse recursion "
        "as one scripted loop, the cell backward); for nn.GRU, autograd through its fused "
        "kernel. Autograd BPTT: autograd through the model's loop, the reference a user would "
        "write.",
        "",
        "| model | h | T | BPTT s | feedback s | speedup | matrix feedback s | speedup | "
        "feedback + 1 correction s | speedup | nn.GRU BPTT s | peak MB BPTT | peak MB feedback "
        "| mem ratio | peak MB nn.GRU | autograd BPTT s | feedback speedup vs it "
        "| peak MB autograd BPTT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "timing_run" in s:
        run = s["timing_run"]
        lines.insert(
            4,
            f"Timings from `{run['command']}` at {run['date']}; memory columns "
            "re-measured by `--memory-only` (this file's command).\n",
        )
    for e in payload["entries"]:
        lines.append(
            f"| {e['model']} | {e['hidden']} | {e['T']} | {e['bptt_s']:.3f} ({e['bptt_min_s']:.3f})"
            f" | {e['feedback_s']:.3f} ({e['feedback_min_s']:.3f}) | {e['speedup']:.2f}x"
            f" | {_or_dash(e, 'feedback_matrix_s', '.3f')} | {_or_dash(e, 'speedup_matrix', '.2f')}"
            f" | {_or_dash(e, 'feedback_c1_s', '.3f')} | {_or_dash(e, 'speedup_c1', '.2f')}"
            f" | {e['nn_gru_s']:.3f} ({e['nn_gru_min_s']:.3f}) | {e.get('peak_mb_bptt', '–')}"
            f" | {e.get('peak_mb_feedback', '–')} | {e.get('peak_ratio', '–')}"
            f" | {e.get('peak_mb_nn_gru', '–')} | {_or_dash(e, 'autograd_bptt_s', '.3f')}"
            f" | {_or_dash(e, 'speedup_vs_autograd', '.2f')}"
            f" | {e.get('peak_mb_autograd_bptt', '–')} |"
        )
    if payload.get("shipped"):
        lines += [
            "",
            "SCRN and the shipped ETTh1 model (`configs/etth1.yaml`: SCRN + 336 lags, matrix "
            "feedback), same batch and rounds:",
            "",
            "| model | h | T | BPTT s | matrix feedback s | speedup | autograd BPTT s "
            "| feedback speedup vs it |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {e['model']} | {e['hidden']} | {e['T']} | {e['bptt_s']:.3f} "
            f"| {e['feedback_matrix_s']:.3f} | {e['speedup_matrix']:.2f}x "
            f"| {_or_dash(e, 'autograd_bptt_s', '.3f')} "
            f"| {_or_dash(e, 'speedup_vs_autograd', '.2f')} |"
            for e in payload["shipped"]
        ]
    lines += [
        "",
        "BPTT step-time ratios (linear in T means 1440/720 ≈ 2, 720/336 ≈ 2.1): "
        + ", ".join(f"{k} {v}" for k, v in payload["bptt_ratio_1440_over_720"].items()),
        "",
        "Targets: " + json.dumps(payload["targets"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
