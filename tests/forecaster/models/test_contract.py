"""The shared model contract, one parametrised suite over every registered model (STYLE.md §10).

Covers shapes, dynamic batch, step vs forward agreement, oracle O13 (batched re-evaluation equals
the loop), gradcheck of each cell and the state_dict round trip.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

from forecaster.errors import ModelError
from forecaster.models.base import RecurrentForecaster, script_loop
from forecaster.models.registry import _REGISTRY, build, model_names

B, T, D, HID, HORIZON = 3, 7, 4, 5, 2


# Keep every state small so gradcheck stays fast; fields the models own.
TINY_HPARAMS: dict[str, dict[str, int]] = {"lmn": {"memory_size": 3}, "scrn": {"context_size": 2}}


def _build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> RecurrentForecaster:
    """Build a tiny model (`name+linK`: with a K-input linear readout); skip only when the
    model's own file does not exist yet."""
    torch.manual_seed(seed)
    name, _, lags = name.partition("+lin")
    try:
        model = build(
            name, D, HID, HORIZON, linear_lags=int(lags or 0), **TINY_HPARAMS.get(name, {})
        )
    except ModelError as exc:
        cause = exc.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name == _REGISTRY[name].module:
            pytest.skip(f"{_REGISTRY[name].module} does not exist yet")
        raise
    return model.to(dtype)


def _perturb(model: RecurrentForecaster, seed: int = 1) -> None:
    """Move every parameter off its initial value (zeros, ones) so no term is hidden."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


NAMES = model_names()
# Every model again with a linear readout of its last 3 inputs (forecaster/models/lagged.py).
VARIANTS = [*NAMES, *(f"{name}+lin3" for name in NAMES)]


def test_registry_lists_the_five_models() -> None:
    assert NAMES == ["gru", "lmn", "lstm", "mi_gru", "scrn"]


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_follow_the_contract(name: str) -> None:
    model = _build(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    states = model.run_states(x)
    assert states.shape == (B, T + 1, model.state_size)
    assert torch.equal(states[:, 0], torch.zeros(B, model.state_size, dtype=torch.float64))
    out = model(x)
    assert out.shape == (B, T, HORIZON)
    assert model.forecast(x).shape == (B, HORIZON)
    assert (model.forecast(x) - out[:, -1]).abs().max().item() <= 1e-12
    assert model.initial_state(B).shape == (B, model.state_size)
    assert model.initial_state(B).dtype == torch.float64
    assert model.step(x[:, 0], states[:, 0]).shape == (B, model.state_size)
    assert isinstance(model.supports_feedback, bool)
    assert model.name == name.partition("+lin")[0]


@pytest.mark.parametrize("name", VARIANTS)
def test_rows_are_independent_of_batch_size(name: str) -> None:
    model = _build(name)
    _perturb(model)
    x = torch.randn(B, T, D, dtype=torch.float64)
    full = model(x)
    for row in range(B):
        single = model(x[row : row + 1])
        assert (single[0] - full[row]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name", VARIANTS)
def test_step_loop_from_nonzero_state_agrees_with_forward(name: str) -> None:
    model = _build(name)
    _perturb(model)
    x = torch.randn(B, T, D, dtype=torch.float64)
    s0 = 0.5 * torch.randn(B, model.state_size, dtype=torch.float64)
    s = s0
    outputs = []
    for t in range(T):
        s = model.step(x[:, t], s)
        outputs.append(model.readout(s))
    expected = torch.stack(outputs, dim=1)  # [B, T, H]
    assert (model(x, s0) - expected).abs().max().item() <= 1e-10
    assert (model.run_states(x, s0)[:, -1] - s).abs().max().item() <= 1e-10


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", VARIANTS)
def test_o13_batched_recompute_reproduces_loop_states(
    name: str, dtype: torch.dtype, tol: float
) -> None:
    model = _build(name, dtype)
    _perturb(model)
    x = torch.randn(B, T, D, dtype=dtype)
    s0 = 0.5 * torch.randn(B, model.state_size, dtype=dtype)
    with torch.no_grad():
        states = model.run_states(x, s0)  # [B, T+1, S]
    recomputed = model.recompute_states(x, states[:, :-1].detach())
    assert recomputed.shape == (B, T, model.state_size)
    assert (recomputed - states[:, 1:]).abs().max().item() <= tol


@pytest.mark.parametrize("name", VARIANTS)
def test_recompute_rejects_states_of_the_wrong_shape(name: str) -> None:
    model = _build(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.raises(ModelError, match=r"s_prev: shape"):
        model.recompute_states(x, torch.zeros(B, T + 1, model.state_size, dtype=torch.float64))


@pytest.mark.parametrize("name", VARIANTS)
def test_wrong_input_width_is_refused_by_name(name: str) -> None:
    model = _build(name)
    with pytest.raises(ModelError, match=rf"x: shape \(3, 7, 9\) is not \[B, T, d\] with d = {D}"):
        model(torch.randn(B, T, 9, dtype=torch.float64))


class _Step(nn.Module):
    """`x [N, d], s [N, S] -> s'` through `model.step`, for functional_call."""

    def __init__(self, model: RecurrentForecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return self.model.step(x, s)


@pytest.mark.parametrize("name", VARIANTS)
def test_gradcheck_cell_step_inputs_and_parameters(name: str) -> None:
    model = _build(name, seed=3)
    _perturb(model)
    module = _Step(model)
    cell_params = [(n, p) for n, p in module.named_parameters() if not n.startswith("model.head.")]
    names = [n for n, _ in cell_params]
    values = tuple(p.detach().clone().requires_grad_(True) for _, p in cell_params)

    def step(x: Tensor, s: Tensor, *params: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x, s))

    x = torch.randn(2, model.input_size, dtype=torch.float64, requires_grad=True)
    s = 0.5 * torch.randn(2, model.state_size, dtype=torch.float64)
    assert torch.autograd.gradcheck(step, (x, s.requires_grad_(True), *values))


@pytest.mark.parametrize("name", VARIANTS)
def test_every_parameter_receives_a_gradient(name: str) -> None:
    model = _build(name)
    _perturb(model)
    x = torch.randn(B, T, D, dtype=torch.float64)
    model(x).square().sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().max().item() > 0, param_name


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_round_trip_restores_outputs(name: str) -> None:
    model = _build(name, seed=0)
    _perturb(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _build(name, seed=123)
    x = torch.randn(B, T, D, dtype=torch.float64)
    assert (fresh(x) - model(x)).abs().max().item() > 1e-6  # a different draw to start with
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), model(x))
    assert fresh.config == model.config  # type: ignore[attr-defined]


def _loop_with_varargs(*xs: Tensor) -> Tensor:  # TorchScript takes no variable arguments
    return xs[0]


def _loop(x: Tensor, steps: int) -> Tensor:
    for _ in range(steps):
        x = x + 1.0
    return x


def test_script_loop_scripts_or_declines_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A loop TorchScript compiles comes back scripted; one it cannot gives None and a warning
    naming its owner (the caller runs its eager loop)."""
    scripted = script_loop(_loop, "Test")
    assert isinstance(scripted, torch.jit.ScriptFunction)
    assert torch.equal(scripted(torch.zeros(2), 3), torch.full((2,), 3.0))
    with caplog.at_level("WARNING", logger="forecaster.models.base"):
        assert script_loop(_loop_with_varargs, "Other") is None
    assert "Other: the no-grad loop cannot be scripted" in caplog.text
