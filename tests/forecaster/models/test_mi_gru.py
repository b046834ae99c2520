"""MI-GRU oracles O1–O3 (ALGORITHMS.md §1, §6) and its initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from forecaster.models import mi_gru as mi_gru_module
from forecaster.models.base import RecurrentForecaster
from forecaster.models.mi_gru import MiGRU, MiGRUCell, MiGRUConfig

B, T, D, HID, HORIZON = 3, 7, 4, 5, 2


def _gru_pair(dtype: torch.dtype) -> tuple[MiGRU, nn.GRU]:
    """An MI-GRU with α = 0, β1 = β2 = 1 and an `nn.GRU` holding the same W, U, b_i, b_h."""
    torch.manual_seed(0)
    gru = nn.GRU(D, HID, batch_first=True).to(dtype)
    model = MiGRU(MiGRUConfig(hidden_size=HID, mi_init="gru"), D, HORIZON).to(dtype)
    with torch.no_grad():
        model.cell.weight_ih.copy_(gru.weight_ih_l0)
        model.cell.weight_hh.copy_(gru.weight_hh_l0)
        model.cell.bias_ih.copy_(gru.bias_ih_l0)
        model.cell.bias_hh.copy_(gru.bias_hh_l0)
    return model, gru


def _literal_mi_gru_step(cell: MiGRUCell, x: Tensor, h: Tensor) -> Tensor:
    """ALGORITHMS.md §1.2 written out term by term: `x [N, d], h [N, h] -> [N, h]`."""
    a_x = (F.linear(x, cell.weight_ih, cell.bias_ih)).chunk(3, dim=1)
    a_h = (F.linear(h, cell.weight_hh, cell.bias_hh)).chunk(3, dim=1)
    alpha, beta1, beta2 = (p.chunk(3) for p in (cell.alpha, cell.beta1, cell.beta2))
    r = torch.sigmoid(alpha[0] * a_x[0] * a_h[0] + beta1[0] * a_h[0] + beta2[0] * a_x[0])
    z = torch.sigmoid(alpha[1] * a_x[1] * a_h[1] + beta1[1] * a_h[1] + beta2[1] * a_x[1])
    u = r * a_h[2]
    n = torch.tanh(alpha[2] * a_x[2] * u + beta1[2] * u + beta2[2] * a_x[2])
    return (1 - z) * n + z * h


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_o1_mi_gru_with_alpha0_beta1_equals_nn_gru_outputs_and_gradients(
    dtype: torch.dtype, tol: float
) -> None:
    model, gru = _gru_pair(dtype)
    x = torch.randn(B, T, D, dtype=dtype)
    h0 = torch.randn(B, HID, dtype=dtype)
    ours = model.run_states(x, h0)[:, 1:]  # [B, T, h]
    theirs, _ = gru(x, h0.unsqueeze(0))
    assert (ours - theirs).abs().max().item() <= tol

    weights = torch.randn(B, T, HID, dtype=dtype)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    pairs = {
        "weight_ih": gru.weight_ih_l0,
        "weight_hh": gru.weight_hh_l0,
        "bias_ih": gru.bias_ih_l0,
        "bias_hh": gru.bias_hh_l0,
    }
    for name, reference in pairs.items():
        grad = getattr(model.cell, name).grad
        assert (grad - reference.grad).abs().max().item() <= tol, name
    # At α = 0 the product term still receives gradient ∂/∂α = aˣ ⊙ aʰ (§1.3).
    assert model.cell.alpha.grad.abs().max().item() > 0


def test_cell_matches_literal_equations_for_random_alpha_beta() -> None:
    torch.manual_seed(1)
    cell = MiGRUCell(D, HID).double()
    with torch.no_grad():
        for p in (cell.alpha, cell.beta1, cell.beta2):
            p.copy_(torch.randn_like(p))
    x, h = torch.randn(B, D, dtype=torch.float64), torch.randn(B, HID, dtype=torch.float64)
    expected = _literal_mi_gru_step(cell, x, h)
    assert (cell(cell.project(x), h) - expected).abs().max().item() <= 1e-12


def test_o2_product_only_block_gives_wx_times_uz() -> None:
    """β1 = β2 = 0, b = 0, α = 1: every gate is `σ/tanh(Wx ⊙ Uz)` (reset inside for n)."""
    torch.manual_seed(2)
    cell = MiGRUCell(D, HID).double()
    with torch.no_grad():
        cell.alpha.fill_(1.0)
        cell.beta1.zero_()
        cell.beta2.zero_()
        cell.bias_ih.zero_()
        cell.bias_hh.zero_()
    x, h = torch.randn(B, D, dtype=torch.float64), torch.randn(B, HID, dtype=torch.float64)
    wx = F.linear(x, cell.weight_ih).chunk(3, dim=1)
    uh = F.linear(h, cell.weight_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(wx[0] * uh[0]), torch.sigmoid(wx[1] * uh[1])
    n = torch.tanh(wx[2] * (r * uh[2]))
    expected = (1 - z) * n + z * h
    assert (cell(cell.project(x), h) - expected).abs().max().item() <= 1e-12


def test_o2_alpha0_block_is_additive_with_gates() -> None:
    """α = 0: gates are `σ(β1⊙aʰ + β2⊙aˣ)`, whatever β1, β2."""
    torch.manual_seed(3)
    cell = MiGRUCell(D, HID).double()
    with torch.no_grad():
        cell.beta1.copy_(torch.rand_like(cell.beta1) + 0.5)
        cell.beta2.copy_(torch.rand_like(cell.beta2) + 0.5)
    x, h = torch.randn(B, D, dtype=torch.float64), torch.randn(B, HID, dtype=torch.float64)
    a_x = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, dim=1)
    a_h = F.linear(h, cell.weight_hh, cell.bias_hh).chunk(3, dim=1)
    b1, b2 = cell.beta1.chunk(3), cell.beta2.chunk(3)
    r = torch.sigmoid(b1[0] * a_h[0] + b2[0] * a_x[0])
    z = torch.sigmoid(b1[1] * a_h[1] + b2[1] * a_x[1])
    n = torch.tanh(b1[2] * (r * a_h[2]) + b2[2] * a_x[2])
    expected = (1 - z) * n + z * h
    assert (cell(cell.project(x), h) - expected).abs().max().item() <= 1e-12


class _CellStep(nn.Module):
    """`x [N, d], h [N, h] -> h'`: projection and recurrence of a cell, for gradcheck."""

    def __init__(self, cell: MiGRUCell) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return self.cell(self.cell.project(x), h)


def test_o2_gradcheck_mi_gru_cell_inputs_and_parameters() -> None:
    torch.manual_seed(4)
    module = _CellStep(MiGRUCell(3, 4, mi_init="mi")).double()
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def step(x: Tensor, h: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), (x, h))

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(step, (x, h, *params))


class _MiRNN(nn.Module):
    """One-layer MI-RNN `h' = tanh(α⊙Wx⊙Uh + β1⊙Uh + β2⊙Wx + b)` for oracle O3."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, d))
        self.u = nn.Parameter(torch.randn(h, h) / h**0.5)
        self.alpha = nn.Parameter(torch.randn(h))
        self.beta1 = nn.Parameter(torch.randn(h))
        self.beta2 = nn.Parameter(torch.randn(h))
        self.b = nn.Parameter(torch.randn(h))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        wx, uh = self.w @ x, self.u @ h
        return torch.tanh(self.alpha * wx * uh + self.beta1 * uh + self.beta2 * wx + self.b)


