"""Rescaled loss (ALGORITHMS.md §4.2, oracle O8) and the reporting metrics."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from forecaster.config import LossConfig
from forecaster.errors import ModelError
from forecaster.losses import (
    ForecastLoss,
    default_burn_in,
    mae,
    mse,
    rescaled_weights,
    weighted_loss,
)

B, T, H = 3, 7, 2
# O8's tolerance: 1e-7 is below one float32 ulp of a loss near 1, so float32 is checked relative
# to the value (a few ulps) and float64 absolutely.
TOLERANCES = [(torch.float64, 1e-12), (torch.float32, 1e-6)]


def _close(got: Tensor, expected: Tensor, dtype: torch.dtype, tol: float) -> bool:
    scale = 1.0 if dtype == torch.float64 else max(1.0, abs(expected.item()))
    return abs(got.item() - expected.item()) <= tol * scale


def _batch(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, T, H, generator=generator, dtype=dtype)
    target = torch.randn(B, T, H, generator=generator, dtype=dtype)
    mask = torch.rand(B, T, H, generator=generator) > 0.3  # some entries invalid
    return pred, target, mask


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_o8_uniform_weights_equal_mse_on_masked_entries(dtype: torch.dtype, tol: float) -> None:
    pred, target, mask = _batch(dtype)
    loss = ForecastLoss(eta=0.0, gamma=0.0, burn_in=0)(pred, target, mask)
    expected = F.mse_loss(pred[mask], target[mask])
    assert _close(loss, expected, dtype, tol)
    assert _close(mse(pred, target, mask), expected, dtype, tol)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_o8_uniform_absolute_variant_equals_mae_on_masked_entries(
    dtype: torch.dtype, tol: float
) -> None:
    pred, target, mask = _batch(dtype)
    loss = ForecastLoss(kind="absolute", eta=0.0, gamma=0.0, burn_in=0)(pred, target, mask)
    expected = F.l1_loss(pred[mask], target[mask])
    assert _close(loss, expected, dtype, tol)
    assert _close(mae(pred, target, mask), expected, dtype, tol)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_o8_scaling_all_weights_by_seven_changes_nothing(dtype: torch.dtype, tol: float) -> None:
    pred, target, mask = _batch(dtype)
    weights = rescaled_weights(T, H, eta=1.5, gamma=0.5, t0=2, dtype=dtype)
    for kind in ("squared", "absolute"):
        base = weighted_loss(pred, target, mask, weights, kind=kind)
        scaled = weighted_loss(pred, target, mask, 7 * weights, kind=kind)
        assert _close(scaled, base, dtype, tol)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_o8_weights_only_at_last_step_equal_last_step_mse(dtype: torch.dtype, tol: float) -> None:
    pred, target, mask = _batch(dtype)
    loss = ForecastLoss(eta=1.0, gamma=0.0, burn_in=T - 1)(pred, target, mask)
    last = mask[:, -1]
    expected = F.mse_loss(pred[:, -1][last], target[:, -1][last])
    assert _close(loss, expected, dtype, tol)


def test_o8_zero_weight_steps_get_exactly_zero_direct_gradient() -> None:
    pred, target, mask = _batch(torch.float64)
    pred.requires_grad_(True)
    ForecastLoss(eta=2.0, gamma=1.0, burn_in=3)(pred, target, mask).backward()
    assert pred.grad is not None
    assert torch.equal(pred.grad[:, :3], torch.zeros_like(pred.grad[:, :3]))  # burn-in
    assert torch.equal(pred.grad[~mask], torch.zeros_like(pred.grad[~mask]))  # masked out
    assert (pred.grad[:, 3:][mask[:, 3:]] != 0).all()  # every weighted entry does get one


def test_rescaled_weights_match_the_formula_hand_computed() -> None:
    weights = rescaled_weights(5, 2, eta=2.0, gamma=1.0, t0=1, dtype=torch.float64)
    a = torch.tensor([0.0, (1 / 4) ** 2, (2 / 4) ** 2, (3 / 4) ** 2, 1.0], dtype=torch.float64)
    c = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(weights, a[:, None] * c[None, :], rtol=0, atol=1e-15)


def test_rescaled_weights_at_zero_exponents_are_the_burn_in_indicator() -> None:
    weights = rescaled_weights(6, 3, eta=0.0, gamma=0.0, t0=2)
    expected = torch.zeros(6, 3)
    expected[2:] = 1.0
    assert torch.equal(weights, expected)


def test_weighted_loss_equals_its_definition_for_random_weights() -> None:
    pred, target, mask = _batch(torch.float64)
    weights = torch.rand(T, H, dtype=torch.float64)
    m = mask.to(torch.float64)
    for kind, ell in (("squared", (pred - target) ** 2), ("absolute", (pred - target).abs())):
        expected = (weights * m * ell).sum() / (weights * m).sum()
        got = weighted_loss(pred, target, mask, weights, kind=kind)
        assert abs(got.item() - expected.item()) <= 1e-14


def test_loss_without_mask_counts_every_entry() -> None:
    pred, target, _ = _batch(torch.float64)
    loss = ForecastLoss(eta=1.0, gamma=1.0, burn_in=2)
    ones = torch.ones(B, T, H, dtype=torch.bool)
    assert abs(loss(pred, target).item() - loss(pred, target, ones).item()) <= 1e-15


def test_all_zero_mask_gives_zero_loss_and_zero_gradient_not_nan() -> None:
    pred, target, mask = _batch()
    pred.requires_grad_(True)
    loss = ForecastLoss()(pred, target, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_half_precision_predictions_are_scored_in_float32() -> None:
    pred, target, mask = _batch()
    loss = ForecastLoss()(pred.to(torch.bfloat16), target, mask)
    assert loss.dtype == torch.float32
    assert mse(pred.to(torch.bfloat16), target, mask).dtype == torch.float32


def test_from_config_uses_the_default_burn_in() -> None:
    loss = ForecastLoss.from_config(LossConfig(), T=200, H=4)
    assert (loss.kind, loss.eta, loss.gamma, loss.t0(200)) == ("squared", 1.0, 0.0, 24)
    assert [default_burn_in(steps) for steps in (1, 7, 40, 96, 720)] == [0, 1, 10, 24, 24]
    weights = loss.weights(200, 4)
    assert torch.equal(weights[:24], torch.zeros(24, 4))
    assert (weights[24:] > 0).all()
    assert loss.weights(200, 4) is weights  # cached per (T, H, device, dtype)


def test_from_config_takes_kind_exponents_and_burn_in() -> None:
    config = LossConfig(kind="absolute", eta=0.5, gamma=1.0, burn_in=3)
    loss = ForecastLoss.from_config(config, T=T, H=H)
    expected = rescaled_weights(T, H, eta=0.5, gamma=1.0, t0=3)
    assert loss.kind == "absolute"
    assert torch.equal(loss.weights(T, H), expected)


def test_burn_in_covering_the_window_is_refused() -> None:
    with pytest.raises(ModelError, match=r"burn_in: 7 leaves no step with loss"):
        ForecastLoss.from_config(LossConfig(burn_in=7), T=7, H=2)
    with pytest.raises(ModelError, match=r"burn_in: 9 leaves no step"):
        rescaled_weights(7, 2, eta=1.0, gamma=0.0, t0=9)


def test_shape_mismatch_is_refused_with_the_field_named() -> None:
    pred, target, mask = _batch()
    with pytest.raises(ModelError, match=r"mask: shape \(3, 7, 1\) differs"):
        ForecastLoss()(pred, target, mask[..., :1])
    with pytest.raises(ModelError, match=r"target: shape"):
        mse(pred, target[:, :3])
    with pytest.raises(ModelError, match=r"loss.kind: 'huber' is not one of"):
        ForecastLoss(kind="huber")  # type: ignore[arg-type]


def test_reporting_metrics_are_unweighted() -> None:
    pred, target, _ = _batch(torch.float64)
    assert abs(mse(pred, target).item() - F.mse_loss(pred, target).item()) <= 1e-15
    assert abs(mae(pred, target).item() - F.l1_loss(pred, target).item()) <= 1e-15


@pytest.mark.parametrize("kind", ["squared", "absolute"])
@pytest.mark.parametrize("masked", [True, False])
def test_hand_written_gradient_equals_autograd_of_the_formula(kind: str, masked: bool) -> None:
    pred, target, mask = _batch(torch.float64)
    weights = torch.rand(T, H, dtype=torch.float64)
    mask_or_none = mask if masked else None
    m = mask.to(torch.float64) if masked else torch.ones(B, T, H, dtype=torch.float64)
    for tensor in (pred, target):
        tensor.requires_grad_(True)
    weighted_loss(pred, target, mask_or_none, weights, kind=kind).backward()  # type: ignore[arg-type]
    ours = (pred.grad.clone(), target.grad.clone())  # type: ignore[union-attr]
    pred.grad, target.grad = None, None
    ell = (pred - target) ** 2 if kind == "squared" else (pred - target).abs()
    ((weights * m * ell).sum() / (weights * m).sum()).backward()
    assert (ours[0] - pred.grad).abs().max().item() <= 1e-14  # type: ignore[operator]
    assert (ours[1] - target.grad).abs().max().item() <= 1e-14  # type: ignore[operator]
    assert torch.autograd.gradcheck(
        lambda p, y: weighted_loss(p, y, mask_or_none, weights, kind=kind),  # type: ignore[arg-type]
        (pred.detach().requires_grad_(), target.detach().requires_grad_()),
    )
