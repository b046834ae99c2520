"""Serving settings: where the models come from and the service's limits, read from the
environment in one place (STYLE.md §4).

`forecaster serve` (serving/launch.py) builds these from a job config and passes them to the
`bentoml serve` process as `FORECASTER_*` variables; a container sets the same variables itself.
Models come either from local bundle folders (`FORECASTER_CHAMPION_BUNDLE`,
`FORECASTER_FALLBACK_BUNDLE`) or from the MLflow registry (`FORECASTER_MODEL_NAME` with its
`champion` and `fallback` aliases at `MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from forecaster.errors import ConfigError

__all__ = ["ENV_NAMES", "ServingSettings"]

# Field name -> environment variable.
ENV_NAMES: dict[str, str] = {
    "champion_bundle": "FORECASTER_CHAMPION_BUNDLE",
    "fallback_bundle": "FORECASTER_FALLBACK_BUNDLE",
    "model_name": "FORECASTER_MODEL_NAME",
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "download_dir": "FORECASTER_DOWNLOAD_DIR",
    "device": "FORECASTER_DEVICE",
    "intra_op_threads": "FORECASTER_INTRA_OP_THREADS",
    "max_payload_bytes": "FORECASTER_MAX_PAYLOAD_BYTES",
    "max_series": "FORECASTER_MAX_SERIES",
    "unknown_series": "FORECASTER_UNKNOWN_SERIES",
    "api_token": "FORECASTER_API_TOKEN",
    "state_cache_size": "FORECASTER_STATE_CACHE_SIZE",
    "batch_max_rows": "FORECASTER_BATCH_MAX_ROWS",
    "batch_max_wait_ms": "FORECASTER_BATCH_MAX_WAIT_MS",
    "cuda_min_rows": "FORECASTER_CUDA_MIN_ROWS",
}


class ServingSettings(BaseModel):
    """What the service loads and the limits it enforces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    champion_bundle: Path | None = Field(None, description="local bundle folder of the champion")
    fallback_bundle: Path | None = Field(None, description="local bundle folder of the fallback")
    model_name: str | None = Field(None, description="registered model (aliases champion/fallback)")
    tracking_uri: str | None = Field(None, description="MLflow tracking and registry URI")
    download_dir: Path | None = Field(None, description="where registry models are downloaded")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(
        1,
        ge=0,
        description="threads inside one ONNX Runtime call (0: ORT's choice, one per core, whose "
        "spinning threads cost about twice the CPU of one thread under concurrent requests)",
    )
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    max_series: int = Field(1024, ge=1, description="series per request")
    unknown_series: Literal["reject", "window_scaling"] = Field(
        "reject",
        description="a series without fitted preprocessing: refuse it (422) or scale it by its "
        "own window's mean and standard deviation",
    )
    api_token: SecretStr | None = Field(None, description="bearer token required when set")
    state_cache_size: int = Field(
        0,
        ge=0,
        description="series whose recurrent state is carried between requests (0: none; each "
        "request then recomputes its whole window)",
    )
    batch_max_rows: int = Field(
        64,
        ge=0,
        description="most series that concurrent requests share in one ONNX Runtime call "
        "(0: no cross-request batching); a request with as many series or more runs alone",
    )
    batch_max_wait_ms: float = Field(
        1.0,
        ge=0,
        le=100,
        description="how long a shared call waits for requests still being prepared (it never "
        "waits when none is)",
    )
    cuda_min_rows: int = Field(
        64,
        ge=0,
        description="on CUDA, calls of fewer series run on a CPU session of the same model "
        "(CUDA is slower for small batches); 0: every call on CUDA",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ServingSettings:
        bundles = self.champion_bundle is not None or self.fallback_bundle is not None
        if bundles and self.model_name is not None:
            raise ValueError(
                "give local bundles or a registered model name, not both "
                f"({ENV_NAMES['champion_bundle']}/{ENV_NAMES['fallback_bundle']} vs "
                f"{ENV_NAMES['model_name']})"
            )
        if not bundles and self.model_name is None:
            raise ValueError(
                f"no model source: set {ENV_NAMES['champion_bundle']} (and optionally "
                f"{ENV_NAMES['fallback_bundle']}) or {ENV_NAMES['model_name']}"
            )
        if self.model_name is not None and not self.tracking_uri:
            raise ValueError(
                f"{ENV_NAMES['model_name']} needs {ENV_NAMES['tracking_uri']} (the registry's URI)"
            )
        return self

    @property
    def source(self) -> Literal["bundles", "registry"]:
        """Where models come from."""
        return "registry" if self.model_name is not None else "bundles"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """Read the `FORECASTER_*` variables (and `MLFLOW_TRACKING_URI`).

        Raises:
            ConfigError: a variable is invalid or no model source is set; names the variable.
        """
        env = os.environ if environ is None else environ
        raw = {field: env[name] for field, name in ENV_NAMES.items() if env.get(name)}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else None
            where = ENV_NAMES.get(field, "serving settings") if field else "serving settings"
            shown = f" {err['input']!r}" if field and field != "api_token" else ""
            raise ConfigError(f"{where}:{shown} {err['msg']}", field=where) from None

    def to_env(self) -> dict[str, str]:
        """The variables that `from_env` reads back into these settings."""
        env: dict[str, str] = {}
        for field, name in ENV_NAMES.items():
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[name] = str(value)
        return env
