"""A real `mlflow server` process on 127.0.0.1 for integration tests (importable because pytest's
pythonpath includes tests/); `tests/pipelines/conftest.py` turns it into the `server` fixture."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running `mlflow server`; `uri` waits until `/health` answers."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    ready: bool = False

    @property
    def uri(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.ready:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    self.ready = answer.status == 200
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"mlflow server not healthy in time: {self.log.read_text()[-2000:]}"
                    )
                time.sleep(0.25)
        return url


@contextmanager
def running_server(root: Path) -> Iterator[Server]:
    """`mlflow server` on a free port (sqlite backend, served artifacts under `root`), started
    now, healthy on first use of `uri`, its process group always stopped."""
    port = free_port()
    log = root / "server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(mlflow_cli),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    handle = Server(process=process, port=port, log=log)
    try:
        yield handle
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
