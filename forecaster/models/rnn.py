"""GRU and LSTM baselines over torch's fused kernels (`torch.nn.GRU`, `torch.nn.LSTM`).

Cho et al. 2014 (arXiv 1406.1078) and Hochreiter & Schmidhuber 1997, in `torch.nn`'s conventions
(ALGORITHMS.md §0 "GRU convention"; gate order r, z, n and i, f, g, o). The full-window paths use
the fused kernel (cuDNN on a GPU, the native ONNX `GRU`/`LSTM` op after export, ALGORITHMS.md §7);
`recur` spells out the same equations on the same weights so the fixed-feedback trainer can
re-evaluate all steps in one batched call (ALGORITHMS.md §5.2; oracle O13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from forecaster.models.base import RecurrentForecaster


@dataclass(frozen=True)
class GRUConfig:
    """Architectural hyper-parameters of the GRU baseline (one layer)."""

    hidden_size: int = 64


@dataclass(frozen=True)
class LSTMConfig:
    """Architectural hyper-parameters of the LSTM baseline (one layer)."""

    hidden_size: int = 64


class GRUForecaster(RecurrentForecaster):
    """One-layer `nn.GRU` plus a linear head; carried state `h [N, h]`."""

    name = "gru"
    supports_feedback = True

    def __init__(self, config: GRUConfig, input_size: int, horizon: int) -> None:
        super().__init__(input_size, config.hidden_size, horizon, state_size=config.hidden_size)
        self.config = config
        self.rnn = nn.GRU(input_size, config.hidden_size, num_layers=1, batch_first=True)

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., 3h]`: `W x + b_i` (gates r, z, n)."""
        return F.linear(x, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, 3h], [N, h] -> [N, h]`: torch's GRU update (reset after `U`)."""
        hs = self.hidden_size
        a_h = F.linear(s_prev, self.rnn.weight_hh_l0, self.rnn.bias_hh_l0)  # [N, 3h]
        rz = torch.sigmoid(a_t[:, : 2 * hs] + a_h[:, : 2 * hs])  # [N, 2h]
        r, z = rz[:, :hs], rz[:, hs:]  # [N, h] each
        n = torch.tanh(a_t[:, 2 * hs :] + r * a_h[:, 2 * hs :])  # [N, h]
        return n + z * (s_prev - n)  # [N, h]

    def state_jacobian_diagonal(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """Closed-form diagonal of `∂h_t/∂h_{t−1}`, ALGORITHMS.md §5.3 (MI-GRU's, α = 0, β = 1).

        `z + (h − n) z(1−z) U_z[i,i] + (1−z)(1−n²)(r(1−r) U_r[i,i] u_n + r U_n[i,i])` with
        `u = U h + b_h`: `x [..., d], s_prev [..., h] -> [..., h]`.
        """
        hs = self.hidden_size
        a_x = self.project_inputs(x)  # [..., 3h]
        a_h = F.linear(s_prev, self.rnn.weight_hh_l0, self.rnn.bias_hh_l0)  # [..., 3h]
        rz = torch.sigmoid(a_x[..., : 2 * hs] + a_h[..., : 2 * hs])  # [..., 2h]
        r, z = rz[..., :hs], rz[..., hs:]  # [..., h] each
        n = torch.tanh(a_x[..., 2 * hs :] + r * a_h[..., 2 * hs :])  # [..., h]
        u_diag = torch.diagonal(self.rnn.weight_hh_l0.reshape(3, hs, hs), dim1=1, dim2=2)  # [3, h]
        dn = (1 - n * n) * (r * (1 - r) * u_diag[0] * a_h[..., 2 * hs :] + r * u_diag[2])
        return z + (s_prev - n) * z * (1 - z) * u_diag[1] + (1 - z) * dn  # [..., h]

    def run_states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`x [B, T, d] -> [B, T+1, h]` through the fused kernel."""
        self._check_input(x, s0)
        h0 = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        out, _ = self.rnn(x, h0.unsqueeze(0).contiguous())  # [B, T, h]
        return torch.cat([h0.unsqueeze(1), out], dim=1)  # [B, T+1, h]

    @torch.jit.ignore
    def forward(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`x [B, T, d] -> [B, T, H]` through the fused kernel."""
        self._check_input(x, s0)
        h0 = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        out, _ = self.rnn(x, h0.unsqueeze(0).contiguous())  # [B, T, h]
        return self.readout(out)


class LSTMForecaster(RecurrentForecaster):
    """One-layer `nn.LSTM` plus a linear head on `h`; carried state `[h; c]` (`S = 2h`).

    `supports_feedback` is False: a diagonal feedback on `[h; c]` never moves gradient from `h`
    into `c` (ALGORITHMS.md §5.2), so the baseline trains with BPTT by default.
    """

    name = "lstm"
    supports_feedback = False

    def __init__(self, config: LSTMConfig, input_size: int, horizon: int) -> None:
        super().__init__(
            input_size,
            config.hidden_size,
            horizon,
            state_size=2 * config.hidden_size,
            head_features=config.hidden_size,
        )
        self.config = config
        self.rnn = nn.LSTM(input_size, config.hidden_size, num_layers=1, batch_first=True)

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., 4h]`: `W x + b_i` (gates i, f, g, o)."""
        return F.linear(x, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, 4h], [N, 2h] -> [N, 2h]`: torch's LSTM update on the state `[h; c]`."""
        hs = self.hidden_size
        h, c = s_prev[:, :hs], s_prev[:, hs:]  # [N, h] each
        gates = a_t + F.linear(h, self.rnn.weight_hh_l0, self.rnn.bias_hh_l0)  # [N, 4h]
        ifo = torch.sigmoid(torch.cat([gates[:, : 2 * hs], gates[:, 3 * hs :]], dim=1))  # [N, 3h]
        g = torch.tanh(gates[:, 2 * hs : 3 * hs])  # [N, h]
        c_new = ifo[:, hs : 2 * hs] * c + ifo[:, :hs] * g  # [N, h]
        h_new = ifo[:, 2 * hs :] * torch.tanh(c_new)  # [N, h]
        return torch.cat([h_new, c_new], dim=1)  # [N, 2h]

    # run_states keeps the base loop: the fused kernel returns only the final cell state c.

    @torch.jit.ignore
    def forward(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`x [B, T, d] -> [B, T, H]` through the fused kernel."""
        self._check_input(x, s0)
        s0 = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        hs = self.hidden_size
        h0 = s0[:, :hs].unsqueeze(0).contiguous()  # [1, B, h]
        c0 = s0[:, hs:].unsqueeze(0).contiguous()  # [1, B, h]
        out, _ = self.rnn(x, (h0, c0))  # [B, T, h]
        return self.head(out)
