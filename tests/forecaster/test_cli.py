from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from forecaster.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _long_csv(path: Path, n: int = 600) -> Path:
    ds = pd.date_range("2024-01-01", periods=n, freq="h")
    y = 10 + np.sin(2 * np.pi * np.arange(n) / 24) + np.random.default_rng(0).normal(0, 0.1, n)
    pd.DataFrame({"unique_id": "pump", "ds": ds, "y": y}).to_csv(path, index=False)
    return path


def _config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        f"name: job\noutput_dir: out\ndata:\n  source: file\n  path: {data.name}\n"
        "  split: {val_size: 96, test_size: 96}\n"
        "window: {lookback: 48, horizon: 24}\n"
        "preprocess: {trend: linear, seasonality: stl, periods: [24]}\n"
    )
    return path


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["validate"],
        ["preprocess"],
        ["train"],
        ["evaluate"],
        ["demo"],
        ["detect"],
        ["retrain"],
        ["models"],
        ["models", "list"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_validate_reports_series(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", "--data", str(_long_csv(tmp_path / "d.csv"))])
    assert result.exit_code == 0, result.output
    assert "pump" in result.output
    assert "no problems found" in result.output


def test_validate_bad_file_exits_2_naming_row(tmp_path: Path) -> None:
    path = _long_csv(tmp_path / "d.csv")
    lines = path.read_text().splitlines()
    lines[18] = lines[18].rsplit(",", 1)[0] + ",oops"  # data row 17 (header is line 0)
    path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["validate", "--data", str(path)])
    assert result.exit_code == 2
    assert "row 17" in result.output
    assert "Traceback" not in result.output


def test_validate_detects_time_column_and_wide_layout(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    ds = pd.date_range("2024-01-01", periods=100, freq="15min")
    pd.DataFrame({"timestamp": ds, "a": np.arange(100.0), "b": np.arange(100.0) ** 0.5}).to_csv(
        path, index=False
    )
    result = runner.invoke(app, ["validate", "--data", str(path), "--layout", "wide"])
    assert result.exit_code == 0, result.output
    assert "frequency 15min" in result.output


def test_validate_bad_option_value_names_option(tmp_path: Path) -> None:
    path = _long_csv(tmp_path / "d.csv")
    result = runner.invoke(app, ["validate", "--data", str(path), "--gaps", "maybe"])
    assert result.exit_code == 2
    assert "--gaps: 'maybe'" in result.output


def test_preprocess_writes_both_reports(tmp_path: Path) -> None:
    config = _config(tmp_path, _long_csv(tmp_path / "d.csv"))
    result = runner.invoke(app, ["preprocess", "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "preprocess"
    spec = json.loads((out / "preprocessing.json").read_text())
    assert spec["series"]["pump"]["n_train"] == 600 - 2 * 96
    gate = json.loads((out / "stationarity.json").read_text())
    assert gate["method"] in {"feedback", "bptt"}
    assert "gate:" in result.output


def test_preprocess_unknown_config_key_is_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path, _long_csv(tmp_path / "d.csv"))
    config.write_text(config.read_text() + "trian: {}\n")
    result = runner.invoke(app, ["preprocess", "--config", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown key 'trian'" in result.output
    assert "did you mean 'train'" in result.output


def test_preprocess_set_override(tmp_path: Path) -> None:
    config = _config(tmp_path, _long_csv(tmp_path / "d.csv"))
    result = runner.invoke(
        app,
        ["preprocess", "--config", str(config), "--set", "preprocess.scaling=robust"],
    )
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "out" / "preprocess" / "preprocessing.json").read_text())
    assert spec["series"]["pump"]["scaling"]["kind"] == "robust"


def test_console_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "forecaster.cli", "validate", "--data", str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "missing.csv" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_demo_runs_the_whole_path(tmp_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text(
        "name: demo\noutput_dir: out\n"
        "data:\n  synthetic: {n_series: 2, length: 1008}\n"
        "  split: {val_size: 96, test_size: 96}\n"
        "window: {lookback: 48, horizon: 12}\n"
        "preprocess: {trend: robust, seasonality: stl, periods: [24]}\n"
        "model: {name: gru, hidden_size: 8}\n"
        "train: {epochs: 1, batch_size: 64, max_windows: 128}\n"
    )
    result = runner.invoke(app, ["demo", "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("preprocess/preprocessing.json", "preprocess/stationarity.json"):
        assert (out / name).is_file()
    for method in ("feedback", "bptt"):
        assert (out / f"bundle_{method}" / "model.onnx").is_file()
        assert (out / f"bundle_{method}" / "model_step.onnx").is_file()
    assert "seasonal_naive" in result.output
    assert result.output.count("step graph agrees: True") == 2
    assert result.output.count("injected events found:") == 2
    assert "answered by champion" in result.output
    served = re.search(r"max \|served - in-process\| = (\S+)", result.output)
    assert served is not None
    assert float(served.group(1)) <= 1e-4
    assert "mlflow ui --backend-store-uri sqlite:///" in result.output
    assert (out / "mlruns.db").is_file()

    listed = runner.invoke(app, ["models", "list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "champion" in listed.output
    assert "fallback" in listed.output
    shown = runner.invoke(app, ["models", "show", "--config", str(config), "champion"])
    assert shown.exit_code == 0, shown.output
    assert "feedback" in shown.output
    nothing_earlier = runner.invoke(app, ["models", "rollback", "--config", str(config)])
    assert nothing_earlier.exit_code == 2
    assert "no earlier version" in nothing_earlier.output


def test_detect_scores_every_row_in_order(tmp_path: Path) -> None:
    n = 2000
    rng = np.random.default_rng(3)
    values = 5 + np.sin(2 * np.pi * np.arange(n) / 48) + rng.normal(0, 0.05, n)
    values[1500] += 4.0  # one spike well after the probationary 15%
    ds = pd.date_range("2024-01-01", periods=n, freq="30min")
    source = tmp_path / "nab.csv"
    pd.DataFrame({"timestamp": ds, "value": values}).to_csv(source, index=False)
    out = tmp_path / "scored.csv"
    result = runner.invoke(app, ["detect", "--input", str(source), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "2000 rows, 1 series" in result.output
    scored = pd.read_csv(out)
    assert list(scored.columns) == ["timestamp", "value", "anomaly_score", "is_anomaly"]
    assert len(scored) == n
    assert (pd.to_datetime(scored["timestamp"]) == ds).all()
    assert scored["anomaly_score"].between(0, 1).all()
    assert scored.loc[: int(0.15 * n) - 1, "anomaly_score"].eq(0).all()  # probation: fit only
    assert bool(scored.loc[1500, "is_anomaly"])


def test_detect_bad_input_exits_2_naming_the_row(tmp_path: Path) -> None:
    source = tmp_path / "bad.csv"
    source.write_text("timestamp,value\n2024-01-01 00:00,1\n2024-01-01 00:05,oops\n")
    result = runner.invoke(app, ["detect", "-i", str(source), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code == 2
    assert "row 1" in result.output
    assert "'oops'" in result.output
    assert not (tmp_path / "o.csv").exists()


def test_retrain_refuses_to_run_under_torchrun(tmp_path: Path) -> None:
    config = _config(tmp_path, _long_csv(tmp_path / "pump.csv"))
    result = runner.invoke(
        app, ["retrain", "--config", str(config)], env={"WORLD_SIZE": "2", "RANK": "1"}
    )
    assert result.exit_code == 2
    assert "retrain runs as one process" in result.output
    assert "-m forecaster train" in result.output
    assert not (tmp_path / "out").exists()


def test_the_built_in_demo_runs_the_settings_of_configs_demo_yaml() -> None:
    """`forecaster demo` without `--config` is the quick demo of configs/demo.yaml (output in
    ./.demo), not the library defaults (look-back 336, 20 epochs)."""
    from forecaster.config import load_config, parse_config
    from pipelines.demo import DEMO_SETTINGS

    from_file = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    built_in = parse_config(DEMO_SETTINGS)
    assert built_in.output_dir.name == ".demo"
    assert built_in.model_copy(update={"output_dir": from_file.output_dir}) == from_file


def test_evaluate_finds_the_bundle_train_wrote_with_its_method_and_out(tmp_path: Path) -> None:
    data = _long_csv(tmp_path / "d.csv")
    config = _config(tmp_path, data)
    config.write_text(
        config.read_text() + "model: {hidden_size: 4}\ntrain: {epochs: 1, max_windows: 32}\n"
    )
    out = tmp_path / "elsewhere"
    args = ["--config", str(config), "--method", "bptt", "--out", str(out)]
    trained = runner.invoke(app, ["train", *args, "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    assert (out / "bundle_bptt").is_dir()
    scored = runner.invoke(app, ["evaluate", *args])
    assert scored.exit_code == 0, scored.output
    assert "repeat_last" in scored.output
    missing = runner.invoke(app, ["evaluate", "--config", str(config), "--method", "bptt"])
    assert missing.exit_code == 2
    text = "".join(missing.output.split())  # rich may wrap the line anywhere
    assert "bundle_bptt" in text
    assert "".join(f"forecaster train --config {config} --method bptt".split()) in text
