"""GRU/LSTM baselines: the spelled-out `recur` equals torch's fused kernels (ALGORITHMS.md §0)."""

from __future__ import annotations

import torch

from forecaster.models.rnn import GRUConfig, GRUForecaster, LSTMConfig, LSTMForecaster

B, T, D, HID, HORIZON = 3, 7, 4, 5, 2


def _loop(model: GRUForecaster | LSTMForecaster, x: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """States after every step through `recur` only: `[B, T, S]`."""
    a = model.project_inputs(x)
    s, states = s0, []
    for t in range(x.size(1)):
        s = model.recur(a[:, t], s)
        states.append(s)
    return torch.stack(states, dim=1)


def test_gru_recur_equals_nn_gru_from_nonzero_state() -> None:
    torch.manual_seed(0)
    model = GRUForecaster(GRUConfig(hidden_size=HID), D, HORIZON).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    h0 = torch.randn(B, HID, dtype=torch.float64)
    fused, h_n = model.rnn(x, h0.unsqueeze(0))
    assert (_loop(model, x, h0) - fused).abs().max().item() <= 1e-12
    assert (model.run_states(x, h0)[:, -1] - h_n[0]).abs().max().item() == 0.0


def test_lstm_recur_equals_nn_lstm_hidden_and_cell_states() -> None:
    torch.manual_seed(1)
    model = LSTMForecaster(LSTMConfig(hidden_size=HID), D, HORIZON).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    h0 = torch.randn(B, HID, dtype=torch.float64)
    c0 = torch.randn(B, HID, dtype=torch.float64)
    fused, (h_n, c_n) = model.rnn(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    states = _loop(model, x, torch.cat([h0, c0], dim=1))  # [B, T, 2h]
    assert (states[..., :HID] - fused).abs().max().item() <= 1e-12
    assert (states[:, -1, HID:] - c_n[0]).abs().max().item() <= 1e-12
    assert (states[:, -1, :HID] - h_n[0]).abs().max().item() <= 1e-12


def test_lstm_state_is_h_then_c_and_head_reads_h_only() -> None:
    torch.manual_seed(2)
    model = LSTMForecaster(LSTMConfig(hidden_size=HID), D, HORIZON).double()
    assert model.state_size == 2 * HID
    s = torch.randn(B, 2 * HID, dtype=torch.float64)
    changed_c = s.clone()
    changed_c[:, HID:] += 1.0
    assert torch.equal(model.readout(s), model.readout(changed_c))
    assert torch.equal(model.readout(s), model.head(s[:, :HID]))


def test_feedback_capability_flags() -> None:
    assert GRUForecaster.supports_feedback
    assert not LSTMForecaster.supports_feedback  # ALGORITHMS.md §5.2: diagonal feedback on [h; c]
