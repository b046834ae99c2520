"""The training loop: learning, determinism, early stopping, plateau decay, history, refusals."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from forecaster.config import FeedbackConfig, LossConfig, TrainConfig
from forecaster.errors import ConfigError, DataError
from forecaster.losses import mse
from forecaster.models.registry import build
from forecaster.training.trainer import (
    EpochRecord,
    TrainHistory,
    TrainResult,
    evaluate_mse,
    train,
)
from forecaster.training.windows import ForkingWindows

LOOKBACK, HORIZON = 16, 4


def _series(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.sin(2 * np.pi * t / 12) + 0.1 * rng.normal(size=n)


def _windows(n: int = 200, lookback: int = LOOKBACK) -> tuple[ForkingWindows, ForkingWindows]:
    values = _series(n)
    cut = int(n * 0.75)
    train_w = ForkingWindows([values], lookback=lookback, horizon=HORIZON, rows=slice(0, cut))
    val_w = ForkingWindows(
        [values], lookback=lookback, horizon=HORIZON, rows=slice(cut - lookback, n)
    )
    return train_w, val_w


def _model(name: str = "gru", seed: int = 0, horizon: int = HORIZON):
    torch.manual_seed(seed)
    return build(name, input_size=1, hidden_size=8, horizon=horizon)


def _config(**overrides) -> TrainConfig:
    values = {
        "method": "bptt",
        "epochs": 3,
        "batch_size": 16,
        "lr": 1e-2,
        "device": "cpu",
        "patience": 10,
        "loss": LossConfig(eta=0.0, burn_in=0),
    }
    values.update(overrides)
    return TrainConfig(**values)


class _Recorder:
    """A callback keeping every event and the weights at each epoch end."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.records: list[EpochRecord] = []
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.final: list[TrainHistory] = []

    def on_epoch_end(self, record: EpochRecord, history: TrainHistory) -> None:
        assert history.epochs[-1] == record
        self.records.append(record)
        self.weights[record.epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}

    def on_train_end(self, history: TrainHistory) -> None:
        self.final.append(history)


