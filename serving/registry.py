"""The one MLflow touch point of serving: resolve a registry alias and download its version.

A version is downloaded once into `<download_dir>/<name>/v<version>` (staged in a temporary
folder and renamed, so a folder that exists is complete) and reused on later (re)loads; when
another process sharing the folder (a second replica) renamed its download there first, that one
is used. Messages never show the tracking URI's credentials (`forecaster.redaction.redact`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from forecaster.bundle import MODEL_FILE, find_bundle
from forecaster.errors import ModelUnavailable
from forecaster.files import staging_dir
from forecaster.redaction import redact

logger = logging.getLogger(__name__)

__all__ = ["RegisteredModel", "fetch_alias"]


@dataclass(frozen=True)
class RegisteredModel:
    """A downloaded registered version: the folder holding `model.onnx`, and where it came from."""

    name: str
    alias: str
    version: str
    folder: Path

    @property
    def uri(self) -> str:
        """The registry URI of this version."""
        return f"models:/{self.name}/{self.version}"


def fetch_alias(tracking_uri: str, name: str, alias: str, download_dir: Path) -> RegisteredModel:
    """Resolve `models:/<name>@<alias>` and download that version unless already present.

    Raises:
        ModelUnavailable: the registry is unreachable, the alias is not set, or the download
            holds no `model.onnx`; the message names the URI (credentials redacted) and the
            alias.
    """
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    where = f"models:/{name}@{alias} at {redact(tracking_uri, tracking_uri)}"
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        version = str(client.get_model_version_by_alias(name, alias).version)
        target = download_dir / name / f"v{version}"
        if not target.is_dir():
            artifact_uri = client.get_model_version_download_uri(name, version)
            staging = staging_dir(target)
            try:
                download_artifacts(
                    artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=tracking_uri
                )
                _install(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except Exception as exc:  # MLflow, HTTP and file errors alike: this alias cannot be served
        text = redact(str(getattr(exc, "message", exc)).strip(), tracking_uri)
        first = (text.splitlines() or [type(exc).__name__])[0]
        raise ModelUnavailable(f"{where}: {first[:300]}", field=alias) from exc
    folder = find_bundle(target)
    if folder is None:
        raise ModelUnavailable(f"{where}: version {version} holds no {MODEL_FILE}", field=alias)
    return RegisteredModel(name=name, alias=alias, version=version, folder=folder)


def _install(staging: Path, target: Path) -> None:
    """Rename the finished download `staging` to `target`. When another process renamed its
    download of the same version to `target` meanwhile (rename refuses a non-empty folder), that
    one is kept, complete as every renamed folder is, and `staging` is removed."""
    try:
        staging.replace(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("%s was downloaded by another process meanwhile; using it", target)
        return
    logger.info("downloaded %s", target)
