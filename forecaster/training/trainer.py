"""The training loop: optimiser, schedule, clipping, validation, early stop, checkpoints, events.

One loop for every method (`feedback`, `bptt`, `tbptt`); the gradients come from
`forecaster.training.gradients.compute_gradients` and the fixed feedback from
`forecaster.training.feedback.estimate_feedback` (ALGORITHMS.md §5.2-5.3). Validation is the
forecasting metric, unweighted: the MSE of the last-step forecast `[B, H]` over every validation
window (ALGORITHMS.md §4.2 "Reporting"). A plateau (an evaluation that does not improve on the
best) multiplies the learning rate by `lr_decay`; `patience` of them in a row stop the run, and
the best weights are restored. Every evaluation counts: the one before training, the one at each
epoch end and, with `eval_every > 0`, one every `eval_every` optimiser steps. Feedback training
is guarded by the model-side gate (`forecaster.training.gate`, ALGORITHMS.md §5.5 checks 2-4):
before the first epoch (a failure trains with BPTT instead) and every `feedback.recheck_every`
epochs (repeated failures switch to BPTT from the current weights); the reports, the method in
use and the switch epoch are in the history and its checkpoint. Subscribers (the
MLflow tracker) receive `on_epoch_end` and `on_train_end` events; the loop logs one INFO line per
epoch. Under a process group (`torchrun`, Ray Train; `forecaster.training.distributed`) the same
loop trains data-parallel: each rank takes its share of every global batch, gradients are averaged
over the ranks before clipping, validation is split over the ranks and summed, and only rank 0
checkpoints, logs and calls the subscribers. On CPU the run keeps freed memory in the process heap
(`forecaster.training.heap`): every step re-allocates the same large blocks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from forecaster.config import TrainConfig
from forecaster.errors import ConfigError, DataError, ModelError
from forecaster.losses import ForecastLoss
from forecaster.models.base import RecurrentForecaster
from forecaster.training import distributed as ddp
from forecaster.training.checkpoint import (
    Checkpoint,
    capture_rng_state,
    config_hash,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from forecaster.training.feedback import (
    Feedback,
    FeedbackEstimate,
    LossFn,
    PerStepDiagonal,
    estimate_feedback,
    feedback_at_parameters,
    spectral_radius,
)
from forecaster.training.gate import ModelGateReport, gate_batches, run_model_gate
from forecaster.training.gradients import compute_gradients
from forecaster.training.heap import training_heap
from forecaster.training.windows import ForkingWindows, WindowBatch

__all__ = [
    "EpochRecord",
    "EvalRecord",
    "LossFn",
    "TrainCallback",
    "TrainHistory",
    "TrainResult",
    "evaluate_mse",
    "resolve_device",
    "train",
]

logger = logging.getLogger(__name__)

Method = Literal["feedback", "bptt", "tbptt"]
# Validation needs no graph, so it can take bigger batches than training.
_MIN_EVAL_BATCH = 256


@dataclass(frozen=True)
class EvalRecord:
    """One validation pass.

    Attributes:
        epoch: the epoch it ran in (1-based; 0 is the pass before training).
        step: optimiser steps taken when it ran.
        val_loss: unweighted MSE of the last-step forecasts over all validation windows.
        lr: learning rate after the pass (a plateau decays it).
        improved: whether it beat the best loss so far.
    """

    epoch: int
    step: int
    val_loss: float
    lr: float
    improved: bool


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did.

    Attributes:
        epoch: 1-based epoch number.
        step: optimiser steps taken after the epoch (all epochs).
        steps: optimiser steps in this epoch.
        train_loss: mean training loss (the configured, weighted loss) over the epoch's steps.
        val_loss: the epoch's last validation loss (unweighted MSE, last-step forecasts).
        best_val_loss: the best validation loss so far.
        lr: learning rate of the epoch's first step.
        seconds: wall time of the epoch (feedback estimate, steps and validation).
        train_seconds: wall time of the optimiser steps only.
        peak_memory_mb: CPU: the process' peak resident set size so far (`ru_maxrss`);
            CUDA: peak allocated device memory during the epoch.
        method: the method that produced the gradients (`feedback`, `bptt`, `tbptt`).
        spectral_radius: max |d_u| of the feedback in use (feedback only).
        unclipped_spectral_radius: the estimate's radius before clipping to `rho_max`.
        feedback_seconds: time spent estimating `d` this epoch (None when not re-estimated).
        gate_seconds: time spent in the model-side gate before this epoch (None: it did not run).
    """

    epoch: int
    step: int
    steps: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    lr: float
    seconds: float
    train_seconds: float
    peak_memory_mb: float
    method: str
    spectral_radius: float | None = None
    unclipped_spectral_radius: float | None = None
    feedback_seconds: float | None = None
    gate_seconds: float | None = None