class _AscentAfter:
    """MSE for the first `steps` calls, then its negative: validation gets worse for sure."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.calls = 0

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        self.calls += 1
        loss = mse(pred, target, mask)
        return loss if self.calls <= self.steps else -loss


@pytest.mark.parametrize(("method", "name"), [("bptt", "mi_gru"), ("feedback", "mi_gru")])
def test_training_reduces_validation_loss(method: str, name: str) -> None:
    train_w, val_w = _windows()
    model = _model(name)
    config = _config(method=method, epochs=6, lr=2e-2)
    result = train(model, train_w, val_w, config, seed=1)
    history = result.history
    initial = history.evaluations[0].val_loss
    assert history.method == method
    assert history.best_val_loss < 0.5 * initial, (initial, history.val_losses)
    assert evaluate_mse(model, val_w) == pytest.approx(history.best_val_loss, rel=1e-6)
    if method == "feedback":
        radii = [r.spectral_radius for r in history.epochs]
        assert all(r is not None and 0 < r < 1 for r in radii)
        assert result.feedback is not None
        assert result.feedback.d.shape == (model.state_size,)
    else:
        assert all(r.spectral_radius is None for r in history.epochs)


def test_tbptt_trains() -> None:
    train_w, val_w = _windows()
    result = train(_model(), train_w, val_w, _config(method="tbptt", truncation=4), seed=1)
    assert result.history.method == "tbptt"
    assert result.history.best_val_loss < result.history.evaluations[0].val_loss


def test_same_seed_gives_identical_weights_and_another_seed_does_not() -> None:
    train_w, val_w = _windows()
    config = _config(epochs=2, max_windows=64)
    runs = [train(_model(), train_w, val_w, config, seed=s).model for s in (5, 5, 6)]
    same = runs[0].state_dict()
    for key, value in runs[1].state_dict().items():
        assert torch.equal(value, same[key]), key
    assert any(not torch.equal(v, same[k]) for k, v in runs[2].state_dict().items())


def test_early_stopping_restores_the_best_weights() -> None:
    train_w, val_w = _windows()
    steps_per_epoch = train_w.n_batches(16)
    model = _model()
    recorder = _Recorder(model)
    config = _config(epochs=30, patience=2, lr_decay=1.0)
    result = train(
        model,
        train_w,
        val_w,
        config,
        loss_fn=_AscentAfter(3 * steps_per_epoch),
        callbacks=[recorder],
        seed=0,
    )
    history = result.history
    assert history.stopped_early
    assert 1 <= history.best_epoch <= 3
    assert len(history.epochs) == history.best_epoch + config.patience
    assert not any(e.improved for e in history.evaluations if e.epoch > history.best_epoch)
    best = recorder.weights[history.best_epoch]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert history.best_val_loss == min(e.val_loss for e in history.evaluations)
    assert recorder.final == [history]


def test_learning_rate_decays_on_each_plateau() -> None:
    train_w, val_w = _windows()
    steps_per_epoch = train_w.n_batches(16)
    config = _config(epochs=5, patience=10, lr_decay=0.5)
    result = train(_model(), train_w, val_w, config, loss_fn=_AscentAfter(steps_per_epoch), seed=0)
    evaluations = result.history.evaluations[1:]  # the pass before training never decays
    lr = config.lr
    for evaluation, record in zip(evaluations, result.history.epochs, strict=True):
        assert record.lr == pytest.approx(lr)  # the rate the epoch trained with
        if not evaluation.improved:
            lr *= config.lr_decay
        assert evaluation.lr == pytest.approx(lr)
    assert sum(not e.improved for e in evaluations) >= 3
    assert result.history.epochs[-1].lr < config.lr / 4


def test_history_records_every_epoch_and_evaluation() -> None:
    train_w, val_w = _windows()
    model = _model("mi_gru")
    recorder = _Recorder(model)
    config = _config(method="feedback", epochs=2, eval_every=2, max_windows=80)
    result = train(model, train_w, val_w, config, callbacks=[recorder], seed=0)
    history = result.history
    steps = math.ceil(80 / 16)
    assert [r.epoch for r in history.epochs] == [1, 2]
    assert [r.steps for r in history.epochs] == [steps, steps]
    assert [r.step for r in history.epochs] == [steps, 2 * steps]
    # Before training, every 2 steps, and at each epoch end (steps 5 and 10).
    assert [e.step for e in history.evaluations] == [0, 2, 4, 5, 6, 8, 10]
    assert recorder.records == list(history.epochs)
    for record in history.epochs:
        assert math.isfinite(record.train_loss)
        assert record.val_loss == next(
            e.val_loss for e in history.evaluations if e.step == record.step
        )
        assert record.seconds >= record.train_seconds > 0
        assert record.peak_memory_mb > 0
        assert record.method == "feedback"
        assert record.spectral_radius is not None
    assert history.epochs[0].feedback_seconds is not None  # estimated before epoch 1 and 2
    assert history.method_reason == "config.train.method = 'feedback'"
    assert history.memory_measure == "cpu_max_rss"
    assert history.device == "cpu"
    assert history.total_seconds >= sum(r.seconds for r in history.epochs)
    assert not history.stopped_early
    assert TrainHistory.from_dict(history.to_dict()) == history


def test_feedback_is_refreshed_every_refresh_every_epochs() -> None:
    train_w, val_w = _windows()
    config = _config(
        method="feedback",
        epochs=3,
        max_windows=32,
        feedback=FeedbackConfig(refresh_every=2, estimate_batches=1),
    )
    history = train(_model("mi_gru"), train_w, val_w, config, seed=0).history
    refreshed = [r.feedback_seconds is not None for r in history.epochs]
    assert refreshed == [True, False, True]


def _assert_resumes_to(
    final: dict[str, Tensor], name: str, config: TrainConfig, stop_after: int, checkpoint: Path
) -> TrainResult:
    """A run of `name` stopped after `stop_after` epochs and resumed from its checkpoint ends
    with the weights `final` of the uninterrupted run (same windows, seed 1); the resumed run."""
    train_w, val_w = _windows()
    first = _model(name)
    stopped = config.model_copy(update={"epochs": stop_after})
    train(first, train_w, val_w, stopped, seed=1, checkpoint_dir=checkpoint)
    resumed = train(first, train_w, val_w, config, seed=1, checkpoint_dir=checkpoint, resume=True)
    for key, value in final.items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    return resumed


@pytest.mark.parametrize("name", ["lmn", "scrn"])
def test_matrix_feedback_with_corrections_trains_and_resumes_to_the_same_weights(
    name: str, tmp_path: Path
) -> None:
    """`jacobian_matrix` + correction sweeps through the whole trainer: it learns, records the
    matrix's spectral radius, keeps `M [S, S]`, and a resumed run ends where an uninterrupted
    one does (the matrix comes back from the checkpoint)."""
    train_w, val_w = _windows()
    feedback = FeedbackConfig(kind="jacobian_matrix", corrections=1, refresh_every=2)
    config = _config(method="feedback", epochs=3, max_windows=64, lr=2e-2, feedback=feedback)
    model = _model(name)
    result = train(model, train_w, val_w, config, seed=1)
    history = result.history
    assert history.method == "feedback"
    assert history.best_val_loss < 0.8 * history.evaluations[0].val_loss, history.val_losses
    assert result.feedback is not None
    assert result.feedback.d.shape == (model.state_size, model.state_size)
    assert result.feedback.kind == "jacobian_matrix"
    radii = [r.spectral_radius for r in history.epochs if r.feedback_seconds is not None]
    assert len(radii) == 2
    assert all(r is not None and 0 < r < 1 for r in radii)
    _assert_resumes_to(model.state_dict(), name, config, 2, tmp_path)


@pytest.mark.parametrize("name", ["mi_gru", "lmn"])
def test_per_step_diagonal_trains_through_the_trainer_and_resumes(
    name: str, tmp_path: Path
) -> None:
    """`kind: per_step_diag` (§5.3 option 4): the gradients and the gate use the per-step
    diagonal (other gate cosine and other weights than `jacobian_mean` from the same start), the
    mean diagonal is still estimated and recorded, and a resumed run ends where an uninterrupted
    one does."""
    train_w, val_w = _windows()
    per_step = FeedbackConfig(kind="per_step_diag", min_cosine=-1.0)
    config = _config(method="feedback", epochs=3, max_windows=64, lr=2e-2, feedback=per_step)
    mean = config.model_copy(
        update={"feedback": per_step.model_copy(update={"kind": "jacobian_mean"})}
    )
    result = train(_model(name), train_w, val_w, config, seed=1)
    reference = train(_model(name), train_w, val_w, mean, seed=1)
    history = result.history
    assert history.method == "feedback", history.method_reason
    assert history.best_val_loss < 0.8 * history.evaluations[0].val_loss, history.val_losses
    assert result.feedback is not None
    assert result.feedback.kind == "per_step_diag"
    assert result.feedback.d.shape == (result.model.state_size,)
    cosine, reference_cosine = (r.history.model_gate[0].cosine for r in (result, reference))
    assert cosine != pytest.approx(reference_cosine, abs=1e-6)
    final, other = result.model.state_dict(), reference.model.state_dict()
    assert any(not torch.equal(final[k], other[k]) for k in final)
    _assert_resumes_to(final, name, config, 1, tmp_path)


def test_closed_form_feedback_follows_the_weights_every_step_and_resumes(tmp_path: Path) -> None:
    """LMN's feedback is re-evaluated at the current weights every `refresh_steps` steps from
    the epoch estimate's statistic: other weights than with `refresh_steps: 0`; no effect on a
    model without the closed form (MI-GRU); a run resumed between two epoch estimates (the
    statistic comes back from the checkpoint) ends where an uninterrupted one does."""
    train_w, val_w = _windows()
    feedback = FeedbackConfig(kind="jacobian_matrix", refresh_every=2, estimate_batches=1)
    config = _config(method="feedback", epochs=3, max_windows=64, lr=2e-2, feedback=feedback)
    frozen = config.model_copy(
        update={"feedback": feedback.model_copy(update={"refresh_steps": 0})}
    )

    def final(name: str, settings: TrainConfig) -> dict[str, Tensor]:
        result = train(_model(name), train_w, val_w, settings, seed=1)
        assert result.history.method == "feedback"
        return result.model.state_dict()

    following, fixed = final("lmn", config), final("lmn", frozen)
    assert any(not torch.equal(following[k], fixed[k]) for k in following)
    gru_following, gru_fixed = final("mi_gru", config), final("mi_gru", frozen)
    assert all(torch.equal(gru_following[k], gru_fixed[k]) for k in gru_following)

    resumed = _assert_resumes_to(following, "lmn", config, 1, tmp_path)
    assert resumed.feedback is not None
    assert resumed.feedback.statistic is not None


@pytest.mark.parametrize("name", ["mi_gru", "lmn"])
def test_resume_between_estimates_records_the_same_spectral_radii(
    name: str, tmp_path: Path
) -> None:
    """A run resumed between two epoch estimates reports the feedback it trains with: the
    per-epoch radii (clipped and unclipped) and `TrainResult.feedback` match the uninterrupted
    run's, also for a model without a closed-form statistic (MI-GRU)."""
    train_w, val_w = _windows()
    feedback = FeedbackConfig(refresh_every=2, estimate_batches=1, min_cosine=-1.0)
    config = _config(method="feedback", epochs=3, max_windows=64, lr=2e-2, feedback=feedback)
    whole = train(_model(name), train_w, val_w, config, seed=1)
    resumed = _assert_resumes_to(whole.model.state_dict(), name, config, 1, tmp_path)

    def radii(result: TrainResult) -> list[tuple[float | None, float | None]]:
        return [(r.spectral_radius, r.unclipped_spectral_radius) for r in result.history.epochs]

    assert radii(resumed) == radii(whole)
    assert all(None not in pair for pair in radii(resumed))
    assert resumed.feedback is not None
    assert whole.feedback is not None
    assert resumed.feedback.spectral_radius == whole.feedback.spectral_radius


