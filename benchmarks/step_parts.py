"""Where a training step's time goes, and what that allows fixed feedback (issue 12, Benchmarks).

Question: the trainer's BPTT and fixed feedback (`compute_gradients("bptt" | "feedback")` for
the MI-GRU and the LMN) run the same parts except one: (F) the scripted no-grad forward keeping
the gates (`feedback_states`), (H) the head on the stored states with its backward (the direct
gradients `G`), (C) the batched cell backward over all `B·T` rows (`batched_cell_backward`),
and then either (R) BPTT's exact reverse recursion (`exact_deltas`) or (S) feedback's reverse
scan with the fixed diagonal (`corrected_deltas` with no sweep, as the trainer runs it). How
long does each part take, and what speed-up does that allow?

    speed-up          = (F + H + C + R) / (F + H + C + S)
    ceiling (S = 0)   = (F + H + C + R) / (F + H + C)

The ceiling is the speed-up of a free scan: no fixed feedback, however computed, beats it
against this BPTT. F and R do the same kind of per-step work (one small matmul and a few
element-wise ops per step, one step after another), so R is of F's order (0.7–1.0 F measured)
and the ceiling reaches 2 only if H + C ≤ R − F, which needs R well above F.

Timing: per size and thread count, every part and both whole steps get one warm-up, then
`--rounds` timed rounds in which they run round-robin (`train_speed.interleaved`); median per
variant, on CPU inside `training_heap()` as the trainer runs. The parts run on one shared batch
in the order of the step, each reading what the previous one left (their cost does not depend
on the values). `residual` = whole step − its parts (zero-grad, the loss's bookkeeping, noise).

Writes benchmarks/results/step_parts.json and .md. Run: python benchmarks/step_parts.py
(`--threads 1 2`: both counts in one round-robin).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _common import write_results  # noqa: E402
from train_speed import BATCH, CELLS, HORIZON, interleaved, make_case, step_fn  # noqa: E402

from forecaster.training.feedback import (  # noqa: E402
    batched_cell_backward,
    corrected_deltas,
    feedback_states,
)
from forecaster.training.heap import training_heap  # noqa: E402

PARTS = ("forward", "head", "recursion", "scan", "cell_backward")


def part_fns(case: dict[str, Any]) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The step's parts as `_gradients_from_deltas` runs them, and the dict through which each
    reads what the previous one left (`delta`: the recursion's, which the cell backward reads;
    `scan_delta`: the scan's)."""
    model, x, y, loss_fn, d = case["model"], case["x"], case["y"], case["loss"], case["d"]
    core, units = model.feedback_core(), model.feedback_units
    s0 = model.initial_state(x.shape[0], x.device, x.dtype)
    kept: dict[str, Any] = {}

    def forward() -> None:
        kept["states"], kept["aux"] = feedback_states(core, x, s0[:, :units])

    def head() -> None:
        s_leaf = kept["states"][:, 1:].detach().requires_grad_(True)
        loss_fn(model.window_readout(s_leaf, x, s0), y, case["mask"]).backward()
        kept["direct"] = s_leaf.grad

    def recursion() -> None:
        kept["delta"] = core.exact_deltas(x, kept["states"], kept["direct"], kept["aux"])

    def scan() -> None:
        states, direct = kept["states"], kept["direct"]
        kept["scan_delta"] = corrected_deltas(core, x, states[:, :-1], direct, d, 0)

    def cell_backward() -> None:
        model.zero_grad(set_to_none=True)
        states = kept["states"]
        batched_cell_backward(core, x, states[:, :-1], kept["delta"], aux=kept["aux"])

    return dict(zip(PARTS, (forward, head, recursion, scan, cell_backward), strict=True)), kept


