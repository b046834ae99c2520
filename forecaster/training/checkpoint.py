"""Training checkpoints: everything needed to continue a run exactly, written atomically.

One file per run directory (`checkpoint.pt`), replaced at the end of every epoch: model and
optimiser state, the plateau/early-stopping state, the RNG states (Python, numpy, torch, CUDA and
the trainer's shuffling generator), epoch and step counters, the history so far, the best weights,
the current feedback `d` and a hash of what the run was configured with. Written to a temp file in
the same folder and renamed (STYLE.md §12), so a crash leaves the previous checkpoint intact. Read
back with `torch.load(weights_only=True)`: the file holds tensors and plain Python values only.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from forecaster.errors import ConfigError
from forecaster.files import atomic_writer

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "RngState",
    "capture_rng_state",
    "checkpoint_path",
    "config_hash",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.pt"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RngState:
    """The global random states a training run consumes.

    Attributes:
        python: `random.getstate()`.
        numpy: `np.random.get_state(legacy=False)` with the key array as a list.
        torch: `torch.get_rng_state()` (uint8 tensor).
        cuda: `torch.cuda.get_rng_state_all()` where CUDA is initialised, else empty.
    """

    python: tuple[Any, ...]
    numpy: dict[str, Any]
    torch: Tensor
    cuda: tuple[Tensor, ...] = ()


def capture_rng_state() -> RngState:
    """The current Python, numpy, torch (and CUDA) random states."""
    legacy = np.random.get_state(legacy=False)
    numpy_state = {
        "bit_generator": legacy["bit_generator"],
        "state": {"key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"])},
        "has_gauss": int(legacy["has_gauss"]),
        "gauss": float(legacy["gauss"]),
    }
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
    return RngState(
        python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state(), cuda=cuda
    )


def restore_rng_state(state: RngState) -> None:
    """Set the global random states back to `state`."""
    random.setstate(state.python)
    numpy_state = dict(state.numpy)
    numpy_state["state"] = {
        "key": np.asarray(state.numpy["state"]["key"], dtype=np.uint32),
        "pos": state.numpy["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state.torch)
    if state.cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state.cuda))


@dataclass(frozen=True)
class Checkpoint:
    """The state of a training run at the end of an epoch.

    Attributes:
        epoch: epochs completed.
        step: optimiser steps taken.
        model_state: `model.state_dict()` (CPU tensors).
        optimizer_state: `optimizer.state_dict()`.
        plateau_state: the trainer's plateau / early-stopping counters (plain values).
        rng: global random states after the epoch.
        shuffle_state: `bit_generator.state` of the trainer's shuffling generator.
        history: the run's history so far, as plain values (`TrainHistory.to_dict()`); it
            carries the method in use, so a switch to BPTT by the model-side gate (with its
            reports and switch epoch) survives a resume.
        best_state: the weights with the best validation loss so far (CPU tensors).
        feedback_d: the fixed feedback in use `[S]`, or None.
        feedback_statistic: the statistic a closed-form feedback is re-evaluated from at every
            step (`FeedbackEstimate.statistic`, LMN), or None.
        config_hash: `config_hash(...)` of the run; resuming under another hash is refused.
        finished: the run ended (epochs done or stopped early); resuming returns at once.
    """

    epoch: int
    step: int
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    plateau_state: dict[str, Any]
    rng: RngState
    shuffle_state: dict[str, Any]
    history: dict[str, Any]
    best_state: dict[str, Tensor] | None
    feedback_d: Tensor | None
    config_hash: str
    finished: bool = False
    feedback_statistic: Tensor | None = None


def checkpoint_path(directory: Path) -> Path:
    """Where a run directory keeps its checkpoint."""
    return Path(directory) / CHECKPOINT_FILE


def config_hash(parts: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable run settings (keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def save_checkpoint(checkpoint: Checkpoint, directory: Path) -> Path:
    """Write `checkpoint` to `directory/checkpoint.pt` atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory)
    payload: dict[str, Any] = {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}
    payload["rng"] = {
        "python": checkpoint.rng.python,
        "numpy": checkpoint.rng.numpy,
        "torch": checkpoint.rng.torch,
        "cuda": list(checkpoint.rng.cuda),
    }
    payload["version"] = _FORMAT_VERSION
    with atomic_writer(target, "wb") as handle:
        torch.save(payload, handle)
    return target


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in `directory`, or None when there is none.

    Raises:
        ConfigError: the file exists but cannot be read or has another format version.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise ConfigError(
            f"checkpoint {path} cannot be read: {exc}".splitlines()[0], field="resume"
        ) from exc
    version = payload.get("version") if isinstance(payload, dict) else None
    if version != _FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {path}: format version {version!r} is not {_FORMAT_VERSION}",
            field="resume",
        )
    rng = payload["rng"]
    return Checkpoint(
        epoch=int(payload["epoch"]),
        step=int(payload["step"]),
        model_state=payload["model_state"],
        optimizer_state=payload["optimizer_state"],
        plateau_state=payload["plateau_state"],
        rng=RngState(
            python=_as_tuple(rng["python"]),
            numpy=rng["numpy"],
            torch=rng["torch"],
            cuda=tuple(rng["cuda"]),
        ),
        shuffle_state=payload["shuffle_state"],
        history=payload["history"],
        best_state=payload["best_state"],
        feedback_d=payload["feedback_d"],
        feedback_statistic=payload.get("feedback_statistic"),
        config_hash=str(payload["config_hash"]),
        finished=bool(payload["finished"]),
    )


def _as_tuple(value: Any) -> Any:
    """`random.setstate` wants tuples all the way down; lists may come back from a file."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(item) for item in value)
    return value
