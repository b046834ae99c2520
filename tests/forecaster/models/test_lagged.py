"""`LinearLags`: a recurrent forecaster plus a linear readout of its last K inputs."""

from __future__ import annotations

import pytest
import torch

from forecaster.config import FeedbackConfig, parse_config
from forecaster.errors import ConfigError, ModelError
from forecaster.losses import ForecastLoss
from forecaster.models.lagged import LinearLags
from forecaster.models.registry import build
from forecaster.training.feedback import estimate_feedback, jacobian_mean_matrix, states_no_grad
from forecaster.training.gradients import compute_gradients

D, HID, H, K, T = 2, 6, 3, 4, 9
F64 = torch.float64


def _pair(name: str = "scrn") -> tuple[torch.nn.Module, LinearLags]:
    torch.manual_seed(0)
    plain = build(name, D, HID, H).to(F64)
    torch.manual_seed(0)
    lagged = build(name, D, HID, H, linear_lags=K).to(F64)
    assert isinstance(lagged, LinearLags)
    return plain, lagged


@pytest.mark.parametrize("name", ["mi_gru", "lmn", "scrn", "gru", "lstm"])
def test_at_initialisation_it_forecasts_exactly_like_the_wrapped_model(name: str) -> None:
    plain, lagged = _pair(name)
    x = torch.randn(3, T, D, dtype=F64)
    assert (lagged(x) - plain(x)).abs().max().item() <= 1e-12  # zero weight on the lags
    assert lagged.state_size == plain.state_size + K * D
    assert lagged.name == plain.name
    assert lagged.supports_feedback == plain.supports_feedback
    names = [n for n, _ in lagged.named_parameters()]
    assert "inner.head.weight" not in names  # one head, this model's
    assert lagged.head.weight.shape == (H, plain.head_features + K * D)


def test_the_register_holds_the_last_k_inputs_oldest_first_zeros_before_the_start() -> None:
    _, lagged = _pair()
    x = torch.randn(2, T, D, dtype=F64)
    register = lagged.run_states(x)[..., lagged.cell_size :].reshape(2, T + 1, K, D)
    for t in range(T + 1):
        for j in range(K):  # slot j holds x_{t−K+j} (1-based steps: state t has seen x_1..x_t)
            step = t - K + j
            expected = x[:, step] if step >= 0 else torch.zeros(2, D, dtype=F64)
            assert torch.equal(register[:, t, j], expected), (t, j)


def test_with_the_cell_head_at_zero_the_forecast_is_the_linear_map_of_the_window() -> None:
    _, lagged = _pair()
    with torch.no_grad():
        lagged.head.weight.normal_()
        lagged.head.weight[:, : lagged.cell_head] = 0.0
    x = torch.randn(5, T, D, dtype=F64)
    window = x[:, -K:].reshape(5, K * D)  # the last K inputs, oldest first
    expected = window @ lagged.head.weight[:, lagged.cell_head :].T + lagged.head.bias
    assert (lagged.forecast(x) - expected).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name", ["scrn", "mi_gru", "lmn", "gru"])
