"""ETT univariate (target OT) accuracy: recurrent forecasters, fixed feedback vs BPTT (issue 12).

Question: on the standard ETT protocol (../shared/data/README.md §1: train [0, 8640) /
val [8640 - L, 11520) / test [11520 - L, 14400) for ETTh, x4 for ETTm; z-scored on train;
MSE/MAE on that scale over ALL test windows, stride 1), what test MSE/MAE do MI-GRU, LMN, SCRN
and GRU reach with fixed-feedback training and with BPTT (the GRU's BPTT runs torch's fused
kernel, its feedback the same equations in `recur`; LSTM is skipped), next to repeat-last /
seasonal-naive and the published univariate numbers? Targets: feedback's mean test MSE within
3% of BPTT's; best model <= 0.053 at H = 96 on ETTh1 (repeat-last: 0.0693).

Every run goes through `pipelines.train.run_training` (train -> ONNX export -> evaluation of the
exported model on every val and test window), with a config built in code in the shape of
configs/etth1.yaml: wide layout, column OT, split kind `ett`, no trend/seasonality, standard
scaling; the stationarity gate then differences once and the model predicts changes. Early
stopping and the kept weights use the validation loss only; the "selected" row per (dataset, H)
picks the model/method with the lowest mean VALIDATION MSE and reports its test MSE.

Published numbers (MSE, univariate, look-back 336 for PatchTST/42, 512 for PatchTST/64) are
copied from Nie et al., "A Time Series is Worth 64 Words: Long-term Forecasting with
Transformers", ICLR 2023 (arXiv:2211.14730), Appendix A.3, Table 8; its DLinear column is cited
there from Zeng et al. (2022/AAAI 2023). NLinear's univariate numbers are NOT included: we could
not check them against the source table, so they are left out rather than guessed.

Results are written after every run (benchmarks/results/ett.json + .md), so a partial run leaves
a valid file; `--append` keeps the runs already in ett.json and skips those it would repeat.

Run (CPU subset): python benchmarks/ett.py --datasets ETTh1 --horizons 96 --models mi_gru \
    --methods feedback bptt --seeds 0 1 2 --epochs 5 --max-windows 1536
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, write_results  # noqa: E402

from forecaster.config import parse_config  # noqa: E402
from forecaster.models.registry import resolve  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.train import evaluate_baselines, run_training  # noqa: E402

NAME = "ett"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ett"
DATASETS = {"ETTh1": ("ETTh", "h"), "ETTh2": ("ETTh", "h"), "ETTm1": ("ETTm", "15min")}
HORIZONS = (96, 192, 336, 720)
MODELS = ("mi_gru", "lmn", "scrn", "gru")
# The models a `feedback*` method runs for: those the registry says support it (all of MODELS).
FEEDBACK_MODELS = {name for name in MODELS if resolve(name)[0].supports_feedback}

# Nie et al., ICLR 2023 (arXiv:2211.14730), Appendix A.3, Table 8 — univariate ETT, target OT.
# (MSE, MAE); the DLinear column is cited there from Zeng et al.
PUBLISHED_SOURCE = (
    "Nie et al., 'A Time Series is Worth 64 Words', ICLR 2023 (arXiv:2211.14730), "
    "Appendix A.3, Table 8 (univariate ETT; DLinear column cited there from Zeng et al.)"
)
PUBLISHED: dict[str, dict[str, dict[int, tuple[float, float]]]] = {
    "PatchTST/64": {
        "ETTh1": {
            96: (0.059, 0.189),
            192: (0.074, 0.215),
            336: (0.076, 0.220),
            720: (0.087, 0.236),
        },
        "ETTh2": {
            96: (0.131, 0.284),
            192: (0.171, 0.329),
            336: (0.171, 0.336),
            720: (0.223, 0.380),
        },
        "ETTm1": {
            96: (0.026, 0.123),
            192: (0.040, 0.151),
            336: (0.053, 0.174),
            720: (0.073, 0.206),
        },
    },
    "PatchTST/42": {
        "ETTh1": {
            96: (0.055, 0.179),
            192: (0.071, 0.205),
            336: (0.081, 0.225),
            720: (0.087, 0.232),
        },
        "ETTh2": {
            96: (0.129, 0.282),
            192: (0.168, 0.328),
            336: (0.185, 0.351),
            720: (0.224, 0.383),
        },
        "ETTm1": {
            96: (0.026, 0.121),
            192: (0.039, 0.150),
            336: (0.053, 0.173),
            720: (0.074, 0.207),
        },
    },
    "DLinear": {
        "ETTh1": {
            96: (0.056, 0.180),
            192: (0.071, 0.204),
            336: (0.098, 0.244),
            720: (0.189, 0.359),
        },
        "ETTh2": {
            96: (0.131, 0.279),
            192: (0.176, 0.329),
            336: (0.209, 0.367),
            720: (0.276, 0.426),
        },
        "ETTm1": {
            96: (0.028, 0.123),
            192: (0.045, 0.156),
            336: (0.061, 0.182),
            720: (0.080, 0.210),
        },
    },
}


def build_config(
    options: dict[str, Any],
    dataset: str,
    horizon: int,
    model: str,
    method: str,
    seed: int,
    out_dir: Path,
) -> Any:
    """A config in the shape of configs/etth1.yaml for one run."""
    kind, freq = DATASETS[dataset]
    method, feedback = split_method(method)
    model_name, linear_lags = split_model(model)
    train: dict[str, Any] = {
        "method": method,
        "epochs": options["epochs"],
        "patience": options["patience"],
        "batch_size": options["batch_size"],
        "lr": options["lr"],
        "device": options["device"],
        "deterministic": True,
    }
    if feedback:
        train["feedback"] = feedback
    if options["max_windows"]:
        train["max_windows"] = options["max_windows"]
    raw = {
        "name": f"{dataset}_{horizon}_{model}_{method}_s{seed}".replace("+", "-"),
        "seed": seed,
        "output_dir": str(out_dir),
        "data": {
            "source": "file",
            "path": str(Path(options["data_dir"]) / f"{dataset}.csv"),
            "layout": "wide",
            "time_col": "date",
            "columns": ["OT"],
            "freq": freq,
            "split": {"kind": "ett", "ett_dataset": kind},
        },
        "window": {"lookback": options["lookback"], "horizon": horizon},
        "preprocess": {"trend": "none", "seasonality": "none", "scaling": "standard"},
        "stationarity": {"alpha": 0.05, "remedy": "difference", "d_max": 1},
        "model": {
            "name": model_name,
            "hidden_size": options["hidden"],
            "linear_lags": linear_lags,
        },
        "train": train,
    }
    return parse_config(raw, source=f"<ett {raw['name']}>")


def split_model(label: str) -> tuple[str, int]:
    """A `--models` label -> (model.name, model.linear_lags): `scrn+lin336` -> (`scrn`, 336)."""
    name, _, lags = label.partition("+lin")
    return name, int(lags) if lags else 0


def model_label(label: str) -> str:
    """argparse type of `--models`: a model name, optionally `+linK` (a K-input linear readout)."""
    name, _, lags = label.partition("+lin")
    if name in MODELS and (not lags or (lags.isdigit() and int(lags) > 0)):
        return label
    raise argparse.ArgumentTypeError(
        f"{label!r} is not one of {list(MODELS)}, optionally with '+linK' (K a positive integer)"
    )


# Method-label suffixes -> train.feedback.kind (the plain `feedback` is `jacobian_mean`).
FEEDBACK_VARIANTS = {"-matrix": "jacobian_matrix", "-step": "per_step_diag"}
NO_RECHECK = "+norecheck"


def split_method(label: str) -> tuple[str, dict[str, Any]]:
    """A `--methods` label -> (train.method, train.feedback overrides).

    `feedback-matrix+c2` -> (`feedback`, {kind: jacobian_matrix, corrections: 2}): the
    non-diagonal mean-Jacobian feedback with 2 Jacobian correction sweeps; `feedback-step`: the
    per-step diagonal ablation (kind `per_step_diag`). A trailing `+norecheck` turns off the
    gate's gradient-agreement rechecks (`recheck_every: 0`), so a run that passes the gate
    before epoch 1 trains with feedback to the end: the ablation of the switch to BPTT.
    """
    if not label.startswith("feedback"):
        return label, {}
    rest = label.removeprefix("feedback")
    feedback: dict[str, Any] = {}
    if rest.endswith(NO_RECHECK):
        feedback["recheck_every"] = 0
        rest = rest.removesuffix(NO_RECHECK)
    for variant, kind in FEEDBACK_VARIANTS.items():
        if rest.startswith(variant):
            feedback["kind"] = kind
            rest = rest.removeprefix(variant)
            break
    if rest.startswith("+c"):
        feedback["corrections"] = int(rest.removeprefix("+c"))
    return "feedback", feedback


def method_label(label: str) -> str:
    """argparse type of `--methods`: `bptt`, or `feedback[-matrix|-step][+cK][+norecheck]`."""
    rest = label.removeprefix("feedback").removesuffix(NO_RECHECK)
    variant = next((v for v in FEEDBACK_VARIANTS if rest.startswith(v)), "")
    rest = rest.removeprefix(variant)
    suffix = rest.removeprefix("+c")
    if label == "bptt" or (
        label.startswith("feedback")
        and (rest == "" or (suffix != rest and suffix.isdigit() and int(suffix) > 0))
    ):
        return label
    raise argparse.ArgumentTypeError(
        f"{label!r} is not 'bptt' or 'feedback[-matrix|-step][+cK][+norecheck]' "
        "(K a positive integer)"
    )


def run_key(run: dict[str, Any]) -> tuple[Any, ...]:
    return (
        run["dataset"],
        run["horizon"],
        run["model"],
        run["requested_method"],
        run["seed"],
        run.get("lookback"),
        run["settings_key"],
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        key = (
            run["dataset"],
            run["horizon"],
            run["model"],
            run["requested_method"],
            run.get("lookback") or 0,  # 0: the settings' single look-back
        )
        groups.setdefault(key, []).append(run)
    rows = []
    for (dataset, horizon, model, method, lookback), members in sorted(groups.items()):
        test_mse = [r["test"]["mse"] for r in members]
        test_mae = [r["test"]["mae"] for r in members]
        val_mse = [r["val"]["mse"] for r in members]
        rows.append(
            {
                "dataset": dataset,
                "horizon": horizon,
                "model": model,
                "method": method,
                "lookback": lookback or None,
                "methods_used": sorted({r["method_used"] for r in members}),
                "seeds": sorted(r["seed"] for r in members),
                "test_mse_mean": mean_std(test_mse)[0],
                "test_mse_std": mean_std(test_mse)[1],
                "test_mae_mean": mean_std(test_mae)[0],
                "test_mae_std": mean_std(test_mae)[1],
                "val_mse_mean": mean_std(val_mse)[0],
                "val_mse_std": mean_std(val_mse)[1],
                "seconds_mean": statistics.fmean(r["seconds"] for r in members),
                "epochs_mean": statistics.fmean(r["epochs_run"] for r in members),
            }
        )
    return rows


def targets(rows: list[dict[str, Any]], baselines: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"feedback_within_3pct_of_bptt": {}}
    index = {
        (r["dataset"], r["horizon"], r["model"], r["method"], r.get("lookback")): r for r in rows
    }
    for (dataset, horizon, model, method, lookback), row in index.items():
        if not method.startswith("feedback"):
            continue
        bptt = index.get((dataset, horizon, model, "bptt", lookback))
        if bptt is None:
            continue
        ratio = row["test_mse_mean"] / bptt["test_mse_mean"]
        at = f"/L{lookback}" if lookback else ""
        variant = method.removeprefix("feedback")
        out["feedback_within_3pct_of_bptt"][f"{dataset}/H{horizon}/{model}{variant}{at}"] = {
            "feedback": round(row["test_mse_mean"], 5),
            "bptt": round(bptt["test_mse_mean"], 5),
            "ratio": round(ratio, 4),
            "met": ratio <= 1.03,
        }
    h1 = [r for r in rows if r["dataset"] == "ETTh1" and r["horizon"] == 96]
    if h1:
        best = min(h1, key=lambda r: r["test_mse_mean"])
        chosen = min(h1, key=lambda r: r["val_mse_mean"])
        out["ETTh1_H96_best_le_0.053"] = {
            "best_test_mean": round(best["test_mse_mean"], 5),
            "best": _label(best),
            "met": best["test_mse_mean"] <= 0.053,
            "selected_on_val": _label(chosen),
            "selected_test_mean": round(chosen["test_mse_mean"], 5),
            "selected_met": chosen["test_mse_mean"] <= 0.053,
        }
        rl = baselines.get("ETTh1/96", {}).get("repeat_last")
        if rl:
            out["ETTh1_H96_repeat_last"] = round(rl["mse"], 5)
    return out


def ratio_table(within: dict[str, dict[str, Any]]) -> list[str]:
    """The 3% target as markdown: one row per model and feedback variant, one column per
    (dataset, H), the cell its mean test MSE over BPTT's (`targets`), marked where it misses."""
    settings: list[tuple[str, int]] = []
    cells: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for key, entry in within.items():
        dataset, horizon, variant = key.split("/", 2)
        setting = (dataset, int(horizon.removeprefix("H")))
        if setting not in settings:
            settings.append(setting)
        cells.setdefault(variant, {})[setting] = entry
    if not cells:
        return []
    settings.sort()
    lines = [
        "",
        "Feedback's mean test MSE over BPTT's (target ≤ 1.03; **bold**: missed). Variant: "
        "model, then the method's suffix (none: the default diagonal feedback):",
        "",
        "| variant | " + " | ".join(f"{d} {h}" for d, h in settings) + " | within 3% |",
        "|---|" + "---|" * (len(settings) + 1),
    ]
    for variant in sorted(cells):
        row = cells[variant]
        shown = [
            "–"
            if setting not in row
            else (
                f"{row[setting]['ratio']:.3f}"
                if row[setting]["met"]
                else f"**{row[setting]['ratio']:.3f}**"
            )
            for setting in settings
        ]
        met = sum(entry["met"] for entry in row.values())
        lines.append(f"| {variant} | " + " | ".join(shown) + f" | {met} of {len(row)} |")
    return lines


