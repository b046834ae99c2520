"""A recurrent forecaster plus a linear readout of its last `K` inputs (`model.linear_lags`).

    s_t = [c_t; ℓ_t],   c_t = f(x_t, c_{t−1})          the wrapped model's cell, unchanged
                        ℓ_t = [x_{t−K+1}, …, x_t]       a shift register of the raw inputs
    ŷ_t = W_c c_t + W_ℓ ℓ_t + b                         one linear head on both

The register is part of the ONE carried state (DESIGN.md §5 contract), so the batched
re-evaluation, the ONNX window and step graphs and streaming serving need nothing new. With the
model input the series' first differences, `W_ℓ ℓ_t` is a linear map of the last `K` changes,
i.e. of the last `K` levels relative to the last one — the NLinear forecaster (Zeng et al. 2023,
"Are Transformers Effective for Time Series Forecasting?", arXiv 2205.13504) — and the recurrent
cell learns what a linear map of the window misses. `W_ℓ` starts at zero: at initialisation the
model forecasts exactly like the wrapped one.

Training reads the register from the inputs instead of the states (`window_readout`, `forward`):
`W_ℓ ℓ_t` for every step of a window is one convolution of the input sequence with `W_ℓ`, so
the `[B, T, K·d]` register is never multiplied out and no gradient is formed for it (at K = 336,
h = 64, T = 336 the lag readout was about half of a training step's time, for BPTT and feedback
alike). Single steps and the exported graphs keep `readout` on the carried state.

Feedback training: no parameter acts on the register (its input is the raw `x_t`) and the cell
never reads it, so the gradient never needs its `δ`; its exact Jacobian is a shift (zero
diagonal). `feedback_units` limits the feedback estimate to the cell's units, and
`feedback_core` hands the trainer the wrapped model, so the fixed-feedback step never builds the
register either (its forward, scan and re-evaluation run on the cell's `S_c` units).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from forecaster.errors import ModelError
from forecaster.models.base import RecurrentForecaster

__all__ = ["LinearLags", "with_linear_lags"]


class LinearLags(RecurrentForecaster):
    """`inner` plus a linear readout of its last `lags` inputs; state `[c; ℓ] [N, S_c + K·d]`.

    Attributes:
        inner: the wrapped forecaster (its own head is replaced by this model's).
        lags: `K`, inputs kept in the register.
        cell_size: `S_c`, the wrapped model's state width.
        head: `[W_c W_ℓ] [H, head_c + K·d]` over the wrapped model's head features and the register.
    """

    # Per-instance copies of the wrapped model's class attributes; TorchScript need not see them.
    __jit_ignored_attributes__ = ["name", "supports_feedback", "config"]  # noqa: RUF012

    def __init__(self, inner: RecurrentForecaster, lags: int) -> None:
        if isinstance(lags, bool) or not isinstance(lags, int) or lags < 1:
            raise ModelError(
                f"linear_lags: {lags!r} is not a positive integer", field="linear_lags"
            )
        width = lags * inner.input_size
        super().__init__(
            inner.input_size,
            inner.hidden_size,
            inner.horizon,
            state_size=inner.state_size + width,
            head_features=inner.head_features + width,
        )
        self.name = inner.name
        self.config = getattr(inner, "config", None)  # the wrapped model's hyper-parameters
        self.supports_feedback = inner.supports_feedback
        self.lags = lags
        self.cell_size = inner.state_size
        self.cell_head = inner.head_features
        self.sizes = [inner.state_size, width]
        # The head features must be contiguous for the plain head: cell head units first.
        self.contiguous_head = inner.head_features == inner.state_size
        with torch.no_grad():  # start as the wrapped model: its head, zero weight on the lags
            self.head.weight.zero_()
            self.head.weight[:, : inner.head_features].copy_(inner.head.weight)
            self.head.bias.copy_(inner.head.bias)
        del inner.head  # one head: this model's
        self.inner = inner

    @torch.jit.ignore
    def feedback_core(self) -> RecurrentForecaster:
        """The wrapped model: the fixed-feedback trainer differentiates its recurrence alone
        (the register has no parameters and the cell never reads it)."""
        return self.inner

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., P_c + d]`: the cell's projections, then the raw input."""
        return torch.cat([self.inner.project_inputs(x), x], dim=-1)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, P_c + d], [N, S_c + K·d] -> [N, S_c + K·d]`: the cell step and a register shift."""
        d = self.input_size
        cell, register = torch.split(s_prev, self.sizes, dim=-1)
        a_cell, x_t = torch.split(a_t, [a_t.size(-1) - d, d], dim=-1)
        new_cell = self.inner.recur(a_cell, cell)
        return torch.cat([new_cell, register[..., d:], x_t], dim=-1)

    @torch.jit.ignore
    def cell_backward(
        self, x: Tensor, s_prev: Tensor, delta: Tensor, aux: Tensor | None = None
    ) -> None:
        """The cell's `cell_backward` on its part of the state: the register's shift has no
        parameters. (No `feedback_forward` here, so `aux` is always None.)"""
        cell = self.cell_size
        self.inner.cell_backward(x, s_prev[:, :cell], delta[:, :cell], aux)

    def readout(self, s: Tensor) -> Tensor:
        """`[..., S] -> [..., H]`: `W_c c + W_ℓ ℓ + b`."""
        if self.contiguous_head:
            return self.head(s)
        cell, register = torch.split(s, self.sizes, dim=-1)
        return self.head(torch.cat([cell[..., : self.cell_head], register], dim=-1))

    @torch.jit.ignore
    def window_readout(self, s: Tensor, x: Tensor, s0: Tensor) -> Tensor:
        """`readout` of a window's states `s [B, T, S]` (or the wrapped model's alone,
        `[B, T, S_c]`), with the register read from its inputs:
        `W_c c_t + b` from `s`, and `W_ℓ ℓ_t` for all `t` as one convolution of `s0`'s register
        and `x` with `W_ℓ` (`ℓ_t` is a sliding window of them), so no register is multiplied
        out and no gradient is formed for the register units of `s`, which no parameter
        produces. Equal to `readout(s)` up to rounding when `s` are the window's states."""
        return self._window_forecasts(s[..., : self.cell_size], x, s0)

    @torch.jit.ignore
    def forward(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`x [B, T, d] -> [B, T, H]`: the wrapped model's states, then `window_readout` (the
        register is never built)."""
        self._check_input(x, s0)
        s0 = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        cells = self.inner.run_states(x, s0[:, : self.cell_size])  # [B, T+1, S_c]
        return self._window_forecasts(cells[:, 1:], x, s0)

    def _window_forecasts(self, cells: Tensor, x: Tensor, s0: Tensor) -> Tensor:
        """`cells [B, T, S_c]`, `x [B, T, d]`, `s0 [B, S]` -> `[B, T, H]`."""
        batch, steps, d = x.shape
        if cells.shape[:2] != (batch, steps) or s0.shape != (batch, self.state_size):
            raise ModelError(
                f"states: shapes {tuple(cells.shape)} and s0 {tuple(s0.shape)} do not match a "
                f"window x of shape {tuple(x.shape)} with state size {self.state_size}",
                field="states",
            )
        weight, features = self.head.weight, self.cell_head
        pred = F.linear(cells[..., :features], weight[:, :features], self.head.bias)  # [B, T, H]
        past = s0[:, self.cell_size :].reshape(batch, self.lags, d)[:, 1:]  # [B, K−1, d]
        sequence = torch.cat([past, x], dim=1).transpose(1, 2)  # [B, d, K−1+T]
        # ℓ_t[j·d + i] = sequence[i, t + j]: W_ℓ as a kernel [H, d, K] (cross-correlation).
        kernel = weight[:, features:].reshape(self.horizon, self.lags, d).transpose(1, 2)
        lagged = F.conv1d(sequence, kernel)  # [B, H, T]
        return pred + lagged.transpose(1, 2)

    def state_jacobian_diagonal(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """The cell's closed-form diagonal; zeros on the register (a shift has none)."""
        closed_form = getattr(self.inner, "state_jacobian_diagonal", None)
        if closed_form is None:
            raise ModelError(
                f"model {self.name!r} has no closed-form state_jacobian_diagonal", field="method"
            )
        cell = s_prev[..., : self.cell_size]
        diagonal = closed_form(x, cell)
        return torch.cat([diagonal, torch.zeros_like(s_prev[..., self.cell_size :])], dim=-1)

    def jacobian_statistic(self, x: Tensor, s_prev: Tensor) -> Tensor | None:
        """The cell's statistic for its closed-form mean Jacobian (`mean_jacobian`), or None
        when the cell has none."""
        closed_form = getattr(self.inner, "jacobian_statistic", None)
        if closed_form is None:
            return None
        return closed_form(x, s_prev[..., : self.cell_size])  # type: ignore[no-any-return]

    def mean_jacobian(self, statistic: Tensor, matrix: bool) -> Tensor:
        """The cell's mean Jacobian, zero on the register's rows and columns (as
        `feedback_units` asks: a shift's diagonal is zero and no parameter sees its `δ`)."""
        inner = self.inner.mean_jacobian(statistic, matrix)  # type: ignore[operator]
        width = self.state_size
        if matrix:
            out = inner.new_zeros(width, width)
            out[: self.cell_size, : self.cell_size] = inner
            return out  # type: ignore[no-any-return]
        return torch.cat([inner, inner.new_zeros(width - self.cell_size)])

    @torch.jit.ignore
    def run_states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`x [B, T, d] -> [B, T+1, S]`: the wrapped model's own loop (fused kernels kept) for
        the cell, the register as sliding windows of the zero- (or `s0`-) padded input."""
        self._check_input(x, s0)
        batch, steps, d = x.shape
        s0 = self.initial_state(batch, x.device, x.dtype) if s0 is None else s0
        cells = self.inner.run_states(x, s0[:, : self.cell_size])  # [B, T+1, S_c]
        past = s0[:, self.cell_size :].reshape(batch, self.lags, d)  # [B, K, d], oldest first
        full = torch.cat([past, x], dim=1)  # [B, K + T, d]
        windows = full.unfold(1, self.lags, 1)  # [B, T+1, d, K]
        register = windows.transpose(-1, -2).reshape(batch, steps + 1, self.lags * d)
        return torch.cat([cells, register], dim=-1)  # [B, T+1, S]


def with_linear_lags(model: RecurrentForecaster, lags: int) -> RecurrentForecaster:
    """`model` itself when `lags` is 0, else `LinearLags(model, lags)`."""
    return model if lags == 0 else LinearLags(model, lags)
