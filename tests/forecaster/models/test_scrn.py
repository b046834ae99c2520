"""SCRN: ALGORITHMS.md §2, oracles O4 and O13, the context equation step by step, gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch_helpers import ScriptedLoop, assert_cell_gradcheck

from forecaster.errors import ModelError
from forecaster.models import scrn as scrn_module
from forecaster.models.scrn import SCRN, SCRNConfig, _scripted_srn_states

F64 = torch.float64
BATCH, STEPS, FEATURES, HIDDEN, CONTEXT, HORIZON = 3, 7, 4, 5, 3, 2


def _scrn(alpha: float = 0.95, activation: str = "sigmoid", dtype: torch.dtype = F64) -> SCRN:
    torch.manual_seed(0)
    config = SCRNConfig(HIDDEN, CONTEXT, alpha, activation)  # type: ignore[arg-type]
    return SCRN(config, FEATURES, HORIZON).to(dtype)


def _inputs(dtype: torch.dtype = F64) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, STEPS, FEATURES, generator=gen).to(dtype)


def _state(dtype: torch.dtype = F64) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, CONTEXT + HIDDEN, generator=gen).to(dtype)


def _pieces(model: SCRN) -> dict[str, Tensor]:
    """The paper's matrices, read out of the fused layout."""
    return {
        "B": model.context_weight,
        "A": model.input_weight,
        "b": model.hidden_bias,
        "P": model.recurrent_weight[:, :CONTEXT],
        "R": model.recurrent_weight[:, CONTEXT:],
        "V": model.head.weight[:, :CONTEXT],
        "U": model.head.weight[:, CONTEXT:],
        "b_o": model.head.bias,
    }


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"SCRNConfig\.alpha: 1\.5 is not in \[0, 1\]"),
        ({"alpha": -0.1}, r"SCRNConfig\.alpha: -0\.1"),
        ({"alpha": float("nan")}, r"SCRNConfig\.alpha: nan"),
        ({"alpha": "0.9"}, r"SCRNConfig\.alpha: '0\.9'"),
        ({"hidden_size": 0}, r"SCRNConfig\.hidden_size: 0 is not a positive integer"),
        ({"context_size": True}, r"SCRNConfig\.context_size: True"),
        ({"activation": "relu"}, r"SCRNConfig\.activation: 'relu' is not one of"),
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        SCRNConfig(**kwargs)  # type: ignore[arg-type]


def test_alpha_is_fixed_and_exact_in_every_dtype() -> None:
    model = _scrn(alpha=0.9)
    assert isinstance(model.alpha, float)
    assert model.alpha == 0.9  # not a float32-rounded copy after .double()
    assert not any("alpha" in name for name, _ in model.named_parameters())
    assert model.state_size == CONTEXT + HIDDEN


# ---- equations and limits (§2.1, §2.2, O4) -----------------------------------------------------


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_context_and_hidden_updates_follow_the_equations_step_by_step(activation: str) -> None:
    model, x, s0 = _scrn(activation=activation), _inputs(), _state()
    act = torch.sigmoid if activation == "sigmoid" else torch.tanh
    w, alpha = _pieces(model), 0.95
    with torch.no_grad():
        states = model.run_states(x, s0)  # [B, T+1, c+h]
        for t in range(STEPS):
            s_prev, h_prev = states[:, t, :CONTEXT], states[:, t, CONTEXT:]
            s_t = (1 - alpha) * x[:, t] @ w["B"].T + alpha * s_prev
            h_t = act(s_t @ w["P"].T + x[:, t] @ w["A"].T + h_prev @ w["R"].T + w["b"])
            torch.testing.assert_close(states[:, t + 1, :CONTEXT], s_t, atol=1e-12, rtol=0)
            torch.testing.assert_close(states[:, t + 1, CONTEXT:], h_t, atol=1e-12, rtol=0)
        # y_t = U h_t + V s_t + b_o
        y = states[:, 1:, CONTEXT:] @ w["U"].T + states[:, 1:, :CONTEXT] @ w["V"].T + w["b_o"]
        torch.testing.assert_close(model(x, s0), y, atol=1e-12, rtol=0)


def test_alpha_one_freezes_the_context_exactly() -> None:
    """O4: α = 1 ⇒ s_t = s_0 for every t (exact)."""
    model, s0 = _scrn(alpha=1.0), _state()
    with torch.no_grad():
        states = model.run_states(_inputs(), s0)
    for t in range(STEPS + 1):
        assert torch.equal(states[:, t, :CONTEXT], s0[:, :CONTEXT])


