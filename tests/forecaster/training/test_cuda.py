"""The gradient methods on CUDA give the CPU's gradients (run only where a GPU is present)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch_helpers import max_grad_diff, parameter_grads, random_batch

from forecaster.config import FeedbackConfig
from forecaster.losses import ForecastLoss
from forecaster.models.registry import build
from forecaster.training.feedback import estimate_feedback
from forecaster.training.gradients import (
    autograd_bptt_gradients,
    compute_gradients,
    hand_written_bptt,
)

pytestmark = pytest.mark.gpu

B, T, D, HID, HORIZON = 4, 48, 3, 16, 5


@pytest.mark.parametrize(
    ("name", "lags"),
    [("mi_gru", 0), ("lmn", 0), ("scrn", 0), ("gru", 0), ("scrn", 12)],
    ids=["mi_gru", "lmn", "scrn", "gru", "scrn+lin12"],  # the last: the lag convolution
)
@pytest.mark.parametrize("method", ["feedback", "bptt", "tbptt"])
def test_cuda_gradients_equal_cpu_gradients(name: str, lags: int, method: str) -> None:
    torch.manual_seed(0)
    cpu_model = build(name, D, HID, HORIZON, linear_lags=lags).double()
    if lags:
        with torch.no_grad():  # weight on the lags, so their readout's gradient is compared
            cpu_model.head.weight.normal_(0.0, 0.1)
    if method == "feedback" and not cpu_model.supports_feedback:
        pytest.skip(f"{name} has no feedback path")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x, target, mask = random_batch(B, T, D, HORIZON)
    loss = ForecastLoss()
    d = None
    if method == "feedback":
        d = estimate_feedback(cpu_model, [x], FeedbackConfig(kind="jacobian_mean")).d
    cpu_loss = compute_gradients(method, cpu_model, x, target, mask, loss, d=d, truncation=16)
    gpu_loss = compute_gradients(
        method,
        gpu_model,
        x.cuda(),
        target.cuda(),
        mask.cuda(),
        loss,
        d=None if d is None else d.cuda(),
        truncation=16,
    )
    assert abs(cpu_loss.item() - gpu_loss.item()) <= 1e-10
    gpu_grads = {k: v.cpu() for k, v in parameter_grads(gpu_model).items()}
    assert max_grad_diff(parameter_grads(cpu_model), gpu_grads) <= 1e-9


def test_feedback_estimate_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    model = build("mi_gru", D, HID, HORIZON).double()
    x, _, _ = random_batch(B, T, D, HORIZON)
    cpu = estimate_feedback(model, [x], FeedbackConfig(kind="jacobian_mean"))
    gpu = estimate_feedback(copy.deepcopy(model).cuda(), [x.cuda()], FeedbackConfig())
    assert torch.allclose(cpu.d, gpu.d.cpu(), atol=1e-10)


@pytest.mark.parametrize(("name", "lags"), [("mi_gru", 0), ("lmn", 0), ("scrn", 0), ("scrn", 12)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_hand_written_bptt_equals_autograd(name: str, lags: int, dtype: torch.dtype) -> None:
    """The trainer's `bptt` on CUDA runs the scripted recursions; autograd is the reference, and
    under AMP autograd runs instead."""
    torch.manual_seed(0)
    model = build(name, D, HID, HORIZON, linear_lags=lags).to(device="cuda", dtype=dtype)
    x, target, mask = (t.cuda() for t in random_batch(B, T, D, HORIZON))
    x, target = x.to(dtype), target.to(dtype)
    loss = ForecastLoss()
    assert hand_written_bptt(model, x)
    model.zero_grad(set_to_none=True)
    hand_loss = compute_gradients("bptt", model, x, target, mask, loss)
    hand = {k: v.clone() for k, v in parameter_grads(model).items()}
    model.zero_grad(set_to_none=True)
    auto_loss = autograd_bptt_gradients(model, x, target, mask, loss)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(hand_loss.item() - auto_loss.item()) <= tolerance
    assert max_grad_diff(hand, parameter_grads(model)) <= tolerance
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not hand_written_bptt(model, x)