@dataclass(frozen=True)
class TrainHistory:
    """The structured record of a training run.

    Attributes:
        epochs: one record per completed epoch.
        evaluations: every validation pass, the one before training included (epoch 0).
        requested_method: the method the user asked for (`train`'s `requested_method`, else
            `config.method`).
        method: the method in use at the end (BPTT when the model does not support feedback or
            the model-side gate failed; each epoch's own is in `epochs`).
        method_reason: why that method was used (the caller's reason, then any switch).
        model_gate: every run of the model-side gate (ALGORITHMS.md §5.5 checks 2-4): before
            the first feedback epoch, then every `feedback.recheck_every` epochs.
        switch_epoch: the first epoch trained with BPTT after the rechecks failed
            `feedback.recheck_failures` times in a row (warm start from the weights of the
            epoch before); None when feedback training was never switched mid-run.
        best_epoch: the epoch whose weights were kept (0: the initial weights were best).
        best_step: optimiser steps at the best evaluation.
        best_val_loss: the best validation loss.
        stopped_early: whether `patience` plateaus in a row ended the run.
        total_seconds: wall time of the run (summed over resumed sessions).
        device: where it trained (`cpu`, `cuda:0`; rank 0's device in a data-parallel run).
        world_size: processes that trained it data-parallel (1: a single process).
        memory_measure: what `peak_memory_mb` means: `cpu_max_rss` or `cuda_max_allocated`.
    """

    epochs: tuple[EpochRecord, ...] = ()
    evaluations: tuple[EvalRecord, ...] = ()
    requested_method: str = "feedback"
    method: str = "feedback"
    method_reason: str = ""
    model_gate: tuple[ModelGateReport, ...] = ()
    switch_epoch: int | None = None
    best_epoch: int = 0
    best_step: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False
    total_seconds: float = 0.0
    device: str = "cpu"
    world_size: int = 1
    memory_measure: str = "cpu_max_rss"

    @property
    def train_losses(self) -> list[float]:
        """Per-epoch mean training losses."""
        return [record.train_loss for record in self.epochs]

    @property
    def val_losses(self) -> list[float]:
        """Per-epoch validation losses."""
        return [record.val_loss for record in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and checkpoint-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainHistory:
        """Inverse of `to_dict`."""
        values = dict(data)
        values["epochs"] = tuple(EpochRecord(**record) for record in values["epochs"])
        values["evaluations"] = tuple(EvalRecord(**record) for record in values["evaluations"])
        values["model_gate"] = tuple(
            ModelGateReport.from_dict(report) for report in values.get("model_gate", ())
        )
        return cls(**values)


@dataclass(frozen=True)
class TrainResult:
    """The trained model (best weights restored, in place) and how it got there.

    Attributes:
        model: the model passed to `train`, now holding the best weights, on `device`.
        history: the run's history.
        feedback: the last feedback estimate (feedback training only).
        device: where the model is.
    """

    model: RecurrentForecaster
    history: TrainHistory
    feedback: FeedbackEstimate | None
    device: torch.device

    @property
    def best_val_loss(self) -> float:
        """The validation loss of the returned weights."""
        return self.history.best_val_loss


@runtime_checkable
class TrainCallback(Protocol):
    """Subscriber to training events (the MLflow tracker, a test probe).

    A subscriber may also define `on_step_end(step: int, model)`, called after every optimiser
    step while `.grad` still holds that step's gradient (averaged over the ranks, clipped).
    """

    def on_epoch_end(self, record: EpochRecord, history: TrainHistory) -> None:
        """After each epoch's validation and checkpoint; `history` includes `record`."""

    def on_train_end(self, history: TrainHistory) -> None:
        """Once, after the best weights are restored."""


@dataclass
class _Plateau:
    """Best validation loss and the plateaus since it (mutable loop state)."""

    best: float = math.inf
    bad_evals: int = 0

    def update(self, val_loss: float) -> bool:
        if val_loss < self.best:
            self.best = val_loss
            self.bad_evals = 0
            return True
        self.bad_evals += 1
        return False


def resolve_device(device: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """`auto`: CUDA when available, else CPU.

    Raises:
        ConfigError: `cuda` was asked for and no GPU is available.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config.train.device: 'cuda' but CUDA is not available (use 'auto' or 'cpu')",
            field="device",
        )
    if device not in ("auto", "cuda"):
        raise ConfigError(
            f"config.train.device: {device!r} is not one of auto, cpu, cuda", field="device"
        )
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate_mse(
    model: RecurrentForecaster,
    windows: ForkingWindows,
    *,
    batch_size: int = 256,
    group: ddp.Distributed | None = None,
) -> float:
    """Unweighted MSE of the last-step forecasts `[N, H]` over every window (none dropped).

    The model is evaluated in eval mode on its own device and dtype, then put back in the mode
    it was in. In a process group (`group`) each rank scores every N-th window and the sums are
    added over the ranks, so every rank returns the same loss over all windows.
    """
    group = group or ddp.Distributed()
    reference = next(model.parameters())
    windows = windows.to(reference.device)
    positions = np.arange(group.rank, len(windows), group.world_size, dtype=np.int64)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=reference.device)
    try:
        for batch in windows.iter_batches(batch_size, positions):
            pred = model.forecast(batch.x.to(reference.dtype))  # [B, H]
            error = pred.double() - batch.last_target.double()  # [B, H]
            total += (error * error).sum()
    finally:
        model.train(was_training)
    total = ddp.sum_over_ranks(total, group)
    return float(total) / (len(windows) * windows.horizon)


def train(
    model: RecurrentForecaster,
    train_windows: ForkingWindows,
    val_windows: ForkingWindows,
    config: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[TrainCallback] = (),
    progress: bool = False,
    seed: int = 0,
    method_reason: str | None = None,
    requested_method: str | None = None,
    group: ddp.Distributed | None = None,
) -> TrainResult:
    """Train `model` in place on forking-sequence windows and return it with its history.

    Args:
        model: a registry model (`forward [B, T, 1] -> [B, T, H]`); trained in place.
        train_windows: training windows (`lookback` = `T`, `horizon` = the model's `H`).
        val_windows: validation windows, every one used each evaluation.
        config: `train` section of the config (method, optimiser, schedule, device, ...).
        loss_fn: the training loss `(pred, target, mask) -> scalar`; default
            `ForecastLoss.from_config(config.loss, T, H)`.
        checkpoint_dir: where `checkpoint.pt` is written after every epoch; None: no checkpoints.
        resume: continue from the checkpoint in `checkpoint_dir` when there is one.
        callbacks: subscribers to `on_epoch_end` / `on_train_end`.
        progress: show a rich progress bar (for interactive callers; off in library use).
        seed: drives Python, numpy and torch randomness and the window shuffling.
        method_reason: why the caller chose `config.method` (e.g. the stationarity gate's
            reason); recorded in the history.
        requested_method: the method the user asked for, when the caller replaced it in
            `config.method` (the stationarity gate chose BPTT); default `config.method`.
        group: the process group to train data-parallel in; default `distributed.current()`
            (whatever torchrun, Ray Train or the caller initialised; one process when none).
            Every rank calls `train` with the same arguments; `config.batch_size` is the
            global batch.

    Returns:
        `TrainResult` with the best weights restored in `model`.

    Raises:
        ConfigError: CUDA asked for but absent, `resume` without `checkpoint_dir`, a
            checkpoint written under other settings, or a global batch size that the world
            size does not divide.
        DataError: windows that do not match each other or the model.
        ModelError: the training loss became non-finite.
    """
    _check_inputs(model, train_windows, val_windows)
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs a checkpoint_dir", field="resume")
    group = group or ddp.current()
    if config.batch_size % group.world_size != 0:
        raise ConfigError(
            f"config.train.batch_size: {config.batch_size} (the global batch) is not divisible "
            f"by the {group.world_size} training processes",
            field="batch_size",
        )
    device = resolve_device(config.device)
    if device.type == "cuda" and group.enabled:
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher's choice
    method, reason = _choose_method(config.method, model, method_reason)
    use_amp = _use_amp(config.amp, device)
    if loss_fn is None:
        loss_fn = ForecastLoss.from_config(
            config.loss, train_windows.lookback, train_windows.horizon
        )
    # CPU steps re-allocate the same large blocks: keep them in the heap (training_heap).
    heap: contextlib.AbstractContextManager[Any] = (
        training_heap() if device.type == "cpu" else contextlib.nullcontext()
    )
    with heap, _deterministic(config.deterministic, device):
        _seed_everything(seed)
        model = model.to(device)
        ddp.broadcast_parameters(model, group)
        run = _Run(
            model=model,
            train_windows=train_windows.to(device),
            val_windows=val_windows.to(device),
            config=config,
            loss_fn=loss_fn,
            device=device,
            method=method,
            use_amp=use_amp,
            shuffle_rng=np.random.default_rng(seed),
            history=TrainHistory(
                requested_method=requested_method or config.method,
                method=method,
                method_reason=reason,
                device=str(device),
                world_size=group.world_size,
                memory_measure="cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
            ),
            run_hash=(  # only checkpoints read it; it hashes every window value
                ""
                if checkpoint_dir is None
                else _run_hash(model, train_windows, val_windows, config, seed, method)
            ),
            checkpoint_dir=checkpoint_dir,
            callbacks=tuple(callbacks) if group.is_main else (),
            group=group,
        )
        return run.execute(resume=resume, progress=progress and group.is_main)


@dataclass
class _Run:
    """The mutable state of one training run; `execute` is the loop."""

    model: RecurrentForecaster
    train_windows: ForkingWindows
    val_windows: ForkingWindows
    config: TrainConfig
    loss_fn: LossFn
    device: torch.device
    method: Method
    use_amp: bool
    shuffle_rng: np.random.Generator
    history: TrainHistory
    run_hash: str
    checkpoint_dir: Path | None
    callbacks: tuple[TrainCallback, ...]
    group: ddp.Distributed = field(default_factory=ddp.Distributed)
    step_callbacks: tuple[Callable[[int, RecurrentForecaster], None], ...] = field(init=False)
    epoch: int = 0
    step: int = 0
    plateau: _Plateau = field(default_factory=_Plateau)
    best_state: dict[str, Tensor] | None = None
    d: Tensor | None = None
    estimate: FeedbackEstimate | None = None
    gate_data: list[WindowBatch] | None = None
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.step_callbacks = tuple(
            callback.on_step_end for callback in self.callbacks if hasattr(callback, "on_step_end")
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    # ---- the loop -----------------------------------------------------------------------

    def execute(self, *, resume: bool, progress: bool) -> TrainResult:
        started = time.perf_counter()
        seconds_before = 0.0
        finished = False
        if resume and self.checkpoint_dir is not None:
            checkpoint = ddp.broadcast_object(
                load_checkpoint(self.checkpoint_dir) if self.group.is_main else None, self.group
            )
            if checkpoint is None:
                logger.info("no checkpoint in %s; training from the start", self.checkpoint_dir)
            else:
                finished = self._restore(checkpoint)
                seconds_before = self.history.total_seconds
        if self.epoch == 0 and not self.history.evaluations:
            self._evaluate(epoch=0)
        with _progress_bar(progress, self._total_steps()) as advance:
            while not finished and self.epoch < self.config.epochs:
                stopped = self._run_epoch(advance)
                finished = stopped or self.epoch >= self.config.epochs
                self.history = replace(
                    self.history,
                    stopped_early=stopped,
                    total_seconds=seconds_before + time.perf_counter() - started,
                )
                self._save(finished)
                for callback in self.callbacks:
                    callback.on_epoch_end(self.history.epochs[-1], self.history)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.history = replace(
            self.history, total_seconds=seconds_before + time.perf_counter() - started
        )
        for callback in self.callbacks:
            callback.on_train_end(self.history)
        return TrainResult(
            model=self.model, history=self.history, feedback=self.estimate, device=self.device
        )

    def _run_epoch(self, advance: Callable[[Tensor], None]) -> bool:
        """One epoch; True when early stopping ended the run."""
        config = self.config
        epoch_start = time.perf_counter()
        self.epoch += 1
        _reset_peak_memory(self.device)
        order = self.train_windows.epoch_order(self.shuffle_rng, config.max_windows)
        feedback_seconds = self._refresh_feedback(order)
        gate_seconds = self._model_gate()
        share = ddp.shard(order, self.group)  # this rank's part of every global batch
        batch_size = config.batch_size // self.group.world_size
        lr = self.optimizer.param_groups[0]["lr"]
        dtype = next(self.model.parameters()).dtype
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        eval_seconds = 0.0
        stopped = False
        last_eval_step = -1
        n_batches = math.ceil(len(share) / batch_size)
        self.model.train()
        loop_start = time.perf_counter()
        for i, batch in enumerate(self.train_windows.iter_batches(batch_size, share)):
            loss = self._step(batch.x.to(dtype), batch.target.to(dtype), batch.mask)
            loss_sum += loss.double()
            steps += 1
            self.step += 1
            advance(loss)
            mid_epoch = config.eval_every > 0 and self.step % config.eval_every == 0
            if mid_epoch and i + 1 < n_batches:
                last_eval_step = self.step
                eval_start = time.perf_counter()
                stopped = self._evaluate(epoch=self.epoch)
                eval_seconds += time.perf_counter() - eval_start
                if stopped:
                    break
                self.model.train()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # Steps are timed as a whole after one synchronisation, not one by one (no GPU stalls).
        train_seconds = time.perf_counter() - loop_start - eval_seconds
        loss_sum = ddp.sum_over_ranks(loss_sum, self.group) / self.group.world_size
        train_loss = float(loss_sum) / max(steps, 1)
        if not math.isfinite(train_loss):
            raise ModelError(
                f"training diverged: mean loss {train_loss} in epoch {self.epoch} "
                f"(method {self.method}, lr {lr:g}); lower train.lr or train.clip_norm",
                field="lr",
            )
        if last_eval_step != self.step:
            stopped = self._evaluate(epoch=self.epoch)
        estimate = self.estimate
        record = EpochRecord(
            epoch=self.epoch,
            step=self.step,
            steps=steps,
            train_loss=train_loss,
            val_loss=self.history.evaluations[-1].val_loss,
            best_val_loss=self.plateau.best,
            lr=lr,
            seconds=time.perf_counter() - epoch_start,
            train_seconds=train_seconds,
            peak_memory_mb=_peak_memory_mb(self.device),
            method=self.method,
            spectral_radius=None if estimate is None else float(estimate.spectral_radius),
            unclipped_spectral_radius=(
                None if estimate is None else float(estimate.unclipped_spectral_radius)
            ),
            feedback_seconds=feedback_seconds,
            gate_seconds=gate_seconds,
        )
        self.history = replace(self.history, epochs=(*self.history.epochs, record))
        logger.log(
            logging.INFO if self.group.is_main else logging.DEBUG,
            "epoch %d/%d %s train %.5f val %.5f best %.5f lr %.2e %.1fs%s",
            self.epoch,
            config.epochs,
            self.method,
            train_loss,
            record.val_loss,
            self.plateau.best,
            lr,
            record.seconds,
            "" if record.spectral_radius is None else f" rho {record.spectral_radius:.3f}",
        )
        return stopped

    def _step(self, x: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        self._follow_weights()
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.use_amp, self.device):
            loss = compute_gradients(
                self.method,
                self.model,
                x,
                target,
                mask,
                self.loss_fn,
                d=self._feedback(),
                truncation=self.config.truncation,
                corrections=self.config.feedback.corrections,
            )
        ddp.average_gradients(self.model, self.group)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        self.optimizer.step()
        for callback in self.step_callbacks:
            callback(self.step + 1, self.model)
        return loss.detach()

    def _feedback(self) -> Feedback | None:
        """What the gradients use: the fixed `d`, or with `kind: per_step_diag` the per-step
        diagonal rule (`d` then holds the mean estimate, for the history and checkpoints)."""
        feedback = self.config.feedback
        if self.d is not None and feedback.kind == "per_step_diag":
            return PerStepDiagonal(feedback.rho_max)
        return self.d

    def _follow_weights(self) -> None:
        """Every `refresh_steps` steps, re-evaluate a closed-form feedback (LMN) at the current
        weights from the epoch estimate's statistic (`feedback_at_parameters`)."""
        every = self.config.feedback.refresh_steps
        estimate = self.estimate
        if (
            self.method != "feedback"
            or self.config.feedback.kind == "per_step_diag"  # the gradients do not read d
            or every == 0
            or estimate is None
            or estimate.statistic is None
            or self.step % every != 0
        ):
            return
        dtype = next(self.model.parameters()).dtype
        self.estimate = feedback_at_parameters(self.model, estimate, self.config.feedback.rho_max)
        self.d = self.estimate.d.to(device=self.device, dtype=dtype).contiguous()

    def _refresh_feedback(self, order: npt.NDArray[np.int64]) -> float | None:
        """Estimate `d` before the first epoch and every `refresh_every` epochs after it."""
        if self.method != "feedback":
            return None
        feedback = self.config.feedback
        if self.d is not None and (self.epoch - 1) % feedback.refresh_every != 0:
            return None
        size = self.config.batch_size
        dtype = next(self.model.parameters()).dtype
        n = min(feedback.estimate_batches, math.ceil(len(order) / size))
        batches = [
            self.train_windows.batch(order[i * size : (i + 1) * size]).x.to(dtype) for i in range(n)
        ]
        start = time.perf_counter()
        # Every rank estimates from the same (global) batches; rank 0's d is used by all, so
        # nondeterministic kernels cannot give the ranks different backward systems.
        estimate = estimate_feedback(self.model, batches, feedback)
        if estimate.statistic is not None:  # the ranks follow the weights from one statistic
            statistic = estimate.statistic.to(self.device).contiguous()
            estimate = replace(estimate, statistic=ddp.broadcast_tensor(statistic, self.group))
        self.estimate = estimate
        self.d = ddp.broadcast_tensor(
            estimate.d.to(device=self.device, dtype=dtype).contiguous(), self.group
        )
        logger.debug(
            "feedback %s: spectral radius %.4f (unclipped %.4f)",
            self.estimate.kind,
            self.estimate.spectral_radius,
            self.estimate.unclipped_spectral_radius,
        )
        return time.perf_counter() - start

    def _model_gate(self) -> float | None:
        """The model-side gate (ALGORITHMS.md §5.5 checks 2-4) before a feedback epoch.

        Before epoch 1 every check decides and a failure trains the whole run with BPTT; before
        every `recheck_every`-th epoch after it, gradient agreement alone decides, and
        `recheck_failures` failures in a row switch to BPTT from the current weights and
        optimiser state. The reports, the method and the switch epoch live in the history, so
        a resumed run continues with the method it had.
        """
        feedback = self.config.feedback
        in_use = self._feedback()
        if self.method != "feedback" or in_use is None or not feedback.gate:
            return None
        initial = self.epoch == 1
        if not initial and (
            feedback.recheck_every == 0 or (self.epoch - 1) % feedback.recheck_every != 0
        ):
            return None
        start = time.perf_counter()
        if self.gate_data is None:
            self.gate_data = gate_batches(
                self.val_windows, feedback.gate_batches, self.config.batch_size
            )
        report = run_model_gate(
            self.model,
            self.gate_data,
            self.loss_fn,
            feedback,
            in_use,
            stage="init" if initial else "recheck",
            epoch=self.epoch - 1,
            checks=("stability", "jacobian", "gradient") if initial else ("gradient",),
        )
        report = ddp.broadcast_object(report, self.group)  # one decision for every rank
        reports = (*self.history.model_gate, report)
        self.history = replace(self.history, model_gate=reports)
        logger.info("model gate before epoch %d: %s", self.epoch, report.reason)
        if initial and not report.passed:
            self._switch_to_bptt(
                f"model-side gate before training {report.reason}; trained with bptt"
            )
        elif not report.passed and _trailing_failures(reports) >= feedback.recheck_failures:
            self.history = replace(self.history, switch_epoch=self.epoch)
            self._switch_to_bptt(
                f"gradient agreement failed at {feedback.recheck_failures} rechecks in a row "
                f"(last: {report.reason}); switched to bptt from epoch {self.epoch} (warm start)"
            )
        return time.perf_counter() - start

    def _switch_to_bptt(self, why: str) -> None:
        logger.warning("%s", why)
        self.method = "bptt"
        self.d = None
        self.estimate = None
        reason = self.history.method_reason
        self.history = replace(
            self.history,
            method="bptt",
            method_reason=f"{reason}; {why}" if reason else why,
        )

    def _evaluate(self, *, epoch: int) -> bool:
        """Validate, update best weights and learning rate; True when patience is exhausted."""
        size = max(self.config.batch_size, _MIN_EVAL_BATCH)
        val_loss = evaluate_mse(self.model, self.val_windows, batch_size=size, group=self.group)
        improved = self.plateau.update(val_loss)
        if improved:
            self.best_state = _cpu_copy(self.model.state_dict())
            self.history = replace(
                self.history, best_epoch=epoch, best_step=self.step, best_val_loss=val_loss
            )
        elif epoch > 0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.config.lr_decay
        record = EvalRecord(
            epoch=epoch,
            step=self.step,
            val_loss=val_loss,
            lr=self.optimizer.param_groups[0]["lr"],
            improved=improved,
        )
        self.history = replace(self.history, evaluations=(*self.history.evaluations, record))
        return self.plateau.bad_evals >= self.config.patience

    # ---- checkpoints --------------------------------------------------------------------

    def _save(self, finished: bool) -> None:
        if self.checkpoint_dir is None or not self.group.is_main:
            return
        save_checkpoint(
            Checkpoint(
                epoch=self.epoch,
                step=self.step,
                model_state=_cpu_copy(self.model.state_dict()),
                optimizer_state=self.optimizer.state_dict(),
                plateau_state={"best": self.plateau.best, "bad_evals": self.plateau.bad_evals},
                rng=capture_rng_state(),
                shuffle_state=self.shuffle_rng.bit_generator.state,
                history=self.history.to_dict(),
                best_state=self.best_state,
                feedback_d=None if self.d is None else self.d.detach().cpu(),
                feedback_statistic=(
                    None
                    if self.estimate is None or self.estimate.statistic is None
                    else self.estimate.statistic.detach().cpu()
                ),
                config_hash=self.run_hash,
                finished=finished,
            ),
            self.checkpoint_dir,
        )

    def _restore(self, checkpoint: Checkpoint) -> bool:
        """Load a checkpoint; True when that run had already finished."""
        if checkpoint.config_hash != self.run_hash:
            raise ConfigError(
                f"checkpoint in {self.checkpoint_dir} was written by a run with other settings "
                f"(hash {checkpoint.config_hash}, this run {self.run_hash}: the train config "
                "other than epochs/device, the model or its hyper-parameters, the training or "
                "validation data, the seed or the method differ); start without resume "
                "(`forecaster train --fresh`) or use another directory",
                field="resume",
            )
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.plateau = _Plateau(**checkpoint.plateau_state)
        restore_rng_state(checkpoint.rng)
        self.shuffle_rng.bit_generator.state = checkpoint.shuffle_state
        saved = TrainHistory.from_dict(checkpoint.history)
        self.history = replace(
            saved,
            device=self.history.device,
            world_size=self.history.world_size,
            memory_measure=self.history.memory_measure,
        )
        if saved.method not in ("feedback", "bptt", "tbptt"):
            raise ConfigError(
                f"checkpoint in {self.checkpoint_dir}: method {saved.method!r} is not one of "
                "feedback, bptt, tbptt",
                field="resume",
            )
        self.method = saved.method  # type: ignore[assignment]  # a gate switch survives resume
        self.best_state = checkpoint.best_state
        dtype = next(self.model.parameters()).dtype
        self.d = (
            None
            if checkpoint.feedback_d is None
            else checkpoint.feedback_d.to(device=self.device, dtype=dtype)
        )
        if self.d is not None:
            # The estimate in use when the checkpoint was written: its radii as the last epoch
            # recorded them (the history and `TrainResult.feedback` report them until the next
            # refresh), and the statistic a closed-form feedback follows the weights from.
            last = saved.epochs[-1] if saved.epochs else None
            radius = (
                last.spectral_radius
                if last is not None and last.spectral_radius is not None
                else (spectral_radius(self.d) if self.d.dim() == 2 else float(self.d.abs().max()))
            )
            unclipped = (
                last.unclipped_spectral_radius
                if last is not None and last.unclipped_spectral_radius is not None
                else radius
            )
            statistic = checkpoint.feedback_statistic
            self.estimate = FeedbackEstimate(
                d=self.d,
                spectral_radius=radius,
                unclipped_spectral_radius=unclipped,
                kind=self.config.feedback.kind,
                seconds=0.0,
                statistic=None if statistic is None else statistic.to(self.device),
            )
        self.epoch = checkpoint.epoch
        self.step = checkpoint.step
        finished = saved.stopped_early or checkpoint.epoch >= self.config.epochs
        logger.info(
            "resumed from %s after epoch %d (step %d)%s",
            self.checkpoint_dir,
            self.epoch,
            self.step,
            "; the run had finished" if finished else "",
        )
        return finished

    def _total_steps(self) -> int:
        per_epoch = self.train_windows.n_batches(self.config.batch_size, self.config.max_windows)
        return per_epoch * max(0, self.config.epochs - self.epoch)


# ---- helpers ------------------------------------------------------------------------------


def _check_inputs(
    model: RecurrentForecaster, train_windows: ForkingWindows, val_windows: ForkingWindows
) -> None:
    for name, windows in (("train_windows", train_windows), ("val_windows", val_windows)):
        if len(windows) == 0:
            raise DataError(f"{name}: no windows", field=name)
        if windows.horizon != model.horizon:
            raise DataError(
                f"{name}: horizon {windows.horizon} differs from the model's {model.horizon}",
                field="horizon",
            )
    if model.input_size != 1:
        raise DataError(
            f"windows give 1 input feature; the model expects input_size {model.input_size}",
            field="input_size",
        )
    if train_windows.lookback != val_windows.lookback:
        raise DataError(
            f"val_windows: lookback {val_windows.lookback} differs from train_windows' "
            f"{train_windows.lookback}",
            field="lookback",
        )


def _trailing_failures(reports: Sequence[ModelGateReport]) -> int:
    """Failed gate runs at the end of `reports`, in a row."""
    count = 0
    for report in reversed(reports):
        if report.passed:
            break
        count += 1
    return count


def _choose_method(
    requested: Method, model: RecurrentForecaster, caller_reason: str | None
) -> tuple[Method, str]:
    reason = caller_reason or f"config.train.method = '{requested}'"
    if requested == "feedback" and not model.supports_feedback:
        why = (
            f"model '{model.name}' does not support fixed-feedback training "
            "(ALGORITHMS.md §5.2); trained with bptt"
        )
        logger.warning("%s", why)
        return "bptt", f"{reason}; {why}"
    return requested, reason


def _use_amp(amp: bool, device: torch.device) -> bool:
    if not amp:
        return False
    if device.type != "cuda":
        logger.warning("train.amp is ignored on %s: mixed precision runs on CUDA only", device)
        return False
    if not torch.cuda.is_bf16_supported():
        logger.warning("train.amp is ignored: this GPU has no bfloat16 support")
        return False
    return True


def _autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # bfloat16 keeps float32's range, so no gradient scaler is needed around compute_gradients.
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the duration of the run; the previous setting returns."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # On CUDA some cuBLAS paths need CUBLAS_WORKSPACE_CONFIG set before start-up; warn there
    # rather than fail, as the environment is the caller's.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def _run_hash(
    model: RecurrentForecaster,
    train_windows: ForkingWindows,
    val_windows: ForkingWindows,
    config: TrainConfig,
    seed: int,
    method: str,
) -> str:
    """What a checkpoint must match to be resumed: the train config (less epochs and device),
    method, seed, the model's class, hyper-parameters and parameter shapes, and the training and
    validation windows' content (`ForkingWindows.fingerprint`), so a run on other data or
    preprocessing never picks up another run's weights."""
    settings = config.model_dump(mode="json", exclude={"epochs", "device"})
    return config_hash(
        {
            "train": settings,
            "method": method,
            "seed": seed,
            "model": type(model).__name__,
            "model_config": repr(getattr(model, "config", None)),
            "shapes": {key: list(value.shape) for key, value in model.state_dict().items()},
            "train_windows": train_windows.fingerprint(),
            "val_windows": val_windows.fingerprint(),
        }
    )


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[Tensor], None]]:
    """A rich progress bar over optimiser steps when asked for; a no-op otherwise."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("training", total=total)
        calls = 0

        def advance(loss: Tensor) -> None:
            nonlocal calls
            calls += 1
            # Reading the loss synchronises a GPU: only every 10 steps.
            if calls % 10 == 1:
                bar.update(task, advance=1, description=f"training loss {float(loss):.4f}")
            else:
                bar.advance(task)

        yield advance