def test_the_window_readout_reads_the_register_from_the_inputs(name: str) -> None:
    """`window_readout` and `forward` (a convolution over `s0`'s register and `x`) equal the
    plain head on the window's states, with the same parameter gradients; no gradient forms for
    the register units of the states, the cell units get the head's."""
    _, lagged = _pair(name)
    with torch.no_grad():
        lagged.head.weight.normal_()
    x = torch.randn(3, T, D, dtype=F64)
    s0 = torch.randn(3, lagged.state_size, dtype=F64)
    states = lagged.run_states(x, s0)  # [B, T+1, S]
    expected = lagged.readout(states[:, 1:])
    torch.testing.assert_close(
        lagged.window_readout(states[:, 1:], x, states[:, 0]), expected, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(lagged(x, s0), expected, atol=1e-12, rtol=0)

    params = list(lagged.parameters())
    got = torch.autograd.grad(lagged(x, s0).square().sum(), params)
    want = torch.autograd.grad(expected.square().sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)

    cell = lagged.cell_size
    leaf = states[:, 1:].detach().requires_grad_(True)
    lagged.window_readout(leaf, x, s0).square().sum().backward()
    reference = states[:, 1:].detach().requires_grad_(True)
    lagged.readout(reference).square().sum().backward()
    assert leaf.grad is not None
    assert reference.grad is not None
    assert torch.count_nonzero(leaf.grad[..., cell:]) == 0
    assert torch.count_nonzero(reference.grad[..., cell:]) > 0  # the plain head forms them
    torch.testing.assert_close(leaf.grad[..., :cell], reference.grad[..., :cell])


@pytest.mark.parametrize("kind", ["jacobian_mean", "jacobian_matrix"])
@pytest.mark.parametrize("name", ["scrn", "lmn"])
def test_the_feedback_step_runs_on_the_wrapped_model_and_never_builds_the_register(
    name: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`feedback_core` is the wrapped model: with zero weight on the lags the fixed-feedback
    gradients of the cell and of the cell's head columns are the wrapped model's, the lag columns
    get `Σ r ℓᵀ` (checked against BPTT, which is exact for the head), and `LinearLags.run_states`
    (the register) is never called."""
    plain, lagged = _pair(name)
    assert lagged.feedback_core() is lagged.inner
    x = torch.randn(3, T, D, dtype=F64)
    y = torch.randn(3, T, H, dtype=F64)
    loss = ForecastLoss()
    config = FeedbackConfig(kind=kind)  # type: ignore[arg-type]
    lagged_d = estimate_feedback(lagged, [x], config).d
    plain_d = estimate_feedback(plain, [x], config).d

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the register was built")

    monkeypatch.setattr(LinearLags, "run_states", refuse)
    lagged.zero_grad(set_to_none=True)
    compute_gradients("feedback", lagged, x, y, None, loss, d=lagged_d)
    monkeypatch.undo()
    got = {n: p.grad.clone() for n, p in lagged.named_parameters() if p.grad is not None}
    plain.zero_grad(set_to_none=True)
    compute_gradients("feedback", plain, x, y, None, loss, d=plain_d)
    for n, p in plain.named_parameters():
        if n.startswith("head."):
            continue
        assert p.grad is not None
        torch.testing.assert_close(got[f"inner.{n}"], p.grad, atol=1e-12, rtol=0)
    features = lagged.cell_head
    assert plain.head.weight.grad is not None
    torch.testing.assert_close(got["head.weight"][:, :features], plain.head.weight.grad)
    lagged.zero_grad(set_to_none=True)
    compute_gradients("bptt", lagged, x, y, None, loss)
    assert lagged.head.weight.grad is not None
    torch.testing.assert_close(got["head.weight"], lagged.head.weight.grad, atol=1e-12, rtol=0)


def test_a_window_readout_of_mismatched_states_is_refused() -> None:
    _, lagged = _pair()
    x = torch.randn(3, T, D, dtype=F64)
    states = lagged.run_states(x)
    with pytest.raises(ModelError, match=r"states: shapes .* do not match a window x"):
        lagged.window_readout(states[:, 2:], x, states[:, 0])


def test_the_matrix_feedback_spends_its_work_on_the_cell_units_only() -> None:
    plain, lagged = _pair("lmn")
    x = torch.randn(4, T, D, dtype=F64)
    matrix = jacobian_mean_matrix(lagged, [x])
    cell = lagged.cell_size
    assert lagged.feedback_units == cell
    assert torch.count_nonzero(matrix[cell:]) == 0
    assert torch.count_nonzero(matrix[:, cell:]) == 0
    assert torch.allclose(matrix[:cell, :cell], jacobian_mean_matrix(plain, [x]))
    diagonal = estimate_feedback(lagged, [x], FeedbackConfig()).d
    assert torch.count_nonzero(diagonal[cell:]) == 0
    assert states_no_grad(lagged, x).shape == (4, T + 1, lagged.state_size)


def test_bad_lag_counts_are_refused_by_name() -> None:
    with pytest.raises(ModelError, match=r"linear_lags: -1 is not a non-negative integer"):
        build("scrn", D, HID, H, linear_lags=-1)
    with pytest.raises(ModelError, match=r"linear_lags: 0 is not a positive integer"):
        LinearLags(build("scrn", D, HID, H), 0)
    raw = {"model": {"name": "scrn", "linear_lags": -3}}
    with pytest.raises(ConfigError, match=r"linear_lags"):
        parse_config(raw, source="<test>")