def _label(row: dict[str, Any]) -> str:
    at = f" L={row['lookback']}" if row.get("lookback") else ""
    return f"{row['model']}/{row['method']}{at}"


def fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    rows, baselines = payload["summary"], payload["baselines"]
    lines = [
        "# ETT univariate (OT): test MSE / MAE on the standard protocol",
        "",
        f"**Reduced CPU settings**: look-back {s['lookback']}"
        + (
            " (each row's L; the selection on validation MSE picks among them)"
            if isinstance(s["lookback"], list)
            else ""
        )
        + f", hidden {s['hidden']}, "
        f"batch {s['batch_size']}, lr {s['lr']}, at most {s['epochs']} epochs of "
        f"{s['max_windows'] or 'all'} training windows each (random subsample per epoch), "
        f"early stopping on validation loss with patience {s['patience']}; "
        f"{s['threads']} torch thread(s). All val/test windows are scored (exported ONNX model, "
        "z-scored on train). Mean ± std over seeds. Wall time of all runs (train + export + "
        f"evaluation): {payload.get('total_run_seconds_all_invocations', 0):.0f} s.",
        "",
        "| dataset | H | model | method | L | seeds | test MSE | test MAE | val MSE | epochs "
        "| s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        used = (
            "" if r["methods_used"] == [r["method"]] else f" (used {','.join(r['methods_used'])})"
        )
        lines.append(
            f"| {r['dataset']} | {r['horizon']} | {r['model']} | {r['method']}{used} | "
            f"{r.get('lookback') or s['lookback']} | {len(r['seeds'])} | "
            f"{fmt(r['test_mse_mean'], r['test_mse_std'])} | "
            f"{fmt(r['test_mae_mean'], r['test_mae_std'])} | "
            f"{fmt(r['val_mse_mean'], r['val_mse_std'])} | {r['epochs_mean']:.1f} | "
            f"{r['seconds_mean']:.0f} |"
        )
    lines += [
        "",
        "Baselines and published univariate MSE (same protocol; published numbers "
        f"from {PUBLISHED_SOURCE}):",
        "",
        "| dataset | H | repeat-last | seasonal naive | selected on val (ours, test) | "
        "PatchTST/64 | PatchTST/42 | DLinear |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(baselines, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
        dataset, horizon = key.split("/")[0], int(key.split("/")[1])
        b = baselines[key]
        group = [r for r in rows if r["dataset"] == dataset and r["horizon"] == horizon]
        chosen = min(group, key=lambda r: r["val_mse_mean"]) if group else None
        sel = f"{chosen['test_mse_mean']:.4f} ({_label(chosen)})" if chosen else "–"
        pub = [PUBLISHED[m].get(dataset, {}).get(horizon) for m in PUBLISHED]
        lines.append(
            f"| {dataset} | {horizon} | {b['repeat_last']['mse']:.4f} | "
            f"{b['seasonal_naive']['mse']:.4f} | {sel} | "
            + " | ".join(f"{p[0]:.3f}" if p else "–" for p in pub)
            + " |"
        )
    lines += [
        "",
        "NLinear: not listed (its univariate numbers could not be verified against the "
        "source table here).",
    ]
    lines += ratio_table(payload["targets"]["feedback_within_3pct_of_bptt"])
    others = {k: v for k, v in payload["targets"].items() if k != "feedback_within_3pct_of_bptt"}
    lines += ["", "Other targets: " + json.dumps(others)]
    if payload.get("not_run"):
        lines += ["", "Not run: " + payload["not_run"]]
    return "\n".join(lines)


RUN_OPTIONS = (
    "epochs",
    "patience",
    "batch_size",
    "lr",
    "max_windows",
    "lookback",
    "hidden",
    "device",
    "threads",
    "data_dir",
)
_PREPARED: dict[tuple[str, int, int], Any] = {}


def run_task(task: dict[str, Any], options: dict[str, Any], work: Path) -> dict[str, Any]:
    """One training run (in the main process or a pool worker): train, export, evaluate."""
    import torch

    torch.set_num_threads(options["threads"])
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    dataset, horizon, model = task["dataset"], task["horizon"], task["model"]
    method, seed = task["requested_method"], task["seed"]
    lookback = task.get("lookback") or options["lookback"]
    out_dir = work / f"{dataset}_{horizon}_{model}_{method}_{seed}_L{lookback}"
    config = build_config(
        {**options, "lookback": lookback}, dataset, horizon, model, method, seed, out_dir
    )
    if (dataset, horizon, lookback) not in _PREPARED:  # one prepare per (dataset, H, L)
        _PREPARED[(dataset, horizon, lookback)] = prepare(config)
    t0 = time.perf_counter()
    outcome = run_training(
        config,
        method=split_method(method)[0],
        out_dir=out_dir,
        resume=False,
        prepared=_PREPARED[(dataset, horizon, lookback)],
    )
    seconds = time.perf_counter() - t0
    history = outcome.history
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        **task,
        "method_used": outcome.method,
        "method_reason": outcome.method_reason,
        "device": history.device,
        "test": outcome.evaluations["test"],
        "val": outcome.evaluations["val"],
        "seconds": round(seconds, 1),
        "epochs_run": len(history.epochs),
        "best_epoch": history.best_epoch,
        "best_val_loss": history.best_val_loss,
        "val_losses": [round(v, 5) for v in history.val_losses],
        "spectral_radius": [e.spectral_radius for e in history.epochs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--horizons", nargs="+", type=int, default=list(HORIZONS))
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        type=model_label,
        help=f"{', '.join(MODELS)}; 'scrn+lin336': with a linear readout of the last 336 inputs",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["feedback", "bptt"],
        type=method_label,
        help="bptt, or feedback[-matrix|-step][+cK][+norecheck]: the diagonal (or -matrix: "
        "mean-Jacobian matrix) fixed feedback, or -step: the per-step diagonal ablation; with K "
        "Jacobian correction sweeps; +norecheck: no gradient-agreement rechecks after epoch 1",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-windows", type=int, default=None, help="train windows per epoch")
    parser.add_argument(
        "--lookback",
        nargs="+",
        type=int,
        default=[336],
        help="look-back(s); with several, each is a row and the selection on validation MSE "
        "picks among them",
    )
    parser.add_argument("--name", default=NAME, help="results file name (benchmarks/results/)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of ETT*.csv")
    parser.add_argument("--append", action="store_true", help="keep the runs already in ett.json")
    parser.add_argument(
        "--not-run",
        default=None,
        help="text for the table: what was not run (with --append, default: the file's own)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    lookbacks: list[int] = args.lookback
    settings = {
        "lookback": lookbacks[0] if len(lookbacks) == 1 else lookbacks,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "epochs": args.epochs,
        "patience": args.patience,
        "max_windows": args.max_windows,
        "threads": args.threads,
    }
    settings_key = json.dumps(settings, sort_keys=True)
    runs: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    json_path = RESULTS_DIR / f"{args.name}.json"
    if args.append and json_path.exists():
        old = json.loads(json_path.read_text())
        runs = [r for r in old.get("runs", []) if r["settings_key"] == settings_key]
        dropped = len(old.get("runs", [])) - len(runs)
        if dropped:
            print(f"--append: dropped {dropped} earlier runs made with other settings")
        baselines = old.get("baselines", {})
        if args.not_run is None:
            args.not_run = old.get("not_run", "")
    if args.not_run is None:
        args.not_run = ""
    done = {run_key(r) for r in runs}
    work = Path(tempfile.mkdtemp(prefix="ett_bench_"))
    started = time.perf_counter()

    def flush() -> None:
        rows = aggregate(runs)
        payload = {
            "settings": settings,
            "protocol": "../shared/data/README.md §1 (all test windows)",
            "published_source": PUBLISHED_SOURCE,
            "published": {
                m: {d: {str(h): v for h, v in hs.items()} for d, hs in ds.items()}
                for m, ds in PUBLISHED.items()
            },
            "load_average_now": [round(v, 2) for v in os.getloadavg()],
            "elapsed_seconds_this_invocation": round(time.perf_counter() - started, 1),
            "total_run_seconds_all_invocations": round(sum(r["seconds"] for r in runs), 1),
            "not_run": args.not_run,
            "summary": rows,
            "baselines": baselines,
            "targets": targets(rows, baselines),
            "runs": runs,
        }
        write_results(args.name, payload, markdown(payload))

    tasks: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for horizon in args.horizons:
            for seed in args.seeds:  # seeds outermost: a partial run has all methods per seed
                for model, method, lookback in itertools.product(
                    args.models, args.methods, lookbacks
                ):
                    if (
                        method.startswith("feedback")
                        and split_model(model)[0] not in FEEDBACK_MODELS
                    ):
                        continue
                    key_run = {
                        "dataset": dataset,
                        "horizon": horizon,
                        "model": model,
                        "requested_method": method,
                        "seed": seed,
                        # one look-back: the settings' (rows stay comparable with older runs)
                        "lookback": lookback if len(lookbacks) > 1 else None,
                        "settings_key": settings_key,
                    }
                    if run_key(key_run) not in done:
                        tasks.append(key_run)
    options = {k: getattr(args, k) for k in RUN_OPTIONS}
    options["lookback"] = lookbacks[0]

    def record(run: dict[str, Any]) -> None:
        runs.append(run)
        done.add(run_key(run))
        print(
            f"{run['dataset']} H={run['horizon']} L={run.get('lookback') or lookbacks[0]} "
            f"{run['model']}/{run['requested_method']} "
            f"seed {run['seed']}: test MSE {run['test']['mse']:.4f} MAE {run['test']['mae']:.4f} "
            f"val {run['val']['mse']:.4f} ({run['seconds']:.0f}s, {run['epochs_run']} ep, used "
            f"{run['method_used']})",
            flush=True,
        )
        flush()

    try:
        for dataset, horizon in dict.fromkeys((t["dataset"], t["horizon"]) for t in tasks):
            if f"{dataset}/{horizon}" not in baselines:
                config = build_config(options, dataset, horizon, "gru", "bptt", 0, work / "b")
                prepared = prepare(config)
                baselines[f"{dataset}/{horizon}"] = {
                    **evaluate_baselines(prepared, horizon),
                    "gate": prepared.decision.method,
                    "differences": prepared.decision.differences,
                }
        if args.jobs <= 1:
            for task in tasks:
                record(run_task(task, options, work))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(run_task, task, options, work) for task in tasks]
                for future in as_completed(futures):
                    record(future.result())
    finally:
        if baselines or runs:
            flush()
        shutil.rmtree(work, ignore_errors=True)
    print(
        markdown(
            {
                "settings": settings,
                "summary": aggregate(runs),
                "baselines": baselines,
                "targets": targets(aggregate(runs), baselines),
                "total_run_seconds_all_invocations": round(sum(r["seconds"] for r in runs), 1),
                "not_run": args.not_run,
            }
        )
    )


if __name__ == "__main__":
    main()
