"""One rank of a data-parallel training run, for test_distributed.py.

Run as `torchrun --nproc-per-node N ddp_worker.py OUT METHOD[:MODEL] EPOCHS [--resume]` (or with
plain `python` for the single-process reference): trains a small MI-GRU (or MODEL, e.g. `lmn`,
whose feedback follows the weights every step) on fixed synthetic windows with
the trainer's own process-group handling and writes, from rank 0, the step-1 gradients, the final
weights and the history to OUT; each rank checkpoints into OUT/ckpt_rank<r> (only rank 0 may).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from forecaster.config import LossConfig, TrainConfig
from forecaster.models.registry import build
from forecaster.training import distributed
from forecaster.training.trainer import train
from forecaster.training.windows import ForkingWindows

LOOKBACK, HORIZON, BATCH = 24, 4, 16


class _FirstGradients:
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_epoch_end(self, record: object, history: object) -> None:
        pass

    def on_train_end(self, history: object) -> None:
        pass

    def on_step_end(self, step: int, model: torch.nn.Module) -> None:
        if step == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def windows() -> tuple[ForkingWindows, ForkingWindows]:
    rng = np.random.default_rng(7)
    series = [
        np.sin(2 * np.pi * np.arange(160) / p) + 0.1 * rng.normal(size=160) for p in (8, 12, 16)
    ]
    train_w = ForkingWindows(series, lookback=LOOKBACK, horizon=HORIZON, rows=slice(0, 120))
    val_w = ForkingWindows(series, lookback=LOOKBACK, horizon=HORIZON, rows=slice(96, 160))
    return train_w, val_w


def main(out: Path, method: str, epochs: int, resume: bool) -> None:
    torch.set_num_threads(1)
    group = distributed.init_from_env("cpu")
    try:
        torch.manual_seed(100 + group.rank)  # different initial weights: rank 0's must win
        method, _, name = method.partition(":")
        model = build(name or "mi_gru", input_size=1, hidden_size=8, horizon=HORIZON)
        config = TrainConfig(
            method=method,
            epochs=epochs,
            batch_size=BATCH,
            lr=5e-3,
            clip_norm=1e9,  # the recorded gradient is the unclipped average
            patience=10,
            max_windows=4 * BATCH,  # whole global batches: no padded last batch
            device="cpu",
            loss=LossConfig(eta=0.0, burn_in=4),
        )
        probe = _FirstGradients()
        train_w, val_w = windows()
        result = train(
            model,
            train_w,
            val_w,
            config,
            callbacks=[probe],
            checkpoint_dir=out / f"ckpt_rank{group.rank}",
            resume=resume,
            seed=3,
        )
        if group.is_main:
            torch.save(
                {"grads": probe.grads, "state": result.model.state_dict()},
                out / "result.pt",
            )
            (out / "history.json").write_text(json.dumps(result.history.to_dict()))
    finally:
        distributed.shutdown()
    distributed.end_process()  # as `forecaster train` ends a data-parallel rank


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), "--resume" in sys.argv[4:])
