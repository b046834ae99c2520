"""Checkpoints: atomic writes, RNG round trips, foreign files refused, resume after SIGKILL."""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster.errors import ConfigError
from forecaster.training.checkpoint import (
    Checkpoint,
    capture_rng_state,
    checkpoint_path,
    config_hash,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

WORKER = Path(__file__).with_name("_resume_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[3]


def _worker_module():
    spec = importlib.util.spec_from_file_location("_resume_worker", WORKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpoint(epoch: int = 1) -> Checkpoint:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    shuffle = np.random.default_rng(5)
    shuffle.permutation(10)
    return Checkpoint(
        epoch=epoch,
        step=7,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        plateau_state={"best": 0.5, "bad_evals": 1},
        rng=capture_rng_state(),
        shuffle_state=shuffle.bit_generator.state,
        history={"epochs": [], "note": "x"},
        best_state=model.state_dict(),
        feedback_d=torch.full((4,), 0.9),
        config_hash="abc",
    )


def test_checkpoint_round_trips_every_field(tmp_path: Path) -> None:
    original = _checkpoint()
    save_checkpoint(original, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert (loaded.epoch, loaded.step, loaded.config_hash) == (1, 7, "abc")
    assert loaded.plateau_state == original.plateau_state
    assert loaded.shuffle_state == original.shuffle_state
    assert loaded.history == original.history
    for key, value in original.model_state.items():
        assert torch.equal(loaded.model_state[key], value)
    assert loaded.optimizer_state["param_groups"] == original.optimizer_state["param_groups"]
    assert torch.equal(
        loaded.optimizer_state["state"][0]["exp_avg"],
        original.optimizer_state["state"][0]["exp_avg"],
    )
    assert loaded.feedback_d is not None
    assert torch.equal(loaded.feedback_d, original.feedback_d)


def test_rng_state_round_trip_replays_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(_checkpoint(), tmp_path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    restore_rng_state(loaded.rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    save_checkpoint(_checkpoint(epoch=1), tmp_path)
    save_checkpoint(_checkpoint(epoch=2), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_path(tmp_path).name]
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.epoch == 2


def test_missing_checkpoint_is_none_and_a_truncated_one_is_refused(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(_checkpoint(), tmp_path)
    path = checkpoint_path(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="checkpoint .* cannot be read"):
        load_checkpoint(tmp_path)


def test_checkpoint_of_another_format_version_is_refused(tmp_path: Path) -> None:
    torch.save({"version": 99}, checkpoint_path(tmp_path))
    with pytest.raises(ConfigError, match="format version 99 is not 1"):
        load_checkpoint(tmp_path)


def test_config_hash_is_stable_and_sensitive() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_resume_after_sigkill_mid_epoch_reproduces_the_uninterrupted_weights(
    tmp_path: Path,
) -> None:
    worker = _worker_module()
    reference = worker.run(tmp_path / "uninterrupted")
    killed_dir = tmp_path / "killed"
    command = [sys.executable, str(WORKER), "--checkpoint-dir", str(killed_dir)]
    # Halfway through epoch 2: epoch 1's checkpoint exists, epoch 2's steps are lost.
    kill_at = worker.STEPS_PER_EPOCH + worker.STEPS_PER_EPOCH // 2
    killed = subprocess.run(
        [*command, "--out", str(tmp_path / "never.pt"), "--kill-after-steps", str(kill_at)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "never.pt").exists()
    survivor = load_checkpoint(killed_dir)
    assert survivor is not None
    assert survivor.epoch == 1
    assert not survivor.finished

    resumed = subprocess.run(
        [*command, "--out", str(tmp_path / "resumed.pt"), "--resume"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    result = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(result["state"][key], value), key
    history = reference.history
    assert [r["train_loss"] for r in result["history"]["epochs"]] == history.train_losses
    assert [r["val_loss"] for r in result["history"]["epochs"]] == history.val_losses
    assert len(history.epochs) == worker.CONFIG.epochs
    # The final checkpoint is marked finished and resuming it changes nothing.
    final = load_checkpoint(killed_dir)
    assert final is not None
    assert final.finished
    assert final.epoch == worker.CONFIG.epochs
    again = worker.run(killed_dir, resume=True)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    assert again.history.train_losses == history.train_losses
