"""SCRN: a simple recurrent network plus slow context units with a fixed self-weight α.

Mikolov, Joulin, Chopra, Mathieu, Ranzato 2015, "Learning Longer Memory in Recurrent Neural
Networks" (arXiv 1412.7753). Implements ALGORITHMS.md §2.1 with the identity readout used for
regression:

    s_t = (1 − α) B x_t + α s_{t−1}        context (slow) units   [N, c]
    h_t = σ(P s_t + A x_t + R h_{t−1} + b)  hidden (fast) units    [N, h]
    y_t = U h_t + V s_t + b_o               head on the carried state [s; h]

α is fixed (§2.2): a Python float attribute, not a parameter and not a buffer — a float32 buffer
would round 0.95 to 0.949999988 and `.double()` would keep that error; `config.alpha` is the
record, and TorchScript/ONNX see a constant. The hidden bias `b` and the head bias `b_o` are ours
[O]; the paper's equations have none. Pinned by oracles O4 (α = 1 freezes the context and, from
s_0 = 0, reduces to the SRN with the same A, R, U; α = 0 gives s_t = B x_t; B = 0 gives
s_t = α^t s_0), the step-by-step equation test, O13 (batched re-evaluation equals the loop) and
`torch.autograd.gradcheck` on the cell.

Computed form (§2.1's [O] derivation): substituting `s_t` into `h_t` makes SCRN an SRN on the
carried state `[s; h] [N, c + h]` with the block recurrent matrix `[[αI, 0], [αP, R]]` and the
input weight `[(1 − α) B; A + (1 − α) P B]`. So each step is ONE matmul of the carried state with
that matrix, an add, a split and the activation; the matrix is built from the parameters (ONNX
Runtime folds it to a constant; `run_states` builds it once per window). Measured against the
literal `MatMul([s_t; h_{t−1}], [P R]ᵀ)` of ALGORITHMS.md §7 (L = 336, h = 64, c = 16, 2 CPU
cores, shared): ONNX window graph at batch 1 2.3 → 1.2 ms (11 → 6 loop-body nodes after ONNX
Runtime's optimiser), batch 256 unchanged; eager forward and BPTT 1.3–2× faster.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from forecaster.errors import ModelError
from forecaster.models.base import RecurrentForecaster, script_loop

__all__ = ["SCRN", "SCRNConfig"]


def _srn_states(a: Tensor, s0: Tensor, matrix_t: Tensor, context: int, sigmoid: bool) -> Tensor:
    """The block-form SRN recurrence without autograd: `q_t = a_t + s_{t−1} Mᵀ`, then the
    activation on the hidden units `q_t[:, c:]`. `a [T, B, S], s0 [B, S], Mᵀ [S, S] ->
    [B, T+1, S]` (a view of time-major storage)."""
    steps = a.size(0)
    states = torch.empty(steps + 1, s0.size(0), s0.size(1), dtype=a.dtype, device=a.device)
    states[0] = s0
    for t in range(steps):
        nxt = torch.addmm(a[t], states[t], matrix_t, out=states[t + 1])  # [B, S]
        hidden = nxt[:, context:]
        if sigmoid:
            hidden.sigmoid_()
        else:
            hidden.tanh_()
    return states.transpose(0, 1)


@functools.cache
def _scripted_srn_states() -> Callable[..., Tensor] | None:
    """`_srn_states` scripted once per process (None if that fails)."""
    return script_loop(_srn_states, "SCRN")


def _srn_exact_deltas(
    g: Tensor, states: Tensor, matrix: Tensor, context: int, sigmoid: bool
) -> Tensor:
    """BPTT's reverse recursion `δ_t = g_t + J_{t+1}ᵀ δ_{t+1}` of the block-form SRN: with
    `q = a + s_{t−1} Mᵀ` and the activation on the hidden units, `J_tᵀ v = [v_c; v_h ⊙ σ'_t] M`,
    where the slope `σ'_t` comes from the stored `h_t` (sigmoid `h (1 − h)`, tanh `1 − h²`).
    `g [T, B, S]` direct gradients, `states [T+1, B, S]`, `M [S, S]` -> `δ [T, B, S]`, one
    `[B, S] x [S, S]` matmul per step."""
    steps = g.size(0)
    delta = torch.empty_like(g)
    d = g[steps - 1]
    delta[steps - 1] = d
    for t in range(steps - 2, -1, -1):
        h = states[t + 2, :, context:]  # h_{t+1}: the step through which δ_t reaches further
        slope = h - h * h if sigmoid else 1 - h * h
        dq = torch.cat([d[:, :context], d[:, context:] * slope], dim=1)  # [B, S]
        d = torch.addmm(g[t], dq, matrix)
        delta[t] = d
    return delta


@functools.cache
def _scripted_exact_deltas() -> Callable[..., Tensor] | None:
    """`_srn_exact_deltas` scripted once per process (None if that fails: the base class's
    per-step `state_vjp` loop gives the same `δ`)."""
    return script_loop(_srn_exact_deltas, "SCRN")


@dataclass(frozen=True)
class SCRNConfig:
    """Architectural hyper-parameters of the SCRN (ALGORITHMS.md §2)."""

    hidden_size: int = 64
    context_size: int = 16  # c: small next to h in the paper (tens of units)
    # Fixed context self-weight: half-life ln 0.5 / ln α ≈ 13.5 steps at 0.95 (§2.2).
    alpha: float = 0.95
    activation: Literal["sigmoid", "tanh"] = "sigmoid"

    def __post_init__(self) -> None:
        for key in ("hidden_size", "context_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(
                    f"SCRNConfig.{key}: {value!r} is not a positive integer", field=key
                )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ModelError(f"SCRNConfig.alpha: {alpha!r} is not in [0, 1]", field="alpha")
        if self.activation not in ("sigmoid", "tanh"):
            raise ModelError(
                f"SCRNConfig.activation: {self.activation!r} is not one of ['sigmoid', 'tanh']",
                field="activation",
            )


class SCRN(RecurrentForecaster):
    """SCRN forecaster; carried state `[s; h] [N, c + h]`, head weight `[V U] [H, c + h]`.

    Attributes:
        context_weight: `B [c, d]`.
        input_weight: `A [h, d]`; hidden_bias: `b [h]`.
        recurrent_weight: `[P R] [h, c + h]`.
        alpha: the fixed context self-weight (a float; never trained).
        head: `[V U] [H, c + h]`, `b_o [H]` (from the base class).
    """

    name = "scrn"
    supports_feedback = True

    def __init__(self, config: SCRNConfig, input_size: int, horizon: int) -> None:
        context, hidden = config.context_size, config.hidden_size
        super().__init__(input_size, hidden, horizon, state_size=context + hidden)
        self.config = config
        self.context_size = context
        self.alpha: Final[float] = float(config.alpha)
        self.context_weight = nn.Parameter(torch.empty(context, input_size))
        self.input_weight = nn.Parameter(torch.empty(hidden, input_size))
        self.hidden_bias = nn.Parameter(torch.empty(hidden))
        self.recurrent_weight = nn.Parameter(torch.empty(hidden, context + hidden))
        # [I_c 0]: zeros and ones stay exact in any dtype; α multiplies it at run time.
        self.register_buffer("context_rows", torch.eye(context, context + hidden), persistent=False)
        self.act = nn.Sigmoid() if config.activation == "sigmoid" else nn.Tanh()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform ±1/√h on every cell weight, as `nn.RNN` [O: the paper's init is not in §2]."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in (
            self.context_weight,
            self.input_weight,
            self.hidden_bias,
            self.recurrent_weight,
        ):
            nn.init.uniform_(weight, -bound, bound)

    def recurrent_matrix(self) -> Tensor:
        """`[[αI, 0], [αP, R]] [c + h, c + h]`: SCRN as an SRN on `[s; h]` (§2.1)."""
        c = self.context_size
        weight = self.recurrent_weight
        fast = torch.cat([self.alpha * weight[:, :c], weight[:, c:]], dim=1)  # [h, c + h]
        return torch.cat([self.alpha * self.context_rows, fast], dim=0)  # [c + h, c + h]

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., c + h]`: `[(1 − α) B x; (A + (1 − α) P B) x + b]` in one matmul."""
        c = self.context_size
        context = (1.0 - self.alpha) * self.context_weight  # [c, d]
        hidden = self.input_weight + self.recurrent_weight[:, :c] @ context  # [h, d]
        bias = torch.cat([self.hidden_bias.new_zeros([c]), self.hidden_bias])  # [c + h]
        return F.linear(x, torch.cat([context, hidden]), bias)  # [..., c + h]

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, c + h], [N, c + h] -> [N, c + h]`: one step of the block-form SRN."""
        return self._advance(a_t, s_prev, self.recurrent_matrix())

    def state_jacobian_diagonal(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """Closed-form diagonal of `∂[s; h]_t/∂[s; h]_{t−1}` (ALGORITHMS.md §2.2, §5.3).

        Context block exactly `α`; hidden block `σ'(q_h) ⊙ diag(R)`:
        `[..., d], [..., c + h] -> [..., c + h]`.
        """
        c = self.context_size
        q = self.project_inputs(x) + F.linear(s_prev, self.recurrent_matrix())  # [..., c + h]
        h = self.act(q[..., c:])  # [..., h]
        slope = h * (1 - h) if self.config.activation == "sigmoid" else 1 - h * h  # [..., h]
        r_diag = torch.diagonal(self.recurrent_weight[:, c:])  # [h]: R[i, i]
        return torch.cat([torch.full_like(s_prev[..., :c], self.alpha), slope * r_diag], dim=-1)

    def _advance(self, a_t: Tensor, s_prev: Tensor, matrix: Tensor) -> Tensor:
        q = a_t + F.linear(s_prev, matrix)  # [N, c + h] = [s_t; pre-activation of h_t]
        c = self.context_size
        return torch.cat([q[..., :c], self.act(q[..., c:])], dim=-1)  # [N, c + h]

    def run_states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`x [B, T, d] -> [B, T+1, c + h]`: the base loop, recurrent matrix built once.

        Without autograd (the fixed-feedback forward, validation) one scripted loop instead
        (`_srn_states`): per step one `addmm` written straight into the stored states and the
        activation in place on the hidden units, ~2x faster at h = 64, T = 336 on CPU.
        """
        self._check_input(x, s0)
        s = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        a = self.project_inputs(x.transpose(0, 1))  # [T, B, c + h]
        matrix = self.recurrent_matrix()  # [c + h, c + h]
        needs_grad = torch.is_grad_enabled() and (
            s.requires_grad or a.requires_grad or matrix.requires_grad
        )
        eager = needs_grad or torch.is_autocast_enabled(x.device.type)
        loop = None if eager else _scripted_srn_states()
        if loop is not None:
            with torch.no_grad():
                sigmoid = self.config.activation == "sigmoid"
                return loop(a, s, matrix.t(), self.context_size, sigmoid)  # type: ignore[no-any-return]
        states = [s]
        for a_t in a.unbind(0):
            s = self._advance(a_t, s, matrix)  # [B, c + h]
            states.append(s)
        return torch.stack(states, dim=1)  # [B, T+1, c + h]

    @torch.jit.ignore
    def exact_deltas(
        self, x: Tensor, states: Tensor, direct: Tensor, aux: Tensor | None = None
    ) -> Tensor:
        """`RecurrentForecaster.exact_deltas` as one scripted loop (`_srn_exact_deltas`): the
        stored hidden units give the activation's slope, so no `aux` is needed. The base class's
        per-step loop under autocast or when the loop cannot be scripted."""
        loop = _scripted_exact_deltas()
        if loop is None or torch.is_autocast_enabled(x.device.type):
            return super().exact_deltas(x, states, direct, aux)
        with torch.no_grad():
            matrix = self.recurrent_matrix()  # [S, S]
            delta = loop(
                direct.transpose(0, 1).to(matrix.dtype).contiguous(),  # [T, B, S]
                states.transpose(0, 1).to(matrix.dtype),  # [T+1, B, S]
                matrix,
                self.context_size,
                self.config.activation == "sigmoid",
            )
        return delta.transpose(0, 1)  # type: ignore[no-any-return]
