"""Data-parallel training under `torchrun` (gloo, 2 CPU processes) equals one process.

Real `torchrun --nproc-per-node 2` launches of `ddp_worker.py` and of `forecaster train`: the
step-1 gradient averaged over the ranks equals the single-process gradient of the same global
batch, the weights after two epochs agree, only rank 0 checkpoints and writes, and a resumed run
ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster.errors import ConfigError
from forecaster.models.registry import build
from forecaster.training import distributed
from forecaster.training.trainer import train

HERE = Path(__file__).parent
WORKER = HERE / "ddp_worker.py"
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402

# torchrun's own start-up plus two torch imports on a busy 2-core machine.
_TIMEOUT = 300


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=_TIMEOUT, env=_env(), cwd=cwd
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _single(out: Path, method: str, epochs: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), method, str(epochs)],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["feedback", "bptt", "feedback:lmn"])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path: Path, method: str) -> None:
    parallel, single = tmp_path / "ddp", tmp_path / "single"
    parallel.mkdir()
    single.mkdir()
    _torchrun(str(WORKER), str(parallel), method, "2")
    _single(single, method, 2)

    ddp_result = torch.load(parallel / "result.pt")
    one_result = torch.load(single / "result.pt")
    assert ddp_result["grads"], "the step-1 probe saw no gradient"
    assert _max_difference(ddp_result["grads"], one_result["grads"]) <= 1e-6
    # Same batches, same averaged gradients: the weights after 2 epochs agree too.
    assert _max_difference(ddp_result["state"], one_result["state"]) <= 1e-5

    history = json.loads((parallel / "history.json").read_text())
    reference = json.loads((single / "history.json").read_text())
    assert history["world_size"] == 2
    assert reference["world_size"] == 1
    assert history["method"] == method.partition(":")[0]
    assert len(history["epochs"]) == 2
    # Each rank ran half of every global batch: the same number of steps as one process.
    assert [e["steps"] for e in history["epochs"]] == [e["steps"] for e in reference["epochs"]]
    assert history["best_val_loss"] == pytest.approx(reference["best_val_loss"], rel=1e-5)
    # Only rank 0 checkpoints.
    assert (parallel / "ckpt_rank0" / "checkpoint.pt").is_file()
    assert not (parallel / "ckpt_rank1").exists()


@pytest.mark.integration
def test_resumed_parallel_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    parallel, single = tmp_path / "ddp", tmp_path / "single"
    parallel.mkdir()
    single.mkdir()
    _torchrun(str(WORKER), str(parallel), "feedback", "1")
    first = json.loads((parallel / "history.json").read_text())
    assert len(first["epochs"]) == 1
    # The second launch reads rank 0's checkpoint (rank 1's folder is empty) and broadcasts it.
    _torchrun(str(WORKER), str(parallel), "feedback", "2", "--resume")
    _single(single, "feedback", 2)
    resumed = torch.load(parallel / "result.pt")
    uninterrupted = torch.load(single / "result.pt")
    assert _max_difference(resumed["state"], uninterrupted["state"]) <= 1e-5
    history = json.loads((parallel / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]


@pytest.mark.integration
def test_forecaster_train_runs_under_torchrun(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "name: tiny\noutput_dir: out\n"
        "data:\n  synthetic: {n_series: 2, length: 720, seed: 1}\n"
        "  split: {val_size: 72, test_size: 72}\n"
        "window: {lookback: 24, horizon: 6}\n"
        "preprocess: {trend: linear, seasonality: stl, periods: [24]}\n"
        "model: {name: mi_gru, hidden_size: 8}\n"
        "train: {epochs: 2, batch_size: 64, stride: 2, device: cpu}\n"
    )
    proc = _torchrun("-m", "forecaster", "train", "--config", str(config), cwd=tmp_path)
    # Rank 0 alone reports and writes the bundle.
    assert proc.stdout.count("on 2 processes") == 1, proc.stdout
    bundle = tmp_path / "out" / "bundle_feedback"
    assert (bundle / "model.onnx").is_file()
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["history"]["world_size"] == 2
    assert list((tmp_path / "out").glob("bundle_*")) == [bundle]


# ---- in one process -----------------------------------------------------------------------


def test_shard_is_distributed_sampler_and_rebuilds_the_global_batches() -> None:
    order = np.random.default_rng(0).permutation(37).astype(np.int64)
    world, global_batch = 4, 8
    shares = [
        distributed.shard(order, distributed.Distributed(rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(s) for s in shares}) == 1  # same number of steps on every rank
    local = global_batch // world
    padded = np.concatenate([order, order[: len(shares[0]) * world - len(order)]])
    for step in range(len(shares[0]) // local):
        union = np.concatenate([s[step * local : (step + 1) * local] for s in shares])
        expected = padded[step * global_batch : (step + 1) * global_batch]
        assert sorted(union) == sorted(expected)
    alone = distributed.shard(order, distributed.Distributed())
    assert alone is order


def test_global_batch_must_split_evenly_over_the_processes() -> None:
    train_w, val_w = ddp_worker.windows()
    model = build("gru", input_size=1, hidden_size=4, horizon=ddp_worker.HORIZON)
    from forecaster.config import TrainConfig

    config = TrainConfig(method="bptt", epochs=1, batch_size=16, device="cpu")
    with pytest.raises(ConfigError, match="batch_size: 16.*3 training processes"):
        train(model, train_w, val_w, config, group=distributed.Distributed(rank=0, world_size=3))


def test_without_a_launcher_training_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched_by_torchrun()
    group = distributed.init_from_env("cpu")
    assert group == distributed.Distributed()
    assert group.is_main
    assert not group.enabled


def test_end_process_is_a_no_op_outside_a_data_parallel_run() -> None:
    distributed.shutdown()  # no group: nothing to leave
    distributed.end_process(3)  # would exit with 3 after leaving a group
    assert not distributed._left_group