def measure(
    name: str, hidden: int, steps: int, threads: tuple[int, ...], rounds: int
) -> list[dict[str, Any]]:
    """One entry per thread count: median ms of every part and of both whole steps."""
    case = make_case(name, hidden, steps)
    variants: dict[str, Callable[[], None]] = {}
    counts: dict[str, int] = {}
    for count in threads:
        fns = {
            **part_fns(case)[0],
            "bptt": step_fn("bptt", case),
            "feedback": step_fn("feedback", case),
        }
        for key, fn in fns.items():
            variants[f"{key}@{count}"] = fn
            counts[f"{key}@{count}"] = count
    times = interleaved(variants, rounds, counts)
    entries = []
    for count in threads:
        ms = {
            k: statistics.median(times[f"{k}@{count}"]) * 1e3 for k in (*PARTS, "bptt", "feedback")
        }
        shared = ms["forward"] + ms["head"] + ms["cell_backward"]
        entries.append(
            {
                "model": name,
                "hidden": hidden,
                "T": steps,
                "threads": count,
                **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
                "shared_ms": round(shared, 2),
                "speedup_measured": round(ms["bptt"] / ms["feedback"], 3),
                "speedup_from_parts": round((shared + ms["recursion"]) / (shared + ms["scan"]), 3),
                "ceiling_free_scan": round((shared + ms["recursion"]) / shared, 3),
                "forward_over_recursion": round(ms["forward"] / ms["recursion"], 3),
                "shared_ms_for_2x": round(ms["recursion"] - 2 * ms["scan"], 2),
                "residual_bptt_ms": round(ms["bptt"] - shared - ms["recursion"], 2),
                "residual_feedback_ms": round(ms["feedback"] - shared - ms["scan"], 2),
            }
        )
        print(
            f"{name} h={hidden} T={steps} threads={count}: "
            + ", ".join(f"{k} {ms[k]:.1f}" for k in (*PARTS, "bptt", "feedback"))
            + f" ms; ceiling {entries[-1]['ceiling_free_scan']:.2f}x",
            flush=True,
        )
    return entries


def markdown(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    lines = [
        "# Where a training step's time goes: the parts BPTT and fixed feedback share",
        "",
        f"Batch {BATCH}, H = {HORIZON}, {settings['device']}; median milliseconds over "
        f"{settings['rounds']} interleaved rounds after one warm-up. F forward, H head, "
        "C cell backward (shared by both methods); R BPTT's exact recursion, S feedback's scan. "
        "Speed-up from the parts = (F+H+C+R)/(F+H+C+S); ceiling = (F+H+C+R)/(F+H+C), the "
        "speed-up of a scan that cost nothing. 2x needs F+H+C <= R - 2S.",
        "",
        "| model | h | T | threads | F | H | C | R | S | BPTT step | feedback step | speed-up "
        "measured | from parts | ceiling | F / R | F+H+C for 2x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in payload["entries"]:
        lines.append(
            f"| {e['model']} | {e['hidden']} | {e['T']} | {e['threads']} | {e['forward_ms']:.1f} "
            f"| {e['head_ms']:.1f} | {e['cell_backward_ms']:.1f} | {e['recursion_ms']:.1f} "
            f"| {e['scan_ms']:.1f} | {e['bptt_ms']:.1f} | {e['feedback_ms']:.1f} "
            f"| {e['speedup_measured']:.2f}x | {e['speedup_from_parts']:.2f}x "
            f"| {e['ceiling_free_scan']:.2f}x | {e['forward_over_recursion']:.2f} "
            f"| <= {e['shared_ms_for_2x']:.1f} (is {e['shared_ms']:.1f}) |"
        )
    lines += [
        "",
        f"Load average at start {settings['load_average_start']}, at the end "
        f"{settings['load_average_end']}; {settings['seconds']} s in all.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per size (>= 5)")
    parser.add_argument("--quick", action="store_true", help="T = 720, h = 64 only")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("at least 5 timed rounds")
    if min(args.threads) < 1 or len(set(args.threads)) != len(args.threads):
        parser.error(f"--threads {args.threads}: distinct positive integers needed")
    torch.set_num_threads(args.threads[0])
    sizes = [(64, 720)] if args.quick else [(h, t) for h in (64, 256) for t in (336, 720, 1440)]
    load_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    with training_heap():
        for name in CELLS:
            for hidden, steps in sizes:
                entries += measure(name, hidden, steps, tuple(args.threads), args.rounds)
    payload = {
        "settings": {
            "device": "cpu",
            "batch": BATCH,
            "horizon": HORIZON,
            "threads": args.threads,
            "rounds": args.rounds,
            "feedback_d": "estimate_feedback jacobian_mean (initial params), no correction sweep",
            "load_average_start": load_start,
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
            "seconds": round(time.perf_counter() - started, 1),
        },
        "entries": entries,
    }
    write_results("step_parts", payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
