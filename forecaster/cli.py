"""The `forecaster` command line: parse, call the library and pipelines, render, exit codes.

The composition root (STYLE.md §2): the only module that may import `pipelines` and `serving`,
always inside command functions so `--help` stays fast. A `ForecasterError` becomes one line on
stderr and exit code 2; nothing prints a traceback at a user.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from forecaster.errors import ForecasterError

if TYPE_CHECKING:
    from forecaster.config import Config
    from pipelines.prepare import PreparedData

app = typer.Typer(
    name="forecaster",
    help="Forecasting service for industrial time series: validate, preprocess, train, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Pipes and CI logs get a fixed, readable width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

# Shown in full only when debugging the tool itself; users get one line.
_DEBUG_ENV = "FORECASTER_DEBUG"
# A data file can have thousands of problems; the first ones say what is wrong.
_MAX_PROBLEMS_SHOWN = 20

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="YAML config file (see configs/).", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value by its YAML name: section.key=value."),
]


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    _print_error(message)
    raise typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn library errors into one line and exit code 2; unexpected errors into exit code 1."""
    try:
        yield
    except ForecasterError as exc:
        _print_error(exc.message)
        problems = getattr(exc, "problems", None) or []
        for extra in problems[1 : _MAX_PROBLEMS_SHOWN + 1]:
            err_console.print(f"  - {extra}", highlight=False, soft_wrap=True)
        if len(problems) > _MAX_PROBLEMS_SHOWN + 1:
            err_console.print(f"  … {len(problems) - _MAX_PROBLEMS_SHOWN - 1} more not shown")
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if os.environ.get(_DEBUG_ENV):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set {_DEBUG_ENV}=1 for details)", 1)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load(config_path: Path, overrides: list[str] | None) -> Config:
    from forecaster.config import load_config

    return load_config(config_path, overrides or [])


