"""The model-side gate of fixed-feedback training (ALGORITHMS.md §5.5 checks 2-4) and what the
trainer does with it: switch to BPTT before training or after failed rechecks, across a resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from forecaster.config import FeedbackConfig, LossConfig, TrainConfig
from forecaster.errors import ModelError
from forecaster.losses import ForecastLoss
from forecaster.models.base import RecurrentForecaster
from forecaster.models.registry import build
from forecaster.training.feedback import estimate_feedback, jacobian_profile
from forecaster.training.gate import (
    ModelGateReport,
    gate_batches,
    jacobian_cv,
    run_model_gate,
)
from forecaster.training.trainer import TrainHistory, train
from forecaster.training.windows import ForkingWindows, WindowBatch

F64 = torch.float64
LOOKBACK, HORIZON, STATE = 16, 4, 6


class LinearDiagonal(RecurrentForecaster):
    """`s_t = λ ⊙ s_{t−1} + W x_t + b`, `λ` in [0.3, 0.8]: its Jacobian is exactly `diag(λ)`."""

    name = "linear_diagonal"

    def __init__(self, state_size: int = STATE, horizon: int = HORIZON) -> None:
        super().__init__(1, state_size, horizon, state_size)
        self.decay = nn.Parameter(torch.linspace(0.3, 0.8, state_size))
        self.input_proj = nn.Linear(1, state_size)

    def project_inputs(self, x: Tensor) -> Tensor:
        return self.input_proj(x)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        return self.decay * s_prev + a_t


class InputGated(RecurrentForecaster):
    """`s_t = λ ⊙ (1 + x_t) ⊙ s_{t−1} + W x_t + b`: `diag(J_t) = λ (1 + x_t)` follows the input."""

    name = "input_gated"

    def __init__(self, state_size: int = STATE, horizon: int = HORIZON) -> None:
        super().__init__(1, state_size, horizon, state_size)
        self.decay = nn.Parameter(torch.linspace(0.2, 0.45, state_size))
        self.input_proj = nn.Linear(1, state_size)

    def project_inputs(self, x: Tensor) -> Tensor:
        return torch.cat([self.input_proj(x), x], dim=-1)  # [..., S + 1]: the gate rides along

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        return self.decay * (1 + a_t[..., -1:]) * s_prev + a_t[..., :-1]


def _series(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.sin(2 * np.pi * t / 12) + 0.1 * rng.normal(size=n)


def _windows(n: int = 200) -> tuple[ForkingWindows, ForkingWindows]:
    values = _series(n)
    cut = int(n * 0.75)
    train_w = ForkingWindows([values], lookback=LOOKBACK, horizon=HORIZON, rows=slice(0, cut))
    val_w = ForkingWindows(
        [values], lookback=LOOKBACK, horizon=HORIZON, rows=slice(cut - LOOKBACK, n)
    )
    return train_w, val_w


def _linear(seed: int = 0) -> LinearDiagonal:
    torch.manual_seed(seed)
    return LinearDiagonal().to(F64)


def _config(**feedback: object) -> TrainConfig:
    return TrainConfig(
        method="feedback",
        epochs=3,
        batch_size=16,
        lr=1e-2,
        device="cpu",
        patience=10,
        max_windows=48,
        loss=LossConfig(eta=0.0, burn_in=0),
        feedback=FeedbackConfig(**feedback),  # type: ignore[arg-type]
    )


def _loss() -> ForecastLoss:
    return ForecastLoss(eta=0.0, burn_in=0)


# ---- the checks -------------------------------------------------------------------------------


def test_exact_feedback_on_a_linear_diagonal_cell_passes_with_cosine_one_and_cv_zero() -> None:
    model = _linear()
    _, val_w = _windows()
    batches = gate_batches(val_w, 4, 8)
    d = model.decay.detach().clone()
    report = run_model_gate(model, batches, _loss(), FeedbackConfig(), d)
    assert report.passed, report.reason
    assert report.cosine == pytest.approx(1.0, abs=1e-12)
    assert report.norm_ratio == pytest.approx(1.0, abs=1e-12)
    assert report.jacobian_cv == 0.0
    assert report.spectral_radius == pytest.approx(model.decay.max().item(), abs=1e-12)
    assert report.checks == ("stability", "jacobian", "gradient")
    assert report.batches == 4
    assert report.windows == 32
    assert report.reason.startswith("passed (stability, jacobian, gradient): cosine 1.000")
    assert all(p.grad is None for p in model.parameters())  # nothing left for the optimiser
    assert model.training


def test_gate_reads_explicit_masks_and_none_alike() -> None:
    """Batches without a mask (every target valid) join with masked ones: an all-true mask
    measures what no mask does, a partial one changes the gradients compared."""
    model = _linear()
    _, val_w = _windows()
    batches = gate_batches(val_w, 4, 8)
    assert all(batch.mask is None for batch in batches)
    d = torch.full((STATE,), 0.5, dtype=F64)  # not the cell's Jacobian: cosine below 1

    def cosine(chosen: list[WindowBatch]) -> float:
        return run_model_gate(model, chosen, _loss(), FeedbackConfig(), d).cosine

    full = [replace(b, mask=torch.ones_like(b.target, dtype=torch.bool)) for b in batches]
    partial = [replace(b, mask=b.target > 0) for b in batches]
    reference = cosine(batches)
    assert reference < 0.999
    assert cosine(full) == pytest.approx(reference, abs=1e-12)
    assert cosine(full[:2] + batches[2:]) == pytest.approx(reference, abs=1e-12)
    assert cosine(partial[:2] + batches[2:]) != pytest.approx(reference, abs=1e-6)


def test_wrong_feedback_fails_gradient_agreement_and_names_it() -> None:
    model = _linear()
    _, val_w = _windows()
    d = torch.full((STATE,), -0.9, dtype=F64)  # the true Jacobian is diag(0.3 .. 0.8)
    report = run_model_gate(model, gate_batches(val_w, 4, 8), _loss(), FeedbackConfig(), d)
    assert not report.passed
    assert report.norm_ratio < 0.5  # δ shrinks under the alternating-sign feedback
    assert report.jacobian_cv == 0.0  # the cell is stationary: only check 4 fails
    assert report.spectral_radius == pytest.approx(
        model.decay.max().item(), abs=1e-12
    )  # the model's, not d's
    assert report.reason.startswith("failed gradient agreement: cosine ")
    assert "Jacobian" not in report.reason


def test_expanding_dynamics_fail_feedback_stability() -> None:
    model = _linear()
    with torch.no_grad():
        model.decay[-1] = 1.07  # one expanding unit
    _, val_w = _windows()
    batches = gate_batches(val_w, 2, 8)
    d = model.decay.detach().clone()  # unclipped: the gradients still agree exactly
    report = run_model_gate(model, batches, _loss(), FeedbackConfig(), d)
    assert report.spectral_radius == pytest.approx(1.07, abs=1e-12)
    assert report.cosine == pytest.approx(1.0, abs=1e-12)
    assert not report.passed
    assert report.reason == (
        "failed feedback stability: unclipped max |d_u| 1.070 >= 1 (expanding state dynamics)"
    )
    # At a recheck only gradient agreement decides; the stability failure is still reported.
    recheck = run_model_gate(
        model,
        batches,
        _loss(),
        FeedbackConfig(),
        d,
        stage="recheck",
        epoch=2,
        checks=("gradient",),
    )
    assert recheck.passed
    assert recheck.checks == ("gradient",)
    assert "not deciding here: feedback stability" in recheck.reason
    assert (recheck.stage, recheck.epoch) == ("recheck", 2)


def test_input_driven_jacobian_fails_jacobian_stationarity() -> None:
    torch.manual_seed(0)
    model = InputGated().to(F64)
    series = 0.9 * np.sin(2 * np.pi * np.arange(80) / 8)
    # A stride of one period: every window starts at the same phase, so the batch average
    # keeps the swing of diag(J_t) = λ (1 + x_t): CV = 0.9 / √2 ≈ 0.64 per unit.
    windows = ForkingWindows([series], lookback=16, horizon=HORIZON, stride=8)
    batches = gate_batches(windows, 2, 4)
    x = torch.cat([b.x for b in batches]).to(F64)
    profile = jacobian_profile(model, [x])  # [T, S]
    expected = model.decay.detach()[None, :] * (1 + x[0])
    assert (profile - expected).abs().max().item() <= 1e-12
    d = estimate_feedback(model, [x], FeedbackConfig()).d
    report = run_model_gate(model, batches, _loss(), FeedbackConfig(), d)
    assert report.jacobian_cv == pytest.approx(0.9 / math.sqrt(2), rel=1e-6)  # float32 windows
    assert not report.passed
    assert "Jacobian stationarity: median CV over time 0.636 > 0.5" in report.reason


def test_jacobian_cv_is_the_median_of_std_over_abs_mean() -> None:
    profile = torch.tensor([[1.0, 2.0, -1.0], [3.0, 2.0, -3.0]], dtype=F64)
    # units: mean 2 std 1 → 0.5; mean 2 std 0 → 0; mean −2 std 1 → 0.5
    assert jacobian_cv(profile) == pytest.approx(0.5)
    assert jacobian_cv(torch.zeros(5, 2, dtype=F64)) == 0.0
    assert jacobian_cv(torch.tensor([[-1.0], [1.0]], dtype=F64)) > 1e6  # mean 0: floored
    with pytest.raises(ModelError, match=r"profile: shape \(3,\) is not \[T, S\]"):
        jacobian_cv(torch.zeros(3))


def test_jacobian_profile_mean_is_the_jacobian_mean_feedback() -> None:
    torch.manual_seed(0)
    model = build("mi_gru", 1, 5, HORIZON).to(F64)
    batches = [torch.randn(3, 9, 1, dtype=F64), torch.randn(2, 9, 1, dtype=F64)]
    profile = jacobian_profile(model, batches)
    assert profile.shape == (9, 5)
    estimate = estimate_feedback(model, batches, FeedbackConfig())
    assert (profile.mean(dim=0) - estimate.d).abs().max().item() <= 1e-12
    with pytest.raises(ModelError, match="windows of 7 and 9 steps"):
        jacobian_profile(model, [batches[0], torch.randn(3, 7, 1, dtype=F64)])
    with pytest.raises(ModelError, match="no input window"):
        jacobian_profile(model, [])


def test_gate_batches_spread_over_all_windows_and_refusals() -> None:
    _, val_w = _windows()
    batches = gate_batches(val_w, 2, 5)
    index = torch.cat([b.index for b in batches]).tolist()
    assert index[0] == 0
    assert index[-1] == len(val_w) - 1
    assert len(index) == 10
    assert len(gate_batches(val_w, 100, 50)) == math.ceil(len(val_w) / 50)  # all of them
    model = _linear()
    d = model.decay.detach()
    with pytest.raises(ModelError, match="at least one validation batch"):
        run_model_gate(model, [], _loss(), FeedbackConfig(), d)
    with pytest.raises(ModelError, match=r"checks: \['speed'\] are not among"):
        run_model_gate(model, batches, _loss(), FeedbackConfig(), d, checks=("speed",))  # type: ignore[arg-type]


def test_feedback_config_refuses_an_empty_norm_ratio_interval() -> None:
    with pytest.raises(ValidationError, match="min_norm_ratio 3.0 exceeds max_norm_ratio 2.0"):
        FeedbackConfig(min_norm_ratio=3.0)
    defaults = FeedbackConfig()
    assert (defaults.gate, defaults.gate_batches, defaults.recheck_every) == (True, 4, 2)
    assert (defaults.min_cosine, defaults.min_norm_ratio, defaults.max_norm_ratio) == (0.8, 0.5, 2)
    assert defaults.max_jacobian_cv == 0.5


# ---- the trainer's use of it -------------------------------------------------------------------


def test_passing_gate_is_recorded_and_leaves_training_unchanged() -> None:
    train_w, val_w = _windows()
    config = _config(recheck_every=2)
    gated = train(_linear(), train_w, val_w, config, seed=3)
    history = gated.history
    assert history.method == "feedback"
    assert history.switch_epoch is None
    assert [(r.stage, r.epoch) for r in history.model_gate] == [("init", 0), ("recheck", 2)]
    first = history.model_gate[0]
    assert first.passed
    assert first.cosine == pytest.approx(1.0, abs=1e-10)  # d = jacobian_mean = λ exactly
    assert first.norm_ratio == pytest.approx(1.0, abs=1e-10)
    assert first.jacobian_cv == 0.0
    assert first.spectral_radius == pytest.approx(0.8)
    gate_seconds = [r.gate_seconds is not None for r in history.epochs]
    assert gate_seconds == [True, False, True]
    assert all(r.method == "feedback" for r in history.epochs)
    # Visible in the record that goes to metadata.json (and from there to MLflow).
    record = json.loads(json.dumps(history.to_dict()))
    assert record["model_gate"][0]["cosine"] == pytest.approx(first.cosine)
    assert TrainHistory.from_dict(record) == history
    # The gate draws no random numbers and leaves no gradient: the same weights without it.
    plain = train(_linear(), train_w, val_w, _config(gate=False), seed=3)
    assert plain.history.model_gate == ()
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, gated.model.state_dict()[key]), key


def test_failing_gate_before_training_trains_with_bptt_and_says_why() -> None:
    train_w, val_w = _windows()
    config = _config(kind="constant", value=-0.9)  # the Jacobian is diag(0.3 .. 0.8)
    result = train(_linear(), train_w, val_w, config, seed=1, method_reason="gate: stationary")
    history = result.history
    assert history.requested_method == "feedback"
    assert history.method == "bptt"
    assert all(r.method == "bptt" for r in history.epochs)
    assert all(r.spectral_radius is None for r in history.epochs)
    assert history.switch_epoch is None
    assert len(history.model_gate) == 1
    assert not history.model_gate[0].passed
    assert history.method_reason.startswith(
        "gate: stationary; model-side gate before training failed gradient agreement: cosine"
    )
    assert history.method_reason.endswith("; trained with bptt")
    assert result.feedback is None
    # Exactly the run BPTT would have made from the same start.
    reference = train(
        _linear(), train_w, val_w, config.model_copy(update={"method": "bptt"}), seed=1
    )
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[key]), key


def _stale_feedback_config() -> TrainConfig:
    # d = λ at init (exact: the first gate passes); never re-estimated, so once λ has moved the
    # feedback gradient is no longer exact and a near-1 cosine bound fails at every recheck.
    return _config(refresh_every=100, recheck_every=1, min_cosine=1 - 1e-6).model_copy(
        update={"epochs": 4}
    )


def test_two_failed_rechecks_in_a_row_switch_to_bptt_from_the_current_weights() -> None:
    train_w, val_w = _windows()
    history = train(_linear(), train_w, val_w, _stale_feedback_config(), seed=2).history
    stages = [(r.stage, r.epoch, r.passed) for r in history.model_gate]
    assert stages == [("init", 0, True), ("recheck", 1, False), ("recheck", 2, False)]
    assert history.model_gate[1].cosine < 1 - 1e-6
    assert history.switch_epoch == 3
    assert [r.method for r in history.epochs] == ["feedback", "feedback", "bptt", "bptt"]
    assert history.method == "bptt"
    assert "gradient agreement failed at 2 rechecks in a row" in history.method_reason
    assert history.method_reason.endswith("switched to bptt from epoch 3 (warm start)")
    assert [r.spectral_radius is None for r in history.epochs] == [False, False, True, True]


def test_resume_after_the_switch_continues_with_bptt(tmp_path: Path) -> None:
    train_w, val_w = _windows()
    config = _stale_feedback_config()
    whole = train(_linear(), train_w, val_w, config, seed=2)
    first = train(
        _linear(),
        train_w,
        val_w,
        config.model_copy(update={"epochs": 3}),
        seed=2,
        checkpoint_dir=tmp_path,
    )
    assert first.history.switch_epoch == 3
    resumed = train(_linear(), train_w, val_w, config, seed=2, checkpoint_dir=tmp_path, resume=True)
    history = resumed.history
    assert history.method == "bptt"
    assert history.switch_epoch == 3
    assert [r.method for r in history.epochs] == ["feedback", "feedback", "bptt", "bptt"]
    assert history.model_gate == first.history.model_gate  # no recheck after the switch
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_model_gate_report_round_trips_through_json() -> None:
    model = _linear()
    _, val_w = _windows()
    report = run_model_gate(
        model, gate_batches(val_w, 1, 4), _loss(), FeedbackConfig(), model.decay.detach()
    )
    assert ModelGateReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
