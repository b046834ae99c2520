"""End-to-end wall time of `forecaster retrain`, per stage, and the share of tracking + registry.

Question (issue 6): how long does one unattended retrain take on the demo config and on ETTh1
(CPU), split into preprocess, gate, train feedback, train BPTT, export (with parity check and
scoring of the exported model), log and register; and what share of the job do MLflow logging
and the registry (register, download, verify, promote) take? Target: <= 5% on ETTh1.

Each job runs `pipelines.retrain.run_retrain` in this process with `force=True` against an
embedded MLflow store (sqlite + local artifacts) in a temporary folder whose tables are created
just before the timed job (as for every scheduled run after the first; the one-time creation is
reported as `store_init_s`). The MLflow import is inside the job. The gate runs inside
`prepare`; it is re-timed here on the same training residuals and shown apart from preprocess.

Writes benchmarks/results/retrain.json and .md. Run: python benchmarks/retrain.py
(`--jobs demo` for the quick part; `--etth1-epochs` reduces ETTh1 training and is reported).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402

from forecaster.config import Config, load_config  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.preprocess import residuals  # noqa: E402
from pipelines.retrain import STAGES, run_retrain  # noqa: E402
from pipelines.stationarity import gate  # noqa: E402

NAME = "retrain"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": REPO / "configs" / "demo.yaml", "etth1": REPO / "configs" / "etth1.yaml"}
TRACKING_STAGES = ("log", "register")
COLUMNS = ("preprocess", "gate", *STAGES[1:], "other")


def _gate_seconds(config: Config) -> float:
    """The gate's ADF + KPSS over every series' training residuals, timed alone (best of 3)."""
    prepared = prepare(config)
    tested = residuals(prepared.spec, prepared.train_frame())
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        gate(tested, config.stationarity)
        best = min(best, time.perf_counter() - started)
    return best


def _init_store(config: Config) -> float:
    """Create the embedded store's tables before the timed job; return the seconds it took.

    A scheduled retrain writes into an existing store; creating its tables (a one-time cost of
    several seconds) is reported apart, not as part of the job.
    """
    from pipelines.tracking import resolve_tracking

    uri = resolve_tracking(config.output_dir).uri
    code = f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_experiments()"
    started = time.perf_counter()  # in a subprocess, so the job below still pays the import
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def run_job(job: str, overrides: list[str], root: Path) -> dict[str, Any]:
    """One forced retrain of `job` into an embedded store under `root` (tables created first)."""
    config = load_config(CONFIGS[job], [f"output_dir={root / job}", *overrides])
    store_init_s = _init_store(config)
    result = run_retrain(config, force=True)
    stages = dict(result.stages_s)
    gate_s = _gate_seconds(config)
    stages["gate"] = gate_s
    stages["preprocess"] = max(0.0, stages["preprocess"] - gate_s)
    stages["other"] = max(0.0, result.total_s - sum(result.stages_s.values()))
    tracking_s = sum(stages[s] for s in TRACKING_STAGES)
    training = {}
    for method, history in result.histories.items():
        steps_s = sum(r.train_seconds for r in history.epochs)
        feedback_s = sum(r.feedback_seconds or 0.0 for r in history.epochs)
        training[method] = {
            "method_used": history.method,
            "epochs": len(history.epochs),
            "steps": sum(r.steps for r in history.epochs),
            "steps_s": steps_s,
            "feedback_estimate_s": feedback_s,
            "validation_s": history.total_seconds - steps_s - feedback_s,
        }
    return {
        "job": job,
        "config": str(CONFIGS[job].relative_to(REPO)),
        "overrides": overrides,
        "total_s": result.total_s,
        "stages_s": {k: stages.get(k, 0.0) for k in COLUMNS},
        "tracking_registry_s": tracking_s,
        "tracking_registry_share": tracking_s / result.total_s,
        "store_init_s": store_init_s,
        "training": training,
        "load_average_after": list(os.getloadavg()),
        "outcome": result.outcome,
        "message": result.message,
    }


def markdown(payload: dict[str, Any]) -> str:
    """The results table with what was reduced."""
    head = ["job", "total s", *(c.replace("_", " ") for c in COLUMNS), "tracking + registry"]
    lines = [
        "# Retrain wall time per stage (CPU, embedded MLflow store)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for run in payload["runs"]:
        stages = run["stages_s"]
        share = f"{run['tracking_registry_s']:.1f} s ({100 * run['tracking_registry_share']:.1f}%)"
        lines.append(
            f"| {run['job']} | {run['total_s']:.1f} | "
            + " | ".join(f"{stages[c]:.2f}" for c in COLUMNS)
            + f" | {share} |"
        )
    lines += [
        "",
        "Seconds. *export* is export to ONNX with the parity check plus scoring the exported "
        "model on every validation and test window; *log* is opening the MLflow store, the "
        "parent and nested runs, plots, bundle files, the ONNX model and the baselines (the "
        "per-epoch metrics are inside the training times); *register* registers both "
        "models, downloads and verifies each registered copy and moves the aliases; *gate* is "
        "re-timed alone on the same training residuals and subtracted from *preprocess* "
        "(load, validate, fit). *other*: lock, state file, ending the parent run. "
        "Tracking + registry = log + register; target <= 5% on ETTh1. The store's tables are "
        "created before the job (as for every scheduled run after the first): "
        + ", ".join(f"{r['job']} {r['store_init_s']:.1f} s" for r in payload["runs"])
        + " once, not counted above; the MLflow import is counted.",
        "",
    ]
    lines += [
        "Inside the training stages (seconds): optimiser steps, the feedback estimate, and "
        "validation (every validation window after each epoch and once before the first).",
        "",
        "| job | model | method | epochs | steps | steps s | s/step | feedback estimate s "
        "| validation s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in payload["runs"]:
        for role, t in run["training"].items():
            per_step = t["steps_s"] / max(t["steps"], 1)
            lines.append(
                f"| {run['job']} | {role} | {t['method_used']} | {t['epochs']} | {t['steps']} | "
                f"{t['steps_s']:.1f} | {per_step:.2f} | {t['feedback_estimate_s']:.1f} | "
                f"{t['validation_s']:.1f} |"
            )
    lines.append("")
    for run in payload["runs"]:
        reduced = ", ".join(f"`{o}`" for o in run["overrides"]) or "none"
        load = ", ".join(f"{v:.1f}" for v in run["load_average_after"])
        lines.append(
            f"- {run['job']} ({run['config']}): overrides {reduced}; {run['outcome']}; load "
            f"average (1, 5, 15 min) after the job: {load} on 2 shared cores."
        )
    for job in payload["not_run"]:
        lines.append(f"- {job}: not run.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run the jobs, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--etth1-epochs", type=int, default=2, help="train.epochs on ETTh1")
    parser.add_argument(
        "--etth1-max-windows", type=int, default=2048, help="train.max_windows on ETTh1"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    # The embedded store in a temporary folder, never a server named by the environment.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    runs = []
    with tempfile.TemporaryDirectory(prefix="retrain_bench_") as tmp:
        for job in args.jobs:
            overrides = [f"train.device={args.device}"]
            if job == "etth1":
                overrides += [
                    f"train.epochs={args.etth1_epochs}",
                    f"train.max_windows={args.etth1_max_windows}",
                ]
            run = run_job(job, overrides, Path(tmp))
            print(
                f"{job}: {run['total_s']:.1f} s, tracking + registry "
                f"{100 * run['tracking_registry_share']:.1f}% — {run['message']}"
            )
            runs.append(run)
    payload = {"runs": runs, "not_run": [j for j in CONFIGS if j not in args.jobs]}
    write_results(NAME, payload, markdown(payload))


if __name__ == "__main__":
    main()