@app.command()
def validate(
    data: Annotated[Path, typer.Option("--data", "-d", help="CSV or Parquet file.")],
    layout: Annotated[str, typer.Option(help="long (unique_id, ds, y) or wide.")] = "long",
    time_col: Annotated[
        str | None, typer.Option(help="Time column; detected among ds, date, timestamp, …")
    ] = None,
    id_col: Annotated[str, typer.Option(help="Series id column (long layout).")] = "unique_id",
    target_col: Annotated[str, typer.Option(help="Value column (long layout).")] = "y",
    columns: Annotated[
        list[str] | None, typer.Option("--column", help="Wide layout: series column to use.")
    ] = None,
    freq: Annotated[str | None, typer.Option(help="Expected frequency (pandas alias).")] = None,
    gaps: Annotated[str, typer.Option(help="refuse or interpolate missing steps.")] = "refuse",
    max_gap: Annotated[int, typer.Option(help="Longest gap to interpolate, in steps.")] = 3,
    min_length: Annotated[int, typer.Option(help="Shortest acceptable series.")] = 1,
) -> None:
    """Check a data file against the data contract and report every problem found."""
    with _user_errors():
        from pydantic import ValidationError

        from forecaster.config import DataConfig, GapConfig
        from forecaster.data import load_data
        from forecaster.data import validate as validate_frame

        try:
            data_config = DataConfig(
                source="file",
                path=data,
                layout=layout,  # type: ignore[arg-type]
                time_col=time_col,
                id_col=id_col,
                target_col=target_col,
                columns=columns,
                freq=freq,
                gaps=GapConfig(policy=gaps, max_gap=max_gap),  # type: ignore[arg-type]
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            key = str(first["loc"][-1]) if first["loc"] else "data"
            option = {"policy": "--gaps", "columns": "--column"}.get(
                key, "--" + key.replace("_", "-")
            )
            _fail(f"{option}: {first.get('input')!r}: {first['msg']}")
        frame = load_data(data_config)
        checked = validate_frame(
            frame,
            freq=freq,
            min_length=min_length,
            gap_policy=gaps,
            max_gap=max_gap,
            unsorted="sort",
        )
        table = Table(title=f"{data}: {checked.n_series} series, frequency {checked.freq}")
        for column in ("series", "rows", "first", "last"):
            table.add_column(column)
        for series_id, group in checked.frame.groupby("unique_id", sort=False):
            table.add_row(
                str(series_id), str(len(group)), str(group["ds"].iloc[0]), str(group["ds"].iloc[-1])
            )
        console.print(table)
        for warning in checked.warnings:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        console.print("[green]ok[/]: no problems found")


def _print_prepared(prepared: PreparedData) -> None:
    table = Table(title=f"preprocessing and stationarity ({len(prepared.spec.series)} series)")
    for column in ("series", "train rows", "slope", "periods", "scale", "verdict", "after remedy"):
        table.add_column(column, overflow="fold")
    for row in prepared.summary_rows():
        table.add_row(*row)
    console.print(table)
    decision = prepared.decision
    colour = {"feedback": "green", "bptt": "yellow", "refuse": "red"}[decision.method]
    console.print(
        f"gate: [{colour}]{decision.method}[/] (differences={decision.differences}) — "
        f"{decision.reason}",
        highlight=False,
    )


@app.command()
def preprocess(
    config: ConfigOption,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Use this file instead of data.path.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <output_dir>/preprocess).")
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Fit preprocessing on the training window, run the stationarity gate, write both reports."""
    with _user_errors():
        from pipelines.prepare import prepare

        cfg = _load(config, overrides)
        prepared = prepare(cfg, data_path=data)
        out_dir = out if out is not None else cfg.output_dir / "preprocess"
        written = prepared.write(out_dir)
        _print_prepared(prepared)
        for path in written:
            console.print(f"wrote {path}", highlight=False)
        if prepared.decision.method == "refuse":
            _fail(f"stationarity gate refused (strict mode): {prepared.decision.reason}")


def _print_scores(title: str, scores: dict[str, dict[str, float]]) -> None:
    table = Table(title=title)
    for column in ("forecaster", "MSE", "MAE", "windows"):
        table.add_column(column)
    for name, score in scores.items():
        table.add_row(name, f"{score['mse']:.4f}", f"{score['mae']:.4f}", str(score["n_windows"]))
    console.print(table)


@app.command()
def train(
    config: ConfigOption,
    method: Annotated[
        str | None, typer.Option(help="feedback, bptt or tbptt (default: train.method).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Use this file instead of data.path.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: output_dir).")] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Ignore checkpoints and start from scratch.")
    ] = False,
    overrides: SetOption = None,
) -> None:
    """Train the configured model (resuming from checkpoints), export it, score it on test.

    Under `torchrun --nproc-per-node N` the processes train one model data-parallel (gloo on
    CPU, NCCL on GPUs; `train.batch_size` is the global batch); rank 0 checkpoints and writes
    the bundle.
    """
    with _user_errors():
        from forecaster.training import distributed
        from pipelines.train import run_training

        extra = list(overrides or [])
        if method is not None:
            extra.append(f"train.method={method}")
        if device is not None:
            extra.append(f"train.device={device}")
        cfg = _load(config, extra)
        distributed.init_from_env(cfg.train.device)
        try:
            outcome = run_training(
                cfg,
                data_path=data,
                out_dir=out,
                resume=not fresh,
                progress=sys.stderr.isatty(),
            )
        finally:
            distributed.shutdown()
        if outcome.bundle is not None:  # ranks other than 0 write and report nothing
            history = outcome.history
            console.print(
                f"trained {cfg.model.name} with {outcome.method} ({outcome.method_reason})"
                f"{f' on {history.world_size} processes' if history.world_size > 1 else ''}; "
                f"{len(history.epochs)} epochs in {history.total_seconds:.1f} s, best validation "
                f"MSE {history.best_val_loss:.4f} at epoch {history.best_epoch}",
                highlight=False,
            )
            _print_scores(
                f"{cfg.name}: exported model on the protocol's windows (z-scored MSE/MAE)",
                outcome.evaluations,
            )
            console.print(f"bundle: {outcome.bundle}", highlight=False)
        distributed.end_process()  # a data-parallel rank: exit 0 without finalization


@app.command()
def evaluate(
    config: ConfigOption,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle folder (default: <out or output_dir>/bundle_<method>)."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="The method `train` was asked for (default: train.method)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="The output folder `train` wrote to (default: output_dir).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Use this file instead of data.path.")
    ] = None,
    part: Annotated[str, typer.Option(help="test or val.")] = "test",
    overrides: SetOption = None,
) -> None:
    """Score a trained bundle and the baselines on every window of the test (or val) part."""
    with _user_errors():
        from pipelines.train import evaluate_bundle

        if part not in ("test", "val"):
            _fail(f"--part: {part!r} is not 'test' or 'val'")
        cfg = _load(config, [*(overrides or []), *([f"train.method={method}"] if method else [])])
        folder = bundle
        if folder is None:
            folder = (out or cfg.output_dir) / f"bundle_{cfg.train.method}"
        if not folder.is_dir():
            flags = "".join(f" --{k} {v}" for k, v in (("method", method), ("out", out)) if v)
            _fail(
                f"bundle not found: {folder} (run `forecaster train --config {config}{flags}` "
                "first, or give --bundle)"
            )
        scores = evaluate_bundle(cfg, folder, data_path=data, part=part)  # type: ignore[arg-type]
        _print_scores(f"{cfg.name}: {part} part, z-scored MSE/MAE (all windows)", scores)


@app.command()
def detect(
    input_path: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help="CSV: timestamp,value (NAB) or unique_id,ds,y.",
            show_default=False,
        ),
    ],
    output_path: Annotated[
        Path,
        typer.Option("--output", "-o", help="CSV written: input rows + anomaly_score, is_anomaly."),
    ],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config; its anomaly section.")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Model bundle folder: its one-step forecasts add a residual test for the "
            "series it was trained on (long format, same unique_id)."
        ),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Score every row for anomalies, causally: fitted on each series' first 15% (NAB's
    probationary period), then online; the output has one row per input row, in order."""
    with _user_errors():
        from pipelines.detect import run_detect

        cfg = _load(config, overrides) if config is not None else None
        report = run_detect(input_path, output_path, cfg, bundle=bundle)
        on_model = f", {len(report.on_model)} on the model's forecasts" if bundle else ""
        console.print(
            f"{report.rows} rows, {report.series} series{on_model}, {report.flagged} flagged "
            f"-> {report.output_path} ({report.seconds:.1f} s)",
            highlight=False,
        )


@app.command()
def demo(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Demo config (default: built in, the settings of configs/demo.yaml, "
            "output in ./.demo).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
) -> None:
    """Run the whole path that exists, end to end, on embedded synthetic plant data."""
    with _user_errors():
        from forecaster.config import parse_config
        from pipelines.demo import DEMO_SETTINGS, run_demo

        cfg = _load(config, None) if config is not None else parse_config(DEMO_SETTINGS)
        out_dir = out if out is not None else cfg.output_dir
        run_demo(
            cfg, out_dir, report=lambda line: console.print(line, highlight=False, soft_wrap=True)
        )


TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store)."
    ),
]
# Crash-safety tests SIGKILL `retrain` at a named stage (`<stage>[+<seconds>]`).
_KILL_AT_ENV = "FORECASTER_TEST_KILL_AT"


