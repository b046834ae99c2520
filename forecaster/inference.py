"""Run exported forecasters with ONNX Runtime: numpy and onnxruntime only, no torch.

Serving and benchmarks open models only through this module. Two graph kinds exist (see
forecaster/export.py): `window` (`x [B, T, d] -> forecast [B, H]`) and `step`
(`x_new [B, k, d], state [B, S] -> forecast [B, H], state_out [B, S]`); the kind, horizon,
input and state sizes are read from the model's metadata.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from forecaster.errors import ModelError, ModelUnavailable, ServingError

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class StepResult:
    """Output of one step-graph call: `forecast [B, H]` and the new carried `state [B, S]`."""

    forecast: npt.NDArray[np.float32]
    state: npt.NDArray[np.float32]


def _cuda_driver_present() -> bool:
    """Whether a CUDA driver library loads (onnxruntime-gpu lists its CUDA provider without one)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def select_providers(device: Device = "auto") -> list[str]:
    """Execution providers for `device`: CUDA first only when it is usable, CPU always last.

    Raises:
        ModelError: unknown device, or `cuda` asked for where it is not available.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"device: {device!r} is not 'auto', 'cpu' or 'cuda'", field="device")
    available = ort.get_available_providers()
    cuda_usable = _CUDA in available and _cuda_driver_present()
    if device == "cuda" and not cuda_usable:
        raise ModelError(
            f"device: 'cuda' asked for but CUDA is not usable (providers: {', '.join(available)})",
            field="device",
        )
    if device != "cpu" and cuda_usable:
        return [_CUDA, _CPU]
    return [_CPU]


def open_session(
    path: str | Path,
    device: Device = "auto",
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """Open an exported model once: all graph optimisations, sequential execution.

    Args:
        path: the `.onnx` file written by `forecaster.export.export_onnx`.
        device: `auto` (CUDA when usable, else CPU), `cpu` or `cuda`.
        intra_op_threads: threads inside one operator; None lets ONNX Runtime choose.

    Raises:
        ModelUnavailable: the file is missing or not a loadable model.
        ModelError: bad device or thread count.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelUnavailable(f"model file {str(path)!r} does not exist", field="path")
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ModelError(
            f"intra_op_threads: {intra_op_threads!r} is not a positive integer",
            field="intra_op_threads",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    providers = select_providers(device)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelUnavailable(f"cannot load model {str(path)!r}: {exc}", field="path") from exc
    logger.debug("opened %s with %s", path, session.get_providers())
    return session


def model_metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The model's `metadata_props` (model, graph, lookback, horizon, input/state size, freq…)."""
    return dict(session.get_modelmeta().custom_metadata_map)


@dataclass(frozen=True)
class _SessionInfo:
    graph: str
    input_size: int
    state_size: int


# Read once per session: the metadata call costs more than a one-step forecast at batch 1.
_INFO: weakref.WeakKeyDictionary[ort.InferenceSession, _SessionInfo] = weakref.WeakKeyDictionary()


def _info(session: ort.InferenceSession) -> _SessionInfo:
    info = _INFO.get(session)
    if info is None:
        meta = model_metadata(session)
        sizes = {}
        for key in ("input_size", "state_size"):
            value = meta.get(key)
            if value is None or not value.isdigit():
                raise ModelError(f"model metadata {key!r}: {value!r} is missing or not an integer")
            sizes[key] = int(value)
        names = {node.name for node in session.get_inputs()}
        info = _SessionInfo(graph="step" if "state" in names else "window", **sizes)
        _INFO[session] = info
    return info


def _as_batch(array: Any, name: str, width: int, ndim: int) -> npt.NDArray[np.float32]:
    """Float32, C-contiguous copy of `array` checked for rank and last dimension."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    shape = "[B, T, d]" if ndim == 3 else "[B, S]"
    if values.ndim != ndim or values.shape[-1] != width or values.shape[0] < 1:
        raise ServingError(
            f"{name}: shape {values.shape} is not {shape} with last dimension {width}",
            field=name,
        )
    if ndim == 3 and values.shape[1] < 1:
        raise ServingError(f"{name}: needs at least one time step, got shape {values.shape}")
    return values


def initial_state(session: ort.InferenceSession, batch_size: int) -> npt.NDArray[np.float32]:
    """The zero state `[batch_size, S]` a series starts from."""
    return np.zeros((batch_size, _info(session).state_size), dtype=np.float32)


def forecast_window(session: ort.InferenceSession, x: Any) -> npt.NDArray[np.float32]:
    """Forecast from whole windows: `x [B, T, d] -> [B, H]` (zero initial state).

    Works on both graph kinds: a step graph is fed the window with a zero state.

    Raises:
        ServingError: `x` has the wrong rank or feature count.
    """
    info = _info(session)
    values = _as_batch(x, "x", info.input_size, ndim=3)
    if info.graph == "step":
        state = np.zeros((values.shape[0], info.state_size), dtype=np.float32)
        return session.run(["forecast"], {"x_new": values, "state": state})[0]
    return session.run(["forecast"], {"x": values})[0]


def forecast_step(session: ort.InferenceSession, x_new: Any, state: Any) -> StepResult:
    """Advance carried states by the new points and forecast (step graph only).

    Args:
        session: a session on a `step` graph.
        x_new: new points `[B, k, d]`.
        state: the carried state `[B, S]` (`initial_state` for a new series).

    Raises:
        ModelError: the session holds a window graph.
        ServingError: wrong shapes, or batch sizes of `x_new` and `state` differ.
    """
    info = _info(session)
    if info.graph != "step":
        raise ModelError("forecast_step needs a step graph; this model is a window graph")
    values = _as_batch(x_new, "x_new", info.input_size, ndim=3)
    carried = _as_batch(state, "state", info.state_size, ndim=2)
    if carried.shape[0] != values.shape[0]:
        raise ServingError(
            f"state: batch {carried.shape[0]} does not match x_new's batch {values.shape[0]}",
            field="state",
        )
    forecast, new_state = session.run(
        ["forecast", "state_out"], {"x_new": values, "state": carried}
    )
    return StepResult(forecast=forecast, state=new_state)
