"""Serving settings from the environment, and the launcher's settings for a job config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forecaster.errors import ConfigError
from serving.launch import server_command, settings_for_config
from serving.settings import ServingSettings


def test_environment_round_trips_through_settings(tmp_path: Path) -> None:
    env = {
        "FORECASTER_CHAMPION_BUNDLE": str(tmp_path / "a"),
        "FORECASTER_FALLBACK_BUNDLE": str(tmp_path / "b"),
        "FORECASTER_API_TOKEN": "t0ken",
        "FORECASTER_MAX_PAYLOAD_BYTES": "2048",
        "FORECASTER_STATE_CACHE_SIZE": "10",
        "FORECASTER_BATCH_MAX_ROWS": "0",
        "FORECASTER_BATCH_MAX_WAIT_MS": "2.5",
        "FORECASTER_CUDA_MIN_ROWS": "16",
        "FORECASTER_INTRA_OP_THREADS": "0",
    }
    settings = ServingSettings.from_env(env)
    assert settings.source == "bundles"
    assert settings.max_payload_bytes == 2048
    assert (settings.batch_max_rows, settings.batch_max_wait_ms) == (0, 2.5)
    assert (settings.cuda_min_rows, settings.intra_op_threads) == (16, 0)
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "t0ken"
    assert ServingSettings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no model source"),
        (
            {"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_MODEL_NAME": "demo"},
            "not both",
        ),
        ({"FORECASTER_MODEL_NAME": "demo"}, "needs MLFLOW_TRACKING_URI"),
        (
            {"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_MAX_PAYLOAD_BYTES": "lots"},
            "FORECASTER_MAX_PAYLOAD_BYTES: 'lots'",
        ),
        (
            {"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_UNKNOWN_SERIES": "guess"},
            "FORECASTER_UNKNOWN_SERIES: 'guess'",
        ),
        ({"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_DEVICE": "tpu"}, "FORECASTER_DEVICE"),
        (
            {"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_BATCH_MAX_ROWS": "-1"},
            "FORECASTER_BATCH_MAX_ROWS: '-1'",
        ),
        (
            {"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_BATCH_MAX_WAIT_MS": "500"},
            "FORECASTER_BATCH_MAX_WAIT_MS: '500'",
        ),
    ],
    ids=["none", "both", "no_uri", "bad_int", "bad_policy", "bad_device", "rows", "wait"],
)
def test_bad_environment_is_a_config_error_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ServingSettings.from_env(env)


def test_an_empty_token_means_no_auth() -> None:
    env = {"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_API_TOKEN": ""}
    assert ServingSettings.from_env(env).api_token is None


def test_serving_defaults_batch_requests_and_use_one_ort_thread() -> None:
    settings = ServingSettings.from_env({"FORECASTER_CHAMPION_BUNDLE": "a"})
    assert settings.batch_max_rows == 64
    assert settings.batch_max_wait_ms == 1.0
    assert settings.intra_op_threads == 1


def test_a_limit_below_its_minimum_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FORECASTER_MAX_SERIES: '0'"):
        ServingSettings.from_env({"FORECASTER_CHAMPION_BUNDLE": "a", "FORECASTER_MAX_SERIES": "0"})


def _job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "plant", "output_dir": "out"}))
    return path


def test_a_config_serves_its_registered_model_from_the_embedded_store(tmp_path: Path) -> None:
    settings = settings_for_config(_job(tmp_path), environ={"FORECASTER_MAX_SERIES": "7"})
    assert settings.model_name == "plant"
    assert settings.tracking_uri == f"sqlite:///{(tmp_path / 'out' / 'mlruns.db').resolve()}"
    assert settings.download_dir == (tmp_path / "out" / "serving_models").resolve()
    assert settings.max_series == 7


def test_explicit_tracking_uri_beats_the_environment(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert settings_for_config(_job(tmp_path), environ=env).tracking_uri == "http://env:5000"
    chosen = settings_for_config(_job(tmp_path), tracking_uri="http://arg:5000", environ=env)
    assert chosen.tracking_uri == "http://arg:5000"


def test_bundles_replace_the_registry_and_at_most_two_are_taken(tmp_path: Path) -> None:
    env = {"FORECASTER_MODEL_NAME": "stale", "FORECASTER_API_TOKEN": "x"}
    settings = settings_for_config(_job(tmp_path), bundle=[tmp_path / "c"], environ=env)
    assert settings.source == "bundles"
    assert settings.champion_bundle == (tmp_path / "c").resolve()
    assert settings.fallback_bundle is None
    with pytest.raises(ConfigError, match="3 folders given"):
        settings_for_config(_job(tmp_path), bundle=[tmp_path] * 3, environ={})


def test_server_command_binds_loopback_by_default() -> None:
    command = server_command()
    assert command[-4:] == ["--host", "127.0.0.1", "--port", "3000"]
    assert "serving.service:Forecaster" in command
