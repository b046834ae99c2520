"""Linear Memory Network: a nonlinear functional component plus a linear memory, and the
closed-form linear-autoencoder pretraining of that memory.

Bacciu, Carta, Sperduti 2018, "Linear Memory Networks" (arXiv 1811.03356). Implements
ALGORITHMS.md §3.1 (cell; readout from the memory), §3.2 (linear autoencoder for sequences, solved
by a thin SVD of the reversed-history matrix Ξ, or by an eigendecomposition of its Gram matrix ΞᵀΞ
when Ξ is tall) and §3.3 (pretraining: `teacher_laes` from a plain RNN's hidden states, our
derivation; `input_laes` from the inputs, the authors' group's later scheme). Pinned by oracles
O5 (autoencoder exactness at p = rank Ξ), O6 (one-step reconstruction error non-increasing in p,
zero at p = rank), O7 (the teacher-initialised LMN reproduces the teacher) and O13 (batched
re-evaluation equals the loop); `torch.autograd.gradcheck` on the cell.

The carried state is the memory `m [N, p]` only: `h_t` is a function of `x_t` and `m_{t−1}`, and
the head reads `m_t` (`ŷ = W^{mo} m + b_o`). `recur` (the batched re-evaluation and the exported
step graph): one matmul `W^{mh} m`, the activation, and one fused matmul of `[h; m]` with
`[W^{hm} W^{mm}]` (ALGORITHMS.md §7). The time loop (`run_states`: BPTT, `forward`; and the
fixed-feedback forward, which also keeps the gates) runs a folded form instead, with the
activation's scale and shift moved into the weights (`tanh z = 2 sigmoid(2z) − 1`): one sigmoid
and three matmuls per step, no concatenation (`LMN._folded_weights`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from forecaster.errors import ModelError
from forecaster.models.base import RecurrentForecaster, accumulate_grads, script_loop

if TYPE_CHECKING:
    import numpy.typing as npt

    SequencesLike = Tensor | npt.NDArray | Sequence[Tensor | npt.NDArray]

__all__ = [
    "LMN",
    "LMNConfig",
    "LinearAutoencoder",
    "TeacherRNN",
    "decode",
    "encode",
    "fit_linear_autoencoder",
    "init_lmn_from_inputs",
    "init_lmn_from_teacher",
    "pretrain_lmn",
]


# Beyond this width L·k of a history row, Ξ (or its Gram matrix) no longer fits comfortably in
# memory; the caller should shorten `history` instead [O].
_MAX_HISTORY_WIDTH = 8192


def _check_positive(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{owner}.{field}: {value!r} is not a positive integer", field=field)


def _check_choice(owner: str, field: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ModelError(f"{owner}.{field}: {value!r} is not one of {list(valid)}", field=field)


def _activation(name: str) -> nn.Module:
    return nn.Tanh() if name == "tanh" else nn.Sigmoid()


# Steps whose input projections the no-grad loop computes at once (as the generic loop does).
_LOOP_BLOCK = 32


def _activation_scale(activation: str) -> float:
    """`c` of `σ_act(z) = c·sigmoid(c·z) − (c − 1)`: 2 for tanh (`tanh z = 2 sigmoid(2z) − 1`),
    1 for the sigmoid. On CPU `sigmoid` runs several times faster than `tanh`, and the scale and
    shift fold into the weights (`_sigmoid_states`)."""
    return 2.0 if activation == "tanh" else 1.0


def _sigmoid_states(
    x: Tensor,
    s0: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    w_mh: Tensor,
    w_hm: Tensor,
    w_mm: Tensor,
    b_m: Tensor,
    block: int,
) -> tuple[Tensor, Tensor]:
    """The LMN recurrence without autograd, in the folded form of `LMN.feedback_forward`:
    `u_t = sigmoid(W_in x_t + b_in + W_mh m_{t−1})`, `m_t = W_mm m_{t−1} + W_hm u_t + b_m`.
    Returns `(m [B, T+1, p]` (a view of time-major storage), `u [T, B, h])`."""
    xt = x.transpose(0, 1).contiguous()  # [T, B, d]
    steps, batch = xt.size(0), xt.size(1)
    states = torch.empty(steps + 1, batch, s0.size(1), dtype=x.dtype, device=x.device)
    gates = torch.empty(steps, batch, w_mh.size(0), dtype=x.dtype, device=x.device)
    states[0] = s0
    w_mh_t, w_hm_t, w_mm_t = w_mh.t(), w_hm.t(), w_mm.t()
    for start in range(0, steps, block):
        a = F.linear(xt[start : start + block], w_in, b_in)  # [L, B, h]
        for i in range(a.size(0)):
            t = start + i
            torch.sigmoid(torch.addmm(a[i], states[t], w_mh_t), out=gates[t])  # [B, h]
            memory = torch.addmm(b_m, states[t], w_mm_t)  # [B, p]
            torch.addmm(memory, gates[t], w_hm_t, out=states[t + 1])
    return states.transpose(0, 1), gates


@functools.cache
def _scripted_sigmoid_states() -> Callable[..., tuple[Tensor, Tensor]] | None:
    """`_sigmoid_states` scripted once per process (None if that fails: the generic scripted
    loop gives the same states)."""
    return script_loop(_sigmoid_states, "LMN")


def _memory_vjp(
    v: Tensor, slope: Tensor, stacked: Tensor, w_mh: Tensor, base: Tensor | None, out: Tensor
) -> Tensor:
    """`J_tᵀ v` of the folded LMN step (`LMN.state_vjp`) for rows `v [N, p]`: `v W^{mm} + dz W^{mh}`
    with `dz = (v c² W^{hm}) ⊙ u (1 − u)`, plus `base [N, p]` when given; written into and
    returned as `out [N, p]`. `slope` = `u (1 − u) [N, h]` from the kept gates, `stacked` =
    `[c² W^{hm}, W^{mm}] [p, h + p]`: both products of `v` in one matmul."""
    hidden = slope.size(1)
    both = torch.mm(v, stacked)  # [N, h + p]
    dz = both[:, :hidden].mul_(slope)  # [N, h]
    memory = both[:, hidden:] if base is None else both[:, hidden:].add_(base)  # [N, p]
    return torch.addmm(memory, dz, w_mh, out=out)


def _exact_deltas(g: Tensor, u: Tensor, stacked: Tensor, w_mh: Tensor) -> Tensor:
    """BPTT's reverse recursion `δ_t = g_t + J_{t+1}ᵀ δ_{t+1}` (`_memory_vjp`): `g [T, B, p]`
    direct gradients, kept gates `u [T, B, h]` -> `δ [T, B, p]`; the slopes `u (1 − u)` of
    every step in one op, then two small matmuls per step."""
    steps = g.size(0)
    slope = torch.addcmul(u, u, u, value=-1.0)  # [T, B, h]
    delta = torch.empty_like(g)
    d = g[steps - 1]
    delta[steps - 1] = d
    for t in range(steps - 2, -1, -1):
        d = _memory_vjp(d, slope[t + 1], stacked, w_mh, g[t], delta[t])
    return delta


@functools.cache
def _scripted_exact_deltas() -> Callable[..., Tensor] | None:
    """`_exact_deltas` scripted once per process (None if that fails: the base class's
    per-step `state_vjp` loop gives the same `δ`)."""
    return script_loop(_exact_deltas, "LMN")


@dataclass(frozen=True)
class LMNConfig:
    """Architectural hyper-parameters of the LMN (ALGORITHMS.md §3.1, §3.3)."""

    hidden_size: int = 64  # h: width of the functional component
    # p, the carried state; fit_linear_autoencoder(memory_size=None) suggests one from Ξ (§3.2).
    memory_size: int = 64
    activation: Literal["tanh", "sigmoid"] = "tanh"
    # Pretraining `pretrain_lmn` runs before fine-tuning; the constructor always starts random.
    # "input_laes" needs hidden_size == memory_size (W^{hm} ← I).
    lmn_init: Literal["random", "teacher_laes", "input_laes"] = "random"

    def __post_init__(self) -> None:
        _check_positive("LMNConfig", "hidden_size", self.hidden_size)
        _check_positive("LMNConfig", "memory_size", self.memory_size)
        _check_choice("LMNConfig", "activation", self.activation, ("tanh", "sigmoid"))
        _check_choice(
            "LMNConfig", "lmn_init", self.lmn_init, ("random", "teacher_laes", "input_laes")
        )
        if self.lmn_init == "input_laes" and self.hidden_size != self.memory_size:
            raise ModelError(
                f"LMNConfig.hidden_size: {self.hidden_size} must equal memory_size "
                f"({self.memory_size}) when lmn_init is 'input_laes' (W^{{hm}} is set to I)",
                field="hidden_size",
            )


class LMN(RecurrentForecaster):
    """Linear Memory Network forecaster; carried state `m [N, p]`, head `ŷ = W^{mo} m + b_o`.

    Attributes:
        input_proj: `W^{xh} [h, d]`, `b_h [h]`.
        memory_to_hidden: `W^{mh} [h, p]`.
        memory: weight `[W^{hm} W^{mm}] [p, h + p]`, bias `b_m [p]` (starts at zero, learned).
        head: `W^{mo} [H, p]`, `b_o [H]` (from the base class).
    """

    name = "lmn"
    supports_feedback = True

    def __init__(self, config: LMNConfig, input_size: int, horizon: int) -> None:
        super().__init__(input_size, config.hidden_size, horizon, state_size=config.memory_size)
        self.config = config
        self.memory_size = config.memory_size
        hidden, memory = config.hidden_size, config.memory_size
        self.input_proj = nn.Linear(input_size, hidden)
        self.memory_to_hidden = nn.Parameter(torch.empty(hidden, memory))
        self.memory = nn.Linear(hidden + memory, memory)
        self.act = _activation(config.activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`nn.Linear` defaults, `W^{mh}` uniform ±1/√p, `b_m = 0` (the paper's memory has none)."""
        self.input_proj.reset_parameters()
        self.memory.reset_parameters()
        bound = 1.0 / math.sqrt(self.memory_size)
        nn.init.uniform_(self.memory_to_hidden, -bound, bound)
        nn.init.zeros_(self.memory.bias)

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., h]`: `W^{xh} x + b_h`."""
        return self.input_proj(x)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, h], [N, p] -> [N, p]`: functional component, then the linear memory (§3.1)."""
        h = self.act(a_t + F.linear(s_prev, self.memory_to_hidden))  # [N, h]
        return self.memory(torch.cat([h, s_prev], dim=-1))  # [N, p] = W^{hm} h + W^{mm} m + b_m

    def _functional(self, x: Tensor, s_prev: Tensor) -> tuple[Tensor, Tensor]:
        """`h = σ(W^{xh} x + b_h + W^{mh} m)` and its slope `σ'`: `[..., d], [..., p] -> [..., h]`
        twice."""
        h = self.act(self.project_inputs(x) + F.linear(s_prev, self.memory_to_hidden))
        return h, (1 - h * h if self.config.activation == "tanh" else h * (1 - h))

    def state_jacobian_diagonal(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """Closed-form diagonal of `∂m_t/∂m_{t−1}` (ALGORITHMS.md §3.1, §5.3).

        `W^{mm}[i,i] + Σ_k W^{hm}[i,k] σ'_k W^{mh}[k,i]`: `[..., d], [..., p] -> [..., p]`.
        """
        hidden = self.hidden_size
        slope = self._functional(x, s_prev)[1]  # [..., h]
        encoder = self.memory.weight[:, :hidden]  # [p, h] = W^{hm}
        coupling = encoder.T * self.memory_to_hidden  # [h, p]: W^{hm}[i,k] W^{mh}[k,i]
        return torch.diagonal(self.memory.weight[:, hidden:]) + slope @ coupling  # [..., p]

    def _folded_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`(W_in, b_in, W_mh, W_hm, W_mm, b_m)` of the folded recurrence (`_sigmoid_states`).

        With `c` = 2 for tanh, 1 for the sigmoid, `σ_act(z) = c·u − (c − 1)` with
        `u = sigmoid(c z)`, so `u_t = sigmoid(c W^{xh} x_t + c b_h + c W^{mh} m_{t−1})` and
        `m_t = W^{mm} m_{t−1} + (c W^{hm}) u_t + (b_m − (c − 1) W^{hm} 1)`: the scale and shift
        live in the weights (differentiable functions of the parameters).
        """
        c = _activation_scale(self.config.activation)
        hidden = self.hidden_size
        w_hm = self.memory.weight[:, :hidden]  # [p, h]
        return (
            self.input_proj.weight * c,
            self.input_proj.bias * c,
            self.memory_to_hidden * c,
            w_hm * c,
            self.memory.weight[:, hidden:],
            self.memory.bias - (c - 1.0) * w_hm.sum(dim=1),
        )

    @torch.jit.ignore
    def run_states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """`RecurrentForecaster.run_states` in the folded form (`_folded_weights`): per step one
        sigmoid and three matmuls (`addmm`), instead of `recur`'s activation, add, concatenation
        and fused memory matmul. Under autograd (BPTT, `forward`) this measured ~20 % faster per
        training step at h = 64, T = 720 on CPU (fewer ops on the tape, sigmoid ~3x faster than
        tanh); without it, the scripted loop of `feedback_forward`. Same states as the generic
        loop up to rounding (oracle O13).
        """
        self._check_input(x, s0)
        s = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        needs_grad = torch.is_grad_enabled() and (
            s.requires_grad or x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if not needs_grad and not torch.is_autocast_enabled(x.device.type):
            kept = self.feedback_forward(x, s)
            if kept is not None:
                return kept[0]
        w_in, b_in, w_mh, w_hm, w_mm, b_m = self._folded_weights()
        w_mh_t, w_hm_t, w_mm_t = w_mh.t(), w_hm.t(), w_mm.t()
        a = F.linear(x.transpose(0, 1), w_in, b_in)  # [T, B, h]
        states = [s]
        for a_t in a.unbind(0):
            u = torch.sigmoid(torch.addmm(a_t, s, w_mh_t))  # [B, h]
            s = torch.addmm(torch.addmm(b_m, s, w_mm_t), u, w_hm_t)  # [B, p]
            states.append(s)
        return torch.stack(states, dim=1)  # [B, T+1, p]

    @torch.jit.ignore
    def feedback_forward(self, x: Tensor, s0: Tensor) -> tuple[Tensor, Tensor] | None:
        """The no-grad forward of fixed-feedback training, keeping the gates for `cell_backward`:
        `x [B, T, d], s0 [B, p] -> (states [B, T+1, p], u [T, B, h])`, `h_t = c·u_t − (c − 1)`.

        The folded recurrence (`_folded_weights`) as one scripted loop whose sigmoid and three
        matmuls per step write straight into their outputs (`_sigmoid_states`). `cell_backward`
        then reads `u_t` instead of re-running the projections and the activation over all `B·T`
        rows. None (the generic path) when the loop cannot be scripted.
        """
        loop = _scripted_sigmoid_states()
        if loop is None:
            return None
        with torch.no_grad():
            w_in, b_in, w_mh, w_hm, w_mm, b_m = self._folded_weights()
            return loop(x, s0, w_in, b_in, w_mh, w_hm, w_mm.contiguous(), b_m, _LOOP_BLOCK)  # type: ignore[no-any-return]

    def jacobian_statistic(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """The mean activation slope `s̄ = mean_rows σ'(z) [h]` (float64) at rows
        `x [..., d], s_prev [..., p]`: the one statistic of the visited steps that the mean state
        Jacobian needs (`mean_jacobian`), which is linear in `σ'`."""
        with torch.no_grad():
            slope = self._functional(x, s_prev)[1]  # [..., h]
            return slope.reshape(-1, self.hidden_size).to(torch.float64).mean(dim=0)

    def mean_jacobian(self, statistic: Tensor, matrix: bool) -> Tensor:
        """The mean of `∂m_t/∂m_{t−1} = W^{mm} + W^{hm} diag(σ'_t) W^{mh}` over the steps whose
        mean slope is `statistic` (`jacobian_statistic`), at the current parameters, float64:
        `W^{mm} + W^{hm} diag(s̄) W^{mh} [p, p]` (matrix) or its diagonal `[p]`. Exact: the
        Jacobian is linear in the slopes. Costs one small matmul, so the trainer re-evaluates the
        feedback at every step (`train.feedback.refresh_steps`) as the weights move.
        """
        hidden = self.hidden_size
        with torch.no_grad():
            weight = self.memory.weight.to(torch.float64)
            encoder, mixing = weight[:, :hidden], weight[:, hidden:]  # W^{hm} [p, h], W^{mm}
            decoder = self.memory_to_hidden.to(torch.float64)  # W^{mh} [h, p]
            slope = statistic.to(device=weight.device, dtype=torch.float64)
            if matrix:
                return mixing + (encoder * slope) @ decoder  # [p, p]
            return torch.diagonal(mixing) + (encoder * decoder.T) @ slope  # [p]

    @torch.jit.ignore
    def cell_backward(
        self, x: Tensor, s_prev: Tensor, delta: Tensor, aux: Tensor | None = None
    ) -> None:
        """`RecurrentForecaster.cell_backward` in closed form (ALGORITHMS.md §3.1): with
        `h = σ(W^{xh} x + b_h + W^{mh} m)` and `δ = dL/dm_t`,
        `dW^{hm} = δᵀ h`, `dW^{mm} = δᵀ m`, `db_m = Σ δ`, `dz = (δ W^{hm}) ⊙ σ'`,
        `dW^{mh} = dzᵀ m`, `dW^{xh} = dzᵀ x`, `db_h = Σ dz`. Autograd would also run the memory's
        forward and its input gradient `δ [W^{hm} W^{mm}]`, half of which (`m`'s) nobody needs:
        this costs about two thirds of the autograd pass. `aux`: the rows' gates `u` kept by
        `feedback_forward` (`h = c·u − (c − 1)`, `σ' = c² u (1 − u)`); else `h` is recomputed.
        Falls back to autograd under autocast or when a parameter is frozen.
        """
        params = (self.input_proj.weight, self.input_proj.bias, self.memory_to_hidden)
        params += (self.memory.weight, self.memory.bias)
        if torch.is_autocast_enabled(x.device.type) or not all(p.requires_grad for p in params):
            super().cell_backward(x, s_prev, delta)
            return
        hidden = self.hidden_size
        encoder = self.memory.weight[:, :hidden]  # [p, h] = W^{hm}
        with torch.no_grad():
            s_prev = s_prev.to(encoder.dtype)
            delta = delta.to(s_prev.dtype)
            delta_sum = delta.sum(0)  # [p] = db_m
            if aux is None:
                h, slope = self._functional(x, s_prev)  # [R, h] each
                grad_encoder = delta.t() @ h  # [p, h]
                dz = (delta @ encoder).mul_(slope)  # [R, h]
            else:
                c = _activation_scale(self.config.activation)
                u = aux.to(s_prev.dtype)  # [R, h]
                # δᵀh = c δᵀu − (c − 1) Σδ 1ᵀ;  dz = (δ c² W^{hm}) ⊙ u (1 − u)
                grad_encoder = (delta.t() @ u).mul_(c).sub_(delta_sum.unsqueeze(1), alpha=c - 1)
                dz = (delta @ (encoder * (c * c))).mul_(torch.addcmul(u, u, u, value=-1.0))
            grad_memory = torch.cat([grad_encoder, delta.t() @ s_prev], dim=1)  # [p, h + p]
            grads = (dz.t() @ x, dz.sum(0), dz.t() @ s_prev, grad_memory, delta_sum)
        accumulate_grads(params, grads)

    @torch.jit.ignore
    def state_vjp(self, x: Tensor, s_prev: Tensor, v: Tensor, aux: Tensor | None = None) -> Tensor:
        """`RecurrentForecaster.state_vjp` in closed form (ALGORITHMS.md §3.1): with
        `∂m_t/∂m_{t−1} = W^{mm} + W^{hm} diag(σ') W^{mh}`, `J_tᵀ v = v W^{mm} + dz W^{mh}` for
        rows, `dz = (v W^{hm}) ⊙ σ'`: the same `dz` as `cell_backward`, from the kept gates
        `aux` (`σ' = c² u (1 − u)`) or the recomputed slope. Under autocast, the autograd
        default."""
        if torch.is_autocast_enabled(x.device.type):
            return super().state_vjp(x, s_prev, v, aux)
        hidden = self.hidden_size
        encoder = self.memory.weight[:, :hidden]  # [p, h] = W^{hm}
        with torch.no_grad():
            s_prev = s_prev.to(encoder.dtype)
            v = v.to(s_prev.dtype)
            if aux is None:
                dz = (v @ encoder).mul_(self._functional(x, s_prev)[1])  # [R, h]
                return torch.addmm(v @ self.memory.weight[:, hidden:], dz, self.memory_to_hidden)
            aux = aux.to(s_prev.dtype)
            return _memory_vjp(
                v,
                torch.addcmul(aux, aux, aux, value=-1.0),  # u (1 − u)
                self._stacked_vjp_weight(),
                self.memory_to_hidden,
                None,
                torch.empty_like(v),
            )

    @torch.jit.ignore
    def exact_deltas(
        self, x: Tensor, states: Tensor, direct: Tensor, aux: Tensor | None = None
    ) -> Tensor:
        """`RecurrentForecaster.exact_deltas` as one scripted loop over the kept gates
        (`_exact_deltas`); the base class's per-step loop without them, under autocast or when
        the loop cannot be scripted."""
        loop = _scripted_exact_deltas()
        if aux is None or loop is None or torch.is_autocast_enabled(x.device.type):
            return super().exact_deltas(x, states, direct, aux)
        dtype = self.memory.weight.dtype
        with torch.no_grad():
            delta = loop(
                direct.transpose(0, 1).to(dtype),  # [T, B, p]
                aux.to(dtype),  # [T, B, h]
                self._stacked_vjp_weight(),
                self.memory_to_hidden,
            )
        return delta.transpose(0, 1)  # type: ignore[no-any-return]

    def _stacked_vjp_weight(self) -> Tensor:
        """`[c² W^{hm}, W^{mm}] [p, h + p]`: the memory weight with its encoder scaled by the
        folded activation's `c²` (`_memory_vjp`)."""
        weight, hidden = self.memory.weight, self.hidden_size
        c = _activation_scale(self.config.activation)
        return torch.cat([weight[:, :hidden] * (c * c), weight[:, hidden:]], dim=1)

    def functional_states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """The functional component's outputs `h_t` of every step: `x [B, T, d] -> [B, T, h]`."""
        return self._functional(x, self.run_states(x, s0)[:, :-1])[0]


class TeacherRNN(RecurrentForecaster):
    """Plain RNN teacher of §3.3: `h_t = σ(W_xh x_t + W_hh h_{t−1} + b)`, `ŷ_t = W_ho h_t + b_o`.

    Built from the LMN's config (its `hidden_size` and `activation`) so the weight mapping of
    `init_lmn_from_teacher` is exact. Trained like any other forecaster; carried state `h [N, h]`.
    """

    name = "lmn_teacher"
    supports_feedback = True

    def __init__(self, config: LMNConfig, input_size: int, horizon: int) -> None:
        super().__init__(input_size, config.hidden_size, horizon, state_size=config.hidden_size)
        self.config = config
        self.input_proj = nn.Linear(input_size, config.hidden_size)  # W_xh, b
        self.recurrent_weight = nn.Parameter(torch.empty(config.hidden_size, config.hidden_size))
        self.act = _activation(config.activation)
        bound = 1.0 / math.sqrt(config.hidden_size)  # as nn.RNN
        for weight in (self.input_proj.weight, self.input_proj.bias, self.recurrent_weight):
            nn.init.uniform_(weight, -bound, bound)

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., h]`: `W_xh x + b`."""
        return self.input_proj(x)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, h], [N, h] -> [N, h]`."""
        return self.act(a_t + F.linear(s_prev, self.recurrent_weight))


# ---- linear autoencoder for sequences (ALGORITHMS.md §3.2) -------------------------------------


@dataclass(frozen=True, eq=False)
class LinearAutoencoder:
    """A fitted linear autoencoder for sequences: `m_t = A (v_t − mean) + B m_{t−1}`, `m_0 = 0`.

    Decoding: `v_t = Aᵀ m_t + mean`, `m_{t−1} = Bᵀ m_t` (exact for `p ≥ rank Ξ` and sequences no
    longer than `history`; oracle O5). All tensors are float64.

    Attributes:
        A: encoder `[p, k]` (`U_pᵀ P_1`).
        B: memory transition `[p, p]` (`U_pᵀ S U_p`).
        mean: subtracted from every `v_t` `[k]` (zeros unless fitted with `center=True`).
        components: `U_p [L·k, p]`, the top right singular vectors of Ξ (zero columns beyond L·k).
        singular_values: all singular values of Ξ, descending `[min(N_rows, L·k)]`.
        explained_energy: share of `‖Ξ‖_F²` the `p` kept directions hold.
        history: `L`, the number of past steps a history row `ξ_t` holds.
    """

    A: Tensor
    B: Tensor
    mean: Tensor
    components: Tensor
    singular_values: Tensor
    explained_energy: float
    history: int

    @property
    def memory_size(self) -> int:
        """`p`."""
        return int(self.A.shape[0])

    @property
    def input_size(self) -> int:
        """`k`."""
        return int(self.A.shape[1])

    @property
    def bias(self) -> Tensor:
        """Memory bias `b_m = −A·mean [p]` that lets the recurrence run on uncentred `v`."""
        return -(self.A @ self.mean)


def _as_sequences(sequences: SequencesLike, name: str) -> list[Tensor]:
    """Validate and convert to a list of float64 tensors `[T_i, k]`."""
    if isinstance(sequences, Tensor) or hasattr(sequences, "__array__"):
        array = torch.as_tensor(sequences)
        if array.dim() == 2:
            items = [array]
        elif array.dim() == 3:
            items = list(array.unbind(0))
        else:
            raise ModelError(
                f"{name}: shape {tuple(array.shape)} is not [T, k] or [N, T, k]", field=name
            )
    else:
        items = [torch.as_tensor(item) for item in sequences]
    if not items:
        raise ModelError(f"{name}: no sequences given", field=name)
    width = int(items[0].shape[-1]) if items[0].dim() > 0 else 0
    for i, item in enumerate(items):
        if item.dim() != 2 or item.shape[0] < 1 or item.shape[1] != width or width < 1:
            raise ModelError(
                f"{name}[{i}]: shape {tuple(item.shape)} is not [T, k] with T >= 1, k >= 1 "
                f"and k as in {name}[0]",
                field=name,
            )
        if not torch.isfinite(item).all():
            raise ModelError(f"{name}[{i}]: contains NaN or infinite values", field=name)
    return [item.to(torch.float64) for item in items]


def _history_rows(v: Tensor, history: int) -> Tensor:
    """Rows `ξ_t = [v_t; v_{t−1}; …; v_{t−L+1}]`, zero before the start: `[T, k] -> [T, L·k]`."""
    steps, width = v.shape
    padded = torch.cat([v.new_zeros(history - 1, width), v], dim=0)  # [T+L−1, k]
    windows = padded.unfold(0, history, 1)  # [T, k, L]: window t = v_{t−L+1..t}
    return windows.flip(-1).transpose(1, 2).reshape(steps, history * width)  # [T, L·k]


def fit_linear_autoencoder(
    sequences: SequencesLike,
    memory_size: int | None = None,
    history: int | None = None,
    center: bool = False,
    *,
    energy: float = 0.999,
    max_memory_size: int | None = None,
    method: Literal["auto", "svd", "gram"] = "auto",
) -> LinearAutoencoder:
    """Fit the closed-form linear autoencoder for sequences (ALGORITHMS.md §3.2).

    Args:
        sequences: `[T_i, k]` tensors or arrays (or one `[N, T, k]` tensor) to memorise.
        memory_size: `p`; when None, the smallest `p` whose singular values hold at least
            `energy` of `‖Ξ‖_F²`, capped at `max_memory_size` (§3.2 suggests `4h`).
        history: `L`, past steps per history row; None = the longest sequence (needed for exact
            multi-step decoding; a shorter `L` keeps one-step decoding exact).
        center: subtract the mean of all `v_t` first (§3.2); `bias` then holds `−A·mean`.
        energy: share of `‖Ξ‖_F²` to keep when `memory_size` is None, in (0, 1].
        max_memory_size: cap on the automatically chosen `p`.
        method: "svd" (thin SVD of Ξ), "gram" (eigendecomposition of ΞᵀΞ, accumulated per
            sequence; loses the smallest singular values to rounding sooner), or "auto" (Gram
            when Ξ has more than 4·L·k rows).

    Raises:
        ModelError: on malformed sequences or arguments, all-zero data, or `L·k` above 8192.
    """
    seqs = _as_sequences(sequences, "sequences")
    longest = max(int(s.shape[0]) for s in seqs)
    width = int(seqs[0].shape[1])
    if history is None:
        history = longest
    _check_positive("fit_linear_autoencoder", "history", history)
    if memory_size is not None:
        _check_positive("fit_linear_autoencoder", "memory_size", memory_size)
    if max_memory_size is not None:
        _check_positive("fit_linear_autoencoder", "max_memory_size", max_memory_size)
    if isinstance(energy, bool) or not 0.0 < energy <= 1.0:
        raise ModelError(
            f"fit_linear_autoencoder.energy: {energy!r} is not in (0, 1]", field="energy"
        )
    _check_choice("fit_linear_autoencoder", "method", method, ("auto", "svd", "gram"))
    row_width = history * width
    if row_width > _MAX_HISTORY_WIDTH:
        raise ModelError(
            f"fit_linear_autoencoder.history: L·k = {history}·{width} = {row_width} exceeds "
            f"{_MAX_HISTORY_WIDTH}; pass a shorter history",
            field="history",
        )

    mean = torch.cat(seqs).mean(dim=0) if center else seqs[0].new_zeros(width)  # [k]
    n_rows = sum(int(s.shape[0]) for s in seqs)
    if method == "auto":
        method = "gram" if n_rows > 4 * row_width else "svd"
    if method == "gram":
        gram = seqs[0].new_zeros(row_width, row_width)  # [L·k, L·k]
        for s in seqs:
            rows = _history_rows(s - mean, history)  # [T_i, L·k]
            gram += rows.T @ rows
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        rank_bound = min(n_rows, row_width)
        singular = eigenvalues.flip(0)[:rank_bound].clamp(min=0.0).sqrt()
        basis = eigenvectors.flip(1)  # [L·k, L·k], a full orthonormal basis
    else:
        xi = torch.cat([_history_rows(s - mean, history) for s in seqs])  # [N_rows, L·k]
        _, singular, vh = torch.linalg.svd(xi, full_matrices=False)
        basis = vh.T  # [L·k, r]
        if memory_size is not None and basis.shape[1] < min(memory_size, row_width):
            basis = torch.linalg.svd(xi, full_matrices=True).Vh.T  # complete the basis

    energies = singular.square()
    total = float(energies.sum())
    if total <= 0.0:
        raise ModelError(
            "sequences: every value is zero (after centring); nothing to memorise",
            field="sequences",
        )
    if memory_size is None:
        share = energies.cumsum(0) / total
        memory_size = min(int(torch.searchsorted(share, energy).item()) + 1, len(share))
        if max_memory_size is not None:
            memory_size = min(memory_size, max_memory_size)
    kept = min(memory_size, basis.shape[1])
    components = basis[:, :kept]  # [L·k, kept]
    if memory_size > kept:  # p > L·k: the extra memory units stay at zero
        components = torch.cat([components, components.new_zeros(row_width, memory_size - kept)], 1)

    encoder = components[:width].T.contiguous()  # [p, k] = U_pᵀ P_1
    # S U_p shifts U_p down one block (the oldest block drops out): B = U_pᵀ S U_p.
    transition = components[width:].T @ components[:-width]  # [p, p]
    return LinearAutoencoder(
        A=encoder,
        B=transition,
        mean=mean,
        components=components,
        singular_values=singular,
        explained_energy=float(energies[:kept].sum()) / total,
        history=history,
    )


def encode(autoencoder: LinearAutoencoder, sequence: Tensor | npt.NDArray) -> Tensor:
    """Memory states `m_1..m_T` of a sequence: `[..., T, k] -> [..., T, p]` (float64, `m_0 = 0`)."""
    v = torch.as_tensor(sequence).to(autoencoder.A)  # [..., T, k]
    if v.dim() < 2 or v.shape[-1] != autoencoder.input_size:
        raise ModelError(
            f"sequence: shape {tuple(v.shape)} is not [..., T, k] with k = "
            f"{autoencoder.input_size}",
            field="sequence",
        )
    v = v - autoencoder.mean
    drive = v @ autoencoder.A.T  # [..., T, p]
    m = drive.new_zeros(*drive.shape[:-2], autoencoder.memory_size)  # [..., p]
    states = []
    for a_t in drive.unbind(-2):
        m = a_t + m @ autoencoder.B.T  # [..., p]
        states.append(m)
    return torch.stack(states, dim=-2)  # [..., T, p]


def decode(autoencoder: LinearAutoencoder, memory: Tensor, steps: int) -> Tensor:
    """The last `steps` inputs encoded in `m_t`, oldest first: `[..., p] -> [..., steps, k]`."""
    _check_positive("decode", "steps", steps)
    m = torch.as_tensor(memory).to(autoencoder.A)  # [..., p]
    if m.dim() < 1 or m.shape[-1] != autoencoder.memory_size:
        raise ModelError(
            f"memory: shape {tuple(m.shape)} is not [..., p] with p = {autoencoder.memory_size}",
            field="memory",
        )
    values = []
    for _ in range(steps):
        values.append(m @ autoencoder.A + autoencoder.mean)  # [..., k] = Aᵀ m + mean
        m = m @ autoencoder.B  # [..., p] = Bᵀ m
    return torch.stack(values[::-1], dim=-2)  # [..., steps, k]


# ---- pretraining (ALGORITHMS.md §3.3) ----------------------------------------------------------


def _check_windows(name: str, value: Tensor, model: RecurrentForecaster) -> None:
    if value.dim() != 3 or value.shape[-1] != model.input_size or value.shape[1] < 1:
        raise ModelError(
            f"{name}: shape {tuple(value.shape)} is not [N, T, d] with d = {model.input_size}",
            field=name,
        )


def init_lmn_from_teacher(
    lmn: LMN,
    teacher: TeacherRNN,
    inputs: Tensor | Sequence[Tensor],
    *,
    history: int | None = None,
) -> LinearAutoencoder:
    """Initialise `lmn` in place so that it reproduces a trained `teacher` (§3.3, oracle O7).

    Runs the teacher on the training windows, fits the linear autoencoder of §3.2 on its hidden
    states (`p = lmn.memory_size`, uncentred so `m_0 = 0` decodes `h_0 = 0`), then sets
    `W^{xh} ← W_xh`, `b_h ← b`, `W^{hm} ← A`, `W^{mm} ← B`, `W^{mh} ← W_hh Aᵀ`, `W^{mo} ← W_ho Aᵀ`,
    `b_o ← b_o`, `b_m ← 0`. Exact when `p ≥ rank Ξ`; otherwise the best `p` directions.

    Args:
        lmn: the model to initialise (same input size, hidden size, horizon, activation).
        teacher: the trained teacher.
        inputs: training windows `[N, T, d]`, or a list of `[T_i, d]` windows.
        history: `L` of the autoencoder (None = the longest window).

    Returns:
        The fitted autoencoder (its `explained_energy` says how exact the start is).
    """
    for key in ("input_size", "hidden_size", "horizon"):
        if getattr(lmn, key) != getattr(teacher, key):
            raise ModelError(
                f"teacher.{key}: {getattr(teacher, key)} differs from the LMN's "
                f"{getattr(lmn, key)}",
                field=key,
            )
    if lmn.config.activation != teacher.config.activation:
        raise ModelError(
            f"teacher.activation: {teacher.config.activation!r} differs from the LMN's "
            f"{lmn.config.activation!r}",
            field="activation",
        )
    reference = teacher.head.weight
    states: Tensor | list[Tensor]
    with torch.no_grad():
        if isinstance(inputs, Tensor):
            _check_windows("inputs", inputs, teacher)
            states = teacher.run_states(inputs.to(reference))[:, 1:]  # [N, T, h]
        else:
            states = []
            for window in inputs:
                x = torch.as_tensor(window).to(reference).unsqueeze(0)  # [1, T_i, d]
                _check_windows("inputs", x, teacher)
                states.append(teacher.run_states(x)[0, 1:])  # [T_i, h]
    autoencoder = fit_linear_autoencoder(states, lmn.memory_size, history, center=False)

    hidden, target = lmn.hidden_size, lmn.head.weight
    encoder, transition = autoencoder.A, autoencoder.B  # [p, h], [p, p]
    with torch.no_grad():
        recurrent = teacher.recurrent_weight.to(encoder)  # [h, h]
        readout = teacher.head.weight.to(encoder)  # [H, h]
        lmn.input_proj.weight.copy_(teacher.input_proj.weight)
        lmn.input_proj.bias.copy_(teacher.input_proj.bias)
        lmn.memory_to_hidden.copy_((recurrent @ encoder.T).to(target))  # [h, p]
        lmn.memory.weight[:, :hidden].copy_(encoder.to(target))
        lmn.memory.weight[:, hidden:].copy_(transition.to(target))
        lmn.memory.bias.zero_()
        lmn.head.weight.copy_((readout @ encoder.T).to(target))  # [H, p]
        lmn.head.bias.copy_(teacher.head.bias)
    return autoencoder


def init_lmn_from_inputs(
    lmn: LMN,
    inputs: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    history: int | None = None,
    center: bool = True,
) -> LinearAutoencoder:
    """Initialise `lmn` in place from a linear autoencoder of its inputs (`input_laes`, §3.3).

    Sets `W^{xh} ← A`, `b_h ← −A·mean`, `W^{mh} ← 0`, `W^{hm} ← I`, `W^{mm} ← B`, `b_m ← 0`, so
    `h_t = σ(A (x_t − mean))` and the memory runs the autoencoder's recurrence on `h_t`; then fits
    the head `W^{mo}, b_o` by least squares on the resulting memory states (masked entries
    ignored; minimum-norm solution).

    Args:
        lmn: the model (`hidden_size == memory_size`).
        inputs: training windows `[N, T, d]`.
        targets: forking-sequence targets `[N, T, H]`.
        mask: 1 where a target counts, 0 elsewhere, `[N, T, H]` (None = all count).
        history: `L` of the autoencoder (None = the window length).
        center: centre the inputs before the SVD.

    Returns:
        The fitted autoencoder.
    """
    if lmn.hidden_size != lmn.memory_size:
        raise ModelError(
            f"lmn.hidden_size: {lmn.hidden_size} must equal memory_size ({lmn.memory_size}) "
            "for input_laes (W^{hm} is set to I)",
            field="hidden_size",
        )
    _check_windows("inputs", inputs, lmn)
    expected = (*inputs.shape[:2], lmn.horizon)
    if targets.shape != expected:
        raise ModelError(
            f"targets: shape {tuple(targets.shape)} is not [N, T, H] = {expected}",
            field="targets",
        )
    if mask is not None and mask.shape != expected:
        raise ModelError(
            f"mask: shape {tuple(mask.shape)} is not [N, T, H] = {expected}", field="mask"
        )
    autoencoder = fit_linear_autoencoder(inputs, lmn.memory_size, history, center)

    weight = lmn.head.weight
    with torch.no_grad():
        lmn.input_proj.weight.copy_(autoencoder.A.to(weight))
        lmn.input_proj.bias.copy_(autoencoder.bias.to(weight))
        lmn.memory_to_hidden.zero_()
        eye = torch.eye(lmn.memory_size, dtype=weight.dtype, device=weight.device)
        lmn.memory.weight[:, : lmn.hidden_size].copy_(eye)
        lmn.memory.weight[:, lmn.hidden_size :].copy_(autoencoder.B.to(weight))
        lmn.memory.bias.zero_()

        m = lmn.run_states(inputs.to(weight))[:, 1:].reshape(-1, lmn.memory_size)  # [N·T, p]
        design = torch.cat([m, m.new_ones(m.shape[0], 1)], dim=1).cpu().double()  # [N·T, p+1]
        y = targets.reshape(-1, lmn.horizon).cpu().double()  # [N·T, H]
        keep = None if mask is None else mask.reshape(-1, lmn.horizon).cpu() > 0
        solution = design.new_zeros(design.shape[1], lmn.horizon)  # [p+1, H]
        if keep is None:
            solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
        else:
            for j in range(lmn.horizon):  # each horizon step has its own valid rows
                rows = keep[:, j]
                if bool(rows.any()):
                    fit = torch.linalg.lstsq(design[rows], y[rows, j : j + 1], driver="gelsd")
                    solution[:, j : j + 1] = fit.solution
        lmn.head.weight.copy_(solution[:-1].T.to(weight))
        lmn.head.bias.copy_(solution[-1].to(weight))
    return autoencoder


def pretrain_lmn(
    lmn: LMN,
    inputs: Tensor,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    teacher: TeacherRNN | None = None,
    history: int | None = None,
) -> LinearAutoencoder | None:
    """Run the pretraining `lmn.config.lmn_init` names; None for "random" (nothing to do).

    "teacher_laes" needs a trained `teacher` (training lives outside the model package);
    "input_laes" needs `targets` for the least-squares head.
    """
    choice = lmn.config.lmn_init
    if choice == "teacher_laes":
        if teacher is None:
            raise ModelError(
                "teacher: lmn_init 'teacher_laes' needs a trained TeacherRNN", field="teacher"
            )
        return init_lmn_from_teacher(lmn, teacher, inputs, history=history)
    if choice == "input_laes":
        if targets is None:
            raise ModelError(
                "targets: lmn_init 'input_laes' needs targets [N, T, H]", field="targets"
            )
        return init_lmn_from_inputs(lmn, inputs, targets, mask, history=history)
    return None