def test_model_without_feedback_support_trains_with_bptt_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    train_w, val_w = _windows()
    config = _config(method="feedback", epochs=1, max_windows=32)
    with caplog.at_level(logging.WARNING, logger="forecaster.training.trainer"):
        history = train(
            _model("lstm"), train_w, val_w, config, method_reason="gate: stationary"
        ).history
    assert history.requested_method == "feedback"
    assert history.method == "bptt"
    assert history.epochs[0].method == "bptt"
    assert history.method_reason.startswith("gate: stationary; model 'lstm' does not support")
    assert "does not support fixed-feedback training" in caplog.text


def test_deterministic_mode_is_restored_after_training() -> None:
    train_w, val_w = _windows()
    before = torch.are_deterministic_algorithms_enabled()
    train(_model(), train_w, val_w, _config(epochs=1, max_windows=16))
    assert torch.are_deterministic_algorithms_enabled() == before


def test_progress_bar_runs_when_asked() -> None:
    train_w, val_w = _windows()
    history = train(_model(), train_w, val_w, _config(epochs=1, max_windows=32), progress=True)
    assert len(history.history.epochs) == 1


def test_evaluate_mse_is_the_unweighted_last_step_mse() -> None:
    _, val_w = _windows()
    model = _model()
    batch = val_w.batch(np.arange(len(val_w)))
    with torch.no_grad():
        expected = torch.mean((model.forecast(batch.x) - batch.last_target) ** 2).item()
    assert evaluate_mse(model, val_w, batch_size=7) == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_resume_under_other_settings_is_refused(tmp_path: Path) -> None:
    train_w, val_w = _windows()
    train(_model(), train_w, val_w, _config(epochs=1, max_windows=16), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="written by a run with other settings"):
        train(
            _model(),
            train_w,
            val_w,
            _config(epochs=2, max_windows=16, lr=0.5),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_resume_on_other_data_of_the_same_length_is_refused(tmp_path: Path) -> None:
    # Same sizes, same window counts, other values: a finished checkpoint must not hand the
    # old run's weights to the new data.
    train_w, val_w = _windows()
    train(_model(), train_w, val_w, _config(epochs=1, max_windows=16), checkpoint_dir=tmp_path)
    values = _series(200) * 2.0 + 1.0
    other_train = ForkingWindows([values], lookback=LOOKBACK, horizon=HORIZON, rows=slice(0, 150))
    other_val = ForkingWindows(
        [values], lookback=LOOKBACK, horizon=HORIZON, rows=slice(150 - LOOKBACK, 200)
    )
    assert (len(other_train), len(other_val)) == (len(train_w), len(val_w))
    with pytest.raises(ConfigError, match="training or validation data"):
        train(
            _model(),
            other_train,
            other_val,
            _config(epochs=1, max_windows=16),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_resume_with_other_hyper_parameters_of_the_same_shapes_is_refused(tmp_path: Path) -> None:
    train_w, val_w = _windows()
    torch.manual_seed(0)
    tanh = build("lmn", input_size=1, hidden_size=8, horizon=HORIZON, activation="tanh")
    train(tanh, train_w, val_w, _config(epochs=1, max_windows=16), checkpoint_dir=tmp_path)
    torch.manual_seed(0)
    sigmoid = build("lmn", input_size=1, hidden_size=8, horizon=HORIZON, activation="sigmoid")
    with pytest.raises(ConfigError, match="written by a run with other settings"):
        train(
            sigmoid,
            train_w,
            val_w,
            _config(epochs=1, max_windows=16),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_window_fingerprint_follows_the_values_not_the_device_or_copy() -> None:
    train_w, _ = _windows()
    same, _ = _windows()
    assert train_w.fingerprint() == same.fingerprint() == train_w.to("cpu").fingerprint()
    shifted = ForkingWindows([_series(200)], lookback=LOOKBACK, horizon=HORIZON, rows=slice(1, 151))
    assert shifted.fingerprint() != train_w.fingerprint()  # same count, other positions


def test_resume_without_a_checkpoint_dir_is_refused() -> None:
    train_w, val_w = _windows()
    with pytest.raises(ConfigError, match="resume=True needs a checkpoint_dir"):
        train(_model(), train_w, val_w, _config(), resume=True)


def test_windows_with_another_horizon_than_the_model_are_refused() -> None:
    train_w, val_w = _windows()
    with pytest.raises(DataError, match="train_windows: horizon 4 differs from the model's 5"):
        train(_model(horizon=5), train_w, val_w, _config())


def test_validation_lookback_differing_from_training_is_refused() -> None:
    train_w, _ = _windows()
    _, val_w = _windows(lookback=LOOKBACK + 8)
    with pytest.raises(DataError, match="val_windows: lookback 24 differs from train_windows' 16"):
        train(_model(), train_w, val_w, _config())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_without_a_gpu_is_refused() -> None:
    train_w, val_w = _windows()
    with pytest.raises(ConfigError, match="'cuda' but CUDA is not available"):
        train(_model(), train_w, val_w, _config(device="cuda"))


@pytest.mark.gpu
def test_trains_on_cuda_with_amp() -> None:
    train_w, val_w = _windows()
    config = _config(method="feedback", epochs=2, device="cuda", amp=True)
    result = train(_model("mi_gru"), train_w, val_w, config, seed=0)
    assert result.device.type == "cuda"
    assert result.history.memory_measure == "cuda_max_allocated"
    assert result.history.best_val_loss < result.history.evaluations[0].val_loss
