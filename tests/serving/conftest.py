"""Shared fixtures of the serving tests: tiny bundles trained once, real `bentoml serve` processes.

Every server is a real `bentoml serve serving.service:Forecaster` on 127.0.0.1 with a free port,
waited for on `/readyz` and killed (by its process id) when its fixture ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from forecaster.calibration import CALIBRATION_FILE, fit_calibration
from forecaster.config import Config, parse_config
from forecaster.inference import forecast_window, open_session
from forecaster.transform import (
    PreprocessingSpec,
    format_timestamp,
    future_timestamps,
    inverse_forecast,
    transform,
)
from serving.launch import server_command

LOOKBACK = 24
HORIZON = 6
START_TIMEOUT_S = 90.0


def tiny_config(output_dir: Path) -> Config:
    """Two synthetic hourly series, an MI-GRU of hidden size 8, one short epoch."""
    return parse_config(
        {
            "name": "serving_tiny",
            "output_dir": str(output_dir),
            "data": {
                "synthetic": {"n_series": 2, "length": 480, "seed": 1},
                "split": {"val_size": 72, "test_size": 72},
            },
            "window": {"lookback": LOOKBACK, "horizon": HORIZON},
            "preprocess": {"trend": "linear", "seasonality": "stl", "periods": [24]},
            "model": {"name": "mi_gru", "hidden_size": 8},
            "train": {"epochs": 1, "batch_size": 32, "max_windows": 64, "stride": 4},
        }
    )


@dataclass(frozen=True)
class Bundles:
    """Champion (feedback, calibrated) and fallback (BPTT, uncalibrated) bundles and the data."""

    config: Config
    champion: Path
    fallback: Path
    prepared: Any
    outcomes: dict[str, Any]
    history: dict[str, tuple[npt.NDArray[np.datetime64], npt.NDArray[np.float64]]]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """Train the two tiny bundles once per session: a calibrated champion, an uncalibrated
    fallback."""
    from pipelines.prepare import prepare
    from pipelines.train import run_training

    root = tmp_path_factory.mktemp("bundles")
    config = tiny_config(root / "out")
    prepared = prepare(config)
    outcomes = {
        method: run_training(config, method=method, prepared=prepared, resume=False)
        for method in ("feedback", "bptt")
    }
    champion, fallback = outcomes["feedback"].bundle, outcomes["bptt"].bundle
    if not (champion / CALIBRATION_FILE).is_file():
        rng = np.random.default_rng(0)
        residuals = {uid: rng.normal(size=(40, HORIZON)) for uid in prepared.spec.series}
        fit_calibration(residuals).save(champion / CALIBRATION_FILE)
    # The fallback serves uncalibrated: point forecasts with null bounds.
    (fallback / CALIBRATION_FILE).unlink(missing_ok=True)
    history = {
        str(uid): (frame["ds"].to_numpy(), frame["y"].to_numpy(np.float64))
        for uid, frame in prepared.data.frame.groupby("unique_id", sort=False)
    }
    return Bundles(
        config=config,
        champion=champion,
        fallback=fallback,
        prepared=prepared,
        outcomes=outcomes,
        history=history,
    )


def copy_bundles(bundles: Bundles, folder: Path) -> tuple[Path, Path]:
    """Private copies of both bundles (tests that break files must not touch the shared ones)."""
    champion = shutil.copytree(bundles.champion, folder / "champion")
    fallback = shutil.copytree(bundles.fallback, folder / "fallback")
    return Path(champion), Path(fallback)


def expected_forecast(
    bundle: Path,
    ds: npt.NDArray[np.datetime64],
    y: npt.NDArray[np.float64],
    unique_id: str,
    horizon: int = HORIZON,
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """The in-process answer, as pipelines/demo.py computes it: transform the whole history,
    forecast the last window with ONNX Runtime, invert for the next `horizon` timestamps."""
    spec = PreprocessingSpec.load(bundle / "preprocessing.json").for_series(unique_id)
    transformed = transform(spec, y, ds, series_id=unique_id)
    x = transformed.values[-LOOKBACK:].astype(np.float32)[None, :, None]
    z = forecast_window(open_session(bundle / "model.onnx", device="cpu"), x)[0]
    future = future_timestamps(spec, ds[-1], horizon)
    point = inverse_forecast(
        spec, z[:horizon].astype(np.float64), future, transformed.last_levels, series_id=unique_id
    )
    return [format_timestamp(t) for t in future], point


def nan_model(path: Path, *, always: bool) -> None:
    """A window graph `forecast = sqrt(x[:, -1] * ones(H))` (NaN when the last input is
    negative), or `sqrt(x[:, -1] * 0 - 1)` (NaN for every input), with the bundle's metadata."""
    ones = helper.make_tensor("ones", TensorProto.FLOAT, [1, 6], [1.0] * 6)
    last = helper.make_tensor("last", TensorProto.INT64, [], [-1])
    nodes = [
        helper.make_node("Gather", ["x", "last"], ["x_last"], axis=1),  # [B, 1]
        helper.make_node("Mul", ["x_last", "ones"], ["tiled"]),  # [B, H]
    ]
    if always:
        minus = helper.make_tensor("minus", TensorProto.FLOAT, [], [-1.0])
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
        nodes += [
            helper.make_node("Mul", ["tiled", "zero"], ["zeros"]),
            helper.make_node("Add", ["zeros", "minus"], ["negative"]),
            helper.make_node("Sqrt", ["negative"], ["forecast"]),
        ]
        initializers = [ones, last, minus, zero]
    else:
        nodes.append(helper.make_node("Sqrt", ["tiled"], ["forecast"]))
        initializers = [ones, last]
    graph = helper.make_graph(
        nodes,
        "nan_forecaster",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 1])],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["batch", 6])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"lookback": "24", "horizon": "6", "input_size": "1", "state_size": "8"}
    helper.set_model_props(model, {**meta, "graph": "window", "model": "nan"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A real `bentoml serve` process of the forecaster service."""

    def __init__(
        self, env: dict[str, str], workdir: Path, command: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server_{self.port}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
        clean.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, str(self.port)] if command else server_command("127.0.0.1", self.port),
                # Own BentoML home: servers sharing one wipe each other's Prometheus files.
                env={**clean, "BENTOML_HOME": str(workdir / f"bentoml_{self.port}"), **env},
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.client = httpx.Client(base_url=self.url, timeout=30.0)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/readyz").status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not up in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the server and its workers (its own process group, by id)."""
        self.client.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """`start_server(env, command=None)` starts a server (`command` gets the port appended);
    every server started is stopped at session end."""
    started: list[Server] = []
    workdir = tmp_path_factory.mktemp("servers")

    def start(env: dict[str, str], command: list[str] | None = None) -> Server:
        server = Server(env, workdir, command)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def bundle_env(champion: Path | None, fallback: Path | None, **extra: str) -> dict[str, str]:
    """Environment of a server on local bundles."""
    env = dict(extra)
    if champion is not None:
        env["FORECASTER_CHAMPION_BUNDLE"] = str(champion)
    if fallback is not None:
        env["FORECASTER_FALLBACK_BUNDLE"] = str(fallback)
    return env


@pytest.fixture(scope="session")
def server(bundles: Bundles, start_server: Callable[..., Server]) -> Server:
    """A healthy server on the shared bundles, for tests that change nothing on disk."""
    return start_server(
        bundle_env(bundles.champion, bundles.fallback, FORECASTER_MAX_PAYLOAD_BYTES="200000")
    )


def series_payload(
    bundles: Bundles, unique_id: str, points: int = 60, *, timestamps: bool = False
) -> dict[str, Any]:
    """One series' last `points` observations as a request item (start, or every timestamp)."""
    ds, y = bundles.history[unique_id]
    item: dict[str, Any] = {"unique_id": unique_id, "values": y[-points:].tolist()}
    if timestamps:
        item["timestamps"] = [format_timestamp(t) for t in ds[-points:]]
    else:
        item["start"] = format_timestamp(ds[-points])
    return item


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in `/metrics` text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="session")
def kit() -> ModuleType:
    """This module's helpers, for test modules (a conftest cannot be imported by name)."""
    return sys.modules[__name__]