def test_o3_mi_rnn_jacobian_is_diag_phi_prime_times_diag_gain_times_u() -> None:
    torch.manual_seed(5)
    rnn = _MiRNN(D, HID).double()
    x, h = torch.randn(D, dtype=torch.float64), torch.randn(HID, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda state: rnn(x, state), h)  # [h, h]
    with torch.no_grad():
        phi_prime = 1 - rnn(x, h) ** 2
        gain = rnn.alpha * (rnn.w @ x) + rnn.beta1
        expected = torch.diag(phi_prime) @ torch.diag(gain) @ rnn.u
    assert (jacobian - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize(("mi_init", "alpha"), [("gru", 0.0), ("mi", 1.0)])
def test_initialisation_follows_mi_init(mi_init: str, alpha: float) -> None:
    cell = MiGRU(MiGRUConfig(hidden_size=HID, mi_init=mi_init), D, HORIZON).cell  # type: ignore[arg-type]
    assert torch.equal(cell.alpha, torch.full((3 * HID,), alpha))
    assert torch.equal(cell.beta1, torch.ones(3 * HID))
    assert torch.equal(cell.beta2, torch.ones(3 * HID))
    bound = 1 / HID**0.5
    for weight in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh):
        assert weight.abs().max().item() <= bound
        assert weight.std().item() > bound / 4  # uniform, not zeros