@app.command()
def serve(
    config: ConfigOption,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 to expose).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    bundle: Annotated[
        list[Path] | None,
        typer.Option(
            help="Serve local bundle folders instead of the registry: champion, then fallback."
        ),
    ] = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Serve forecasts and anomaly scores over HTTP (BentoML): the registry's `champion` with
    `fallback` behind it, or local bundles. Bearer auth when FORECASTER_API_TOKEN is set."""
    with _user_errors():
        from serving.launch import serve as launch

        code = launch(config, host=host, port=port, bundle=bundle, tracking_uri=tracking_uri)
    raise typer.Exit(code)


_RETRAIN_HELP = (
    "Retrain, log, register and promote unattended (cron, systemd timer, Kubernetes CronJob)."
    "\n\nTakes <output_dir>/retrain.lock, trains the feedback champion candidate and the BPTT "
    "fallback, logs both with the baselines to MLflow, and moves the champion and fallback "
    "aliases only to verified versions that beat their holders. A re-run on the data and config "
    "of the last completed retrain ends at once as 'up to date' (--force retrains). Prints one "
    "line."
    "\n\nExit codes: 0 promoted, kept the champion, or up to date (the line says which); "
    "1 internal error; 2 data, config or model error; 3 another retrain holds the lock; "
    "4 time budget exceeded (no alias moved); 5 tracking or registry error; "
    "6 export or parity check failed."
)


def _exit_on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)


@app.command(help=_RETRAIN_HELP)
def retrain(
    config: ConfigOption,
    tracking_uri: TrackingUriOption = None,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Use this file instead of data.path.")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="Time budget: 3600s, 90m, 2h; past it the job stops, aliases kept."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Retrain even when data and config are unchanged.")
    ] = False,
    lock_max_age: Annotated[
        str | None,
        typer.Option(help="Age after which another host's lock is stale (default 2× budget, 6h)."),
    ] = None,
    overrides: SetOption = None,
) -> None:
    """Retrain unattended under the output folder's lock; see `_RETRAIN_HELP`."""
    # systemd and Kubernetes stop a job with SIGTERM: unwind, so the lock is released and the
    # MLflow run ends FAILED, and exit 143 as a plain SIGTERM death would.
    from forecaster.training import launched_by_torchrun  # torch-free: retrain may not need torch

    if launched_by_torchrun():
        _fail(
            "retrain runs as one process (it holds the output folder's lock and moves the "
            "registry's aliases); to train one model on several processes use "
            "`torchrun --nproc-per-node N -m forecaster train --config C`"
        )
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with _user_errors():
            from pipelines.retrain import exit_code, parse_duration, run_retrain

            try:
                cfg = _load(config, overrides)
                result = run_retrain(
                    cfg,
                    tracking_uri=tracking_uri,
                    data_path=data,
                    budget_s=parse_duration(budget) if budget is not None else None,
                    force=force,
                    lock_max_age_s=(
                        parse_duration(lock_max_age, name="--lock-max-age")
                        if lock_max_age is not None
                        else None
                    ),
                    config_label=str(config.resolve()),
                    kill_at=os.environ.get(_KILL_AT_ENV) or None,
                )
            except ForecasterError as exc:
                _fail(f"retrain failed: {exc.message}", int(exit_code(exc)))
            console.print(result.message, highlight=False, soft_wrap=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


models_app = typer.Typer(
    help="Registered model versions and their aliases (MLflow registry).", no_args_is_help=True
)
app.add_typer(models_app, name="models")


def _print_versions(versions: list[Any]) -> None:
    table = Table(title=f"registered model {versions[0].name}" if versions else "no versions")
    for column in ("version", "aliases", "role", "test MSE", "verified", "run"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            v.version,
            ",".join(v.aliases) or "-",
            v.tags.get("role", "-"),
            v.tags.get("test_mse", "-"),
            v.tags.get("verified", "-"),
            v.run_id or "-",
        )
    console.print(table)


@models_app.command("list")
def models_list(config: ConfigOption, tracking_uri: TrackingUriOption = None) -> None:
    """List every version of the config's registered model, newest first."""
    with _user_errors():
        from pipelines.tracking import list_versions

        cfg = _load(config, None)
        _print_versions(list_versions(cfg.name, uri=tracking_uri, output_dir=cfg.output_dir))


@models_app.command("show")
def models_show(
    config: ConfigOption,
    which: Annotated[str, typer.Argument(help="A version number or an alias (champion).")],
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Show one version, by number or alias."""
    with _user_errors():
        from pipelines.tracking import show

        cfg = _load(config, None)
        _print_versions([show(cfg.name, which, uri=tracking_uri, output_dir=cfg.output_dir)])


@models_app.command("promote")
def models_promote(
    config: ConfigOption,
    version: Annotated[str, typer.Argument(help="Version number to point the alias at.")],
    alias: Annotated[str, typer.Option(help="champion or fallback.")] = "champion",
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Point an alias at a version by hand (its ONNX model must load)."""
    with _user_errors():
        from pipelines.tracking import promote

        cfg = _load(config, None)
        info = promote(cfg.name, version, alias, uri=tracking_uri, output_dir=cfg.output_dir)
        console.print(f"@{alias} → v{info.version}", highlight=False)


@models_app.command("rollback")
def models_rollback(
    config: ConfigOption,
    alias: Annotated[str, typer.Option(help="champion or fallback.")] = "champion",
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Point an alias back at the version that held it before."""
    with _user_errors():
        from pipelines.tracking import rollback

        cfg = _load(config, None)
        info = rollback(cfg.name, alias, uri=tracking_uri, output_dir=cfg.output_dir)
        console.print(f"@{alias} rolled back to v{info.version}", highlight=False)


def main() -> None:
    """Entry point for `python -m forecaster.cli`."""
    app()


if __name__ == "__main__":
    main()
