"""Train a tiny model to the end, or kill the process mid-run: the kill/resume test's worker.

Run as a script (`python _resume_worker.py --out F --checkpoint-dir D [--kill-after-steps N]
[--resume]`) or call `run(...)` in-process. Everything that decides the result (data, model, config,
seed, threads) is fixed here, so every invocation trains the same run.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from forecaster.config import FeedbackConfig, TrainConfig
from forecaster.models.registry import build
from forecaster.training.trainer import TrainResult, train
from forecaster.training.windows import ForkingWindows

LOOKBACK, HORIZON = 16, 4
CONFIG = TrainConfig(
    method="feedback",
    epochs=3,
    batch_size=16,
    lr=1e-2,
    patience=10,
    device="cpu",
    # d is re-estimated before epochs 1 and 3 only: a resume into epoch 2 needs the saved d.
    feedback=FeedbackConfig(refresh_every=2, estimate_batches=2),
)
STEPS_PER_EPOCH = 6  # ceil(96 windows / 16)


def _windows() -> tuple[ForkingWindows, ForkingWindows]:
    rng = np.random.default_rng(0)
    t = np.arange(160)
    values = np.sin(2 * np.pi * t / 12) + 0.1 * rng.normal(size=t.size)
    train = ForkingWindows([values[:115]], lookback=LOOKBACK, horizon=HORIZON)
    val = ForkingWindows([values], lookback=LOOKBACK, horizon=HORIZON, rows=slice(100, 160))
    return train, val


def run(checkpoint_dir: Path, *, resume: bool = False, kill_after_steps: int = 0) -> TrainResult:
    """Train the fixed run; with `kill_after_steps`, SIGKILL this process after that many steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handle: Any = None
    if kill_after_steps:
        steps = 0

        def kill_after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            nonlocal steps
            steps += 1
            if steps == kill_after_steps:
                os.kill(os.getpid(), signal.SIGKILL)

        handle = register_optimizer_step_post_hook(kill_after)
    try:
        train_windows, val_windows = _windows()
        torch.manual_seed(0)
        model = build("mi_gru", input_size=1, hidden_size=8, horizon=HORIZON)
        return train(
            model,
            train_windows,
            val_windows,
            CONFIG,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            seed=3,
        )
    finally:
        torch.set_num_threads(threads)
        if handle is not None:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kill-after-steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    result = run(args.checkpoint_dir, resume=args.resume, kill_after_steps=args.kill_after_steps)
    torch.save({"state": result.model.state_dict(), "history": result.history.to_dict()}, args.out)


if __name__ == "__main__":
    main()