def test_mi_init_mi_differs_from_gru_on_same_weights() -> None:
    torch.manual_seed(6)
    gru_start = MiGRU(MiGRUConfig(hidden_size=HID, mi_init="gru"), D, HORIZON).double()
    mi_start = MiGRU(MiGRUConfig(hidden_size=HID, mi_init="mi"), D, HORIZON).double()
    mi_start.load_state_dict(gru_start.state_dict())
    with torch.no_grad():
        mi_start.cell.alpha.fill_(1.0)
    x = torch.randn(B, T, D, dtype=torch.float64)
    assert (gru_start(x) - mi_start(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("steps", [1, T, 70])  # 70: more than one block of projected steps
def test_feedback_forward_keeps_u_and_the_gates(steps: int) -> None:
    """`feedback_forward`: the generic loop's states, and per step `[u; r; z; n]` with
    `u = U h_{t−1} + b_h` and the gates of the literal equations, time-major."""
    torch.manual_seed(0)
    model = MiGRU(MiGRUConfig(hidden_size=HID, mi_init="mi"), D, HORIZON).to(torch.float64)
    with torch.no_grad():
        model.cell.alpha.uniform_(-1.0, 1.0)
        model.cell.beta2.uniform_(0.5, 1.5)
    x = torch.randn(B, steps, D, dtype=torch.float64)
    s0 = torch.randn(B, HID, dtype=torch.float64)
    kept = model.feedback_forward(x, s0)
    assert kept is not None
    states, aux = kept
    cell = model.cell
    with torch.no_grad():
        reference = RecurrentForecaster.run_states(model, x, s0)  # [B, T+1, h]
        h_prev = reference[:, :-1].transpose(0, 1)  # [T, B, h]
        u = F.linear(h_prev, cell.weight_hh, cell.bias_hh)  # [T, B, 3h]
        a_x = F.linear(x.transpose(0, 1), cell.weight_ih, cell.bias_ih)  # [T, B, 3h]
        pre = cell.alpha * a_x * u + cell.beta1 * u  # reset applied to U's part of n below
        r = torch.sigmoid(pre[..., :HID] + (cell.beta2 * a_x)[..., :HID])
        z = torch.sigmoid(pre[..., HID : 2 * HID] + (cell.beta2 * a_x)[..., HID : 2 * HID])
        n = torch.tanh(r * pre[..., 2 * HID :] + (cell.beta2 * a_x)[..., 2 * HID :])
    torch.testing.assert_close(states, reference, atol=1e-12, rtol=0)
    assert aux.shape == (steps, B, 6 * HID)
    torch.testing.assert_close(aux, torch.cat([u, r, z, n], dim=-1), atol=1e-12, rtol=0)


def test_without_the_scripted_loop_feedback_forward_declines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the kept-values loop cannot be scripted, `feedback_forward` returns None: the
    trainer then runs the generic loop and the autograd cell backward."""
    monkeypatch.setattr(mi_gru_module, "_scripted_kept_states", lambda: None)
    model = MiGRU(MiGRUConfig(hidden_size=HID), D, HORIZON)
    assert model.feedback_forward(torch.randn(B, T, D), torch.zeros(B, HID)) is None
