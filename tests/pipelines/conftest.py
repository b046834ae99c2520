"""Fixtures shared by the tracking and retrain tests: one real `mlflow server` per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mlflow_server import Server, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mlflow server` on a free port, started now, healthy on first use, always stopped."""
    with running_server(tmp_path_factory.mktemp("mlflow_server")) as handle:
        yield handle