def test_alpha_one_from_zero_context_is_the_srn() -> None:
    """O4: α = 1, s_0 = 0 ⇒ outputs of the SRN h_t = σ(A x_t + R h_{t−1} + b), y = U h_t + b_o."""
    model, x = _scrn(alpha=1.0), _inputs()
    w = _pieces(model)
    h = torch.zeros(BATCH, HIDDEN, dtype=F64)
    expected = []
    for t in range(STEPS):
        h = torch.sigmoid(x[:, t] @ w["A"].T + h @ w["R"].T + w["b"])
        expected.append(h @ w["U"].T + w["b_o"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.stack(expected, 1), atol=1e-12, rtol=0)


def test_alpha_zero_context_is_the_projected_input() -> None:
    """O4: α = 0 ⇒ s_t = B x_t, whatever s_0."""
    model, x = _scrn(alpha=0.0), _inputs()
    with torch.no_grad():
        states = model.run_states(x, _state())
        expected = x @ model.context_weight.T  # [B, T, c]
    torch.testing.assert_close(states[:, 1:, :CONTEXT], expected, atol=1e-12, rtol=0)


def test_zero_input_matrix_decays_the_context_geometrically() -> None:
    """O4: B = 0 ⇒ s_t = α^t s_0."""
    model, s0 = _scrn(alpha=0.8), _state()
    with torch.no_grad():
        model.context_weight.zero_()
        states = model.run_states(_inputs(), s0)
    for t in range(STEPS + 1):
        expected = 0.8**t * s0[:, :CONTEXT]
        torch.testing.assert_close(states[:, t, :CONTEXT], expected, atol=1e-12, rtol=0)


# ---- batched cell, gradients, scripting --------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_batched_recompute_equals_the_loop(dtype: torch.dtype, tol: float) -> None:
    """O13: one batched `recur` call on [B·T] rows reproduces the loop's states."""
    model, x = _scrn(dtype=dtype), _inputs(dtype)
    with torch.no_grad():
        states = model.run_states(x, _state(dtype))
        recomputed = model.recompute_states(x, states[:, :-1])
    torch.testing.assert_close(recomputed, states[:, 1:], atol=tol, rtol=0)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_the_scripted_no_grad_loop_gives_the_autograd_loops_states(activation: str) -> None:
    """Without autograd `run_states` runs `_srn_states` scripted; same states as the loop that
    autograd records (O13's loop)."""
    assert _scripted_srn_states() is not None
    model, x, s0 = _scrn(activation=activation), _inputs(), _state()
    recorded = model.run_states(x, s0)
    assert recorded.requires_grad
    with torch.no_grad():
        fast = model.run_states(x, s0)
    assert not fast.requires_grad
    torch.testing.assert_close(fast, recorded.detach(), atol=1e-12, rtol=0)


def test_without_the_scripted_loop_the_eager_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scrn_module, "_scripted_srn_states", lambda: None)
    model, x, s0 = _scrn(), _inputs(), _state()
    with torch.no_grad():
        eager = model.run_states(x, s0)
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model.run_states(x, s0), eager, atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_cell_passes_gradcheck(activation: str) -> None:
    torch.manual_seed(0)
    model = SCRN(SCRNConfig(3, 2, 0.7, activation), 2, HORIZON).double()  # type: ignore[arg-type]
    assert_cell_gradcheck(model, features=2)


def test_state_jacobian_has_the_block_form() -> None:
    """§2.1–2.2: ∂[s_t; h_t]/∂[s_{t−1}; h_{t−1}] = [[αI, 0], [diag(σ'_t) αP, diag(σ'_t) R]]."""
    model = _scrn(alpha=0.9)
    x, s = torch.randn(1, FEATURES, dtype=F64), torch.randn(1, CONTEXT + HIDDEN, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda s: model.step(x, s)[0], s)[:, 0]  # [S, S]
    h = model.step(x, s)[0, CONTEXT:].detach()
    slope = (h * (1 - h)).unsqueeze(1)  # σ' of the sigmoid, [h, 1]
    w = _pieces(model)
    expected = torch.zeros(CONTEXT + HIDDEN, CONTEXT + HIDDEN, dtype=F64)
    expected[:CONTEXT, :CONTEXT] = 0.9 * torch.eye(CONTEXT, dtype=F64)
    expected[CONTEXT:, :CONTEXT] = slope * 0.9 * w["P"].detach()
    expected[CONTEXT:, CONTEXT:] = slope * w["R"].detach()
    torch.testing.assert_close(jac, expected, atol=1e-14, rtol=0)


def test_cell_scripts_and_matches_forecast() -> None:
    model, x = _scrn(), _inputs()
    scripted = torch.jit.script(ScriptedLoop(model))
    out = scripted(x.transpose(0, 1).contiguous(), model.initial_state(BATCH))
    torch.testing.assert_close(out, model.forecast(x), atol=1e-12, rtol=0)
