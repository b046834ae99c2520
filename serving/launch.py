"""Start `bentoml serve` for the forecaster service from a job config (`forecaster serve`).

Models come from the config's registered model (`name`) through its `champion` and `fallback`
aliases at the tracking URI (argument > `MLFLOW_TRACKING_URI` > the embedded
`sqlite:///<output_dir>/mlruns.db`), or, when `bundle` is given, from local bundle folders
(the first is the champion, the second the fallback).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from forecaster.bundle import embedded_tracking_uri
from forecaster.config import load_config
from forecaster.errors import ConfigError
from serving.settings import ENV_NAMES, ServingSettings

__all__ = ["SERVICE", "serve", "server_command", "settings_for_config"]

SERVICE = "serving.service:Forecaster"
_DOWNLOADS = "serving_models"


def settings_for_config(
    config_path: Path,
    *,
    bundle: list[Path] | None = None,
    tracking_uri: str | None = None,
    api_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServingSettings:
    """Serving settings for a job config; other `FORECASTER_*` variables (limits, token,
    device) are taken from `environ`, explicit arguments winning.

    Raises:
        ConfigError: the config is invalid, more than two bundles are given, or a variable is bad.
    """
    env = dict(os.environ if environ is None else environ)
    config = load_config(config_path)
    uri = tracking_uri or env.get(ENV_NAMES["tracking_uri"])
    # The config decides where models come from; leftover source variables must not mix in.
    for key in ("champion_bundle", "fallback_bundle", "model_name", "tracking_uri", "download_dir"):
        env.pop(ENV_NAMES[key], None)
    if api_token:
        env[ENV_NAMES["api_token"]] = api_token
    if bundle:
        if len(bundle) > 2:
            raise ConfigError(
                f"bundle: {len(bundle)} folders given; give the champion and optionally the "
                "fallback",
                field="bundle",
            )
        for key, folder in zip(("champion_bundle", "fallback_bundle"), bundle, strict=False):
            env[ENV_NAMES[key]] = str(Path(folder).resolve())
    else:
        output_dir = Path(config.output_dir).resolve()
        env[ENV_NAMES["model_name"]] = config.name
        env[ENV_NAMES["tracking_uri"]] = uri or embedded_tracking_uri(output_dir)
        env[ENV_NAMES["download_dir"]] = str(output_dir / _DOWNLOADS)
    return ServingSettings.from_env(env)


def server_command(host: str = "127.0.0.1", port: int = 3000) -> list[str]:
    """The `bentoml serve` command line for the service (this interpreter's environment)."""
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve(
    config_path: Path,
    host: str = "127.0.0.1",
    port: int = 3000,
    bundle: list[Path] | None = None,
    tracking_uri: str | None = None,
    api_token: str | None = None,
) -> int:
    """Run the service in the foreground until it exits or is interrupted; its exit code.

    SIGINT and SIGTERM are passed on to the server, which finishes requests in flight.

    Raises:
        ConfigError: see `settings_for_config`.
    """
    settings = settings_for_config(
        config_path, bundle=bundle, tracking_uri=tracking_uri, api_token=api_token
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("FORECASTER_")}
    env.update(settings.to_env())
    process = subprocess.Popen(server_command(host, port), env=env)

    def forward(signum: int, _: FrameType | None) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
