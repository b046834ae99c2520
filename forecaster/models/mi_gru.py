"""MI-GRU: a GRU with multiplicative integration in every gate.

Wu, Zhang, Zhang, Bengio, Salakhutdinov 2016, "On Multiplicative Integration with Recurrent Neural
Networks" (arXiv 1606.06630). Implements ALGORITHMS.md §1.2 (biases inside the projections, reset
applied after `U`, torch's gate order r, z, n) and §1.3 (initialisation). Pinned by oracles O1
(α = 0, β1 = β2 = 1 reduces to `torch.nn.GRU` with the same weights), O2 (block algebra,
gradcheck) and O13 (batched re-evaluation equals the loop).

Each gate's pre-activation `α⊙aˣ⊙aʰ + β1⊙aʰ + β2⊙aˣ` is computed as `A⊙aʰ + C` with
`A = α⊙aˣ + β1` and `C = β2⊙aˣ`. A and C depend on the input only, so `project_inputs` computes
them for all steps in one matmul and each step is one `[h, 3h]` matmul plus element-wise work
(ALGORITHMS.md §5.3, §7).

For fixed-feedback training the no-grad forward keeps `U h_{t−1} + b_h` and the gates of every
step (`feedback_forward`), and `cell_backward` differentiates the step in closed form from them:
no re-evaluation of the cell over the `B·T` rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from forecaster.models.base import RecurrentForecaster, accumulate_grads, script_loop

_LOOP_BLOCK = 32  # steps whose input projections (forward) or coefficients (BPTT) go at once


def _kept_states(
    x: Tensor,
    s0: Tensor,
    w_proj: Tensor,
    b_proj: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    block: int,
) -> tuple[Tensor, Tensor]:
    """The MI-GRU recurrence without autograd, keeping what `MiGRU.cell_backward` reads:
    `x [B, T, d], s0 [B, h]` and the `project` weights `[6h, d], [6h]` -> (`h [B, T+1, h]`
    (a view of time-major storage), `aux [T, B, 6h]` = `[u; r; z; n]` per step, with
    `u = U h_{t−1} + b_h`). Per step one `addmm` into `u` and element-wise work written into
    the gates' slots (the same arithmetic as `MiGRUCell.forward`)."""
    xt = x.transpose(0, 1).contiguous()  # [T, B, d]
    steps, batch, hidden = xt.size(0), xt.size(1), s0.size(1)
    states = torch.empty(steps + 1, batch, hidden, dtype=x.dtype, device=x.device)
    aux = torch.empty(steps, batch, 6 * hidden, dtype=x.dtype, device=x.device)
    states[0] = s0
    w_hh_t = w_hh.t()
    # Views of aux's slots, taken once (fewer ops per step): u, r and z together, r, z, n.
    kept_u, kept_rz = aux[:, :, : 3 * hidden], aux[:, :, 3 * hidden : 5 * hidden]
    kept_r, kept_z = aux[:, :, 3 * hidden : 4 * hidden], aux[:, :, 4 * hidden : 5 * hidden]
    kept_n = aux[:, :, 5 * hidden :]
    h = s0
    for start in range(0, steps, block):
        a = F.linear(xt[start : start + block], w_proj, b_proj)  # [L, B, 6h] = [A; C]
        gain, offset_rz, offset_n = (
            a[:, :, : 3 * hidden],
            a[:, :, 3 * hidden : 5 * hidden],
            a[:, :, 5 * hidden :],
        )
        for i in range(a.size(0)):
            t = start + i
            u = torch.addmm(b_hh, h, w_hh_t, out=kept_u[t])  # [B, 3h]
            q = gain[i] * u  # [B, 3h] = A ⊙ u
            torch.add(q[:, : 2 * hidden], offset_rz[i], out=kept_rz[t]).sigmoid_()  # r, z
            n = torch.addcmul(offset_n[i], kept_r[t], q[:, 2 * hidden :], out=kept_n[t]).tanh_()
            h = torch.addcmul(n, kept_z[t], h - n, out=states[t + 1])  # (1 − z) ⊙ n + z ⊙ h
    return states.transpose(0, 1), aux


def _gate_coefficients(aux: Tensor, gain: Tensor, h_prev: Tensor, hs: int, out: Tensor) -> Tensor:
    """Per unit of `δ = dL/dh_t`, the gradients of the three gates' pre-activations: they are
    `δ ⊙ [c_r, c_z, c_n]` with `c_n = (1 − z)(1 − n²)`, `c_r = c_n⊙A_n⊙u_n⊙r(1 − r)` and
    `c_z = (h − n)⊙z(1 − z)` (ALGORITHMS.md §1.2 differentiated; `MiGRU._kept_backward`).
    None of them depends on `δ`, so BPTT's recursion forms them for many steps at once.
    Kept `aux = [u; r; z; n] [..., 6h]`, gain `A [..., 3h]`, `h_prev [..., h]`; written into
    and returned as `out [..., 3h]`."""
    u_n = aux[..., 2 * hs : 3 * hs]
    r, z, n = aux[..., 3 * hs : 4 * hs], aux[..., 4 * hs : 5 * hs], aux[..., 5 * hs :]
    c_n = torch.mul(1 - z, 1 - n * n, out=out[..., 2 * hs :])
    torch.mul(c_n * gain[..., 2 * hs :] * u_n, r - r * r, out=out[..., :hs])
    torch.mul(h_prev - n, z - z * z, out=out[..., hs : 2 * hs])
    return out


def _exact_deltas(
    g: Tensor, gain: Tensor, aux: Tensor, states: Tensor, w_hh: Tensor, hs: int, block: int
) -> Tensor:
    """BPTT's reverse recursion `δ_t = g_t + J_{t+1}ᵀ δ_{t+1}` with `J_{t+1}ᵀ δ = δ⊙z + du U`
    (`MiGRU.state_vjp`): `g [T, B, h]` direct gradients, `gain [T, B, 3h]` = A, `aux [T, B, 6h]`,
    `states [T+1, B, h]` -> `δ [T, B, h]`. `du = δ ⊙ [c_r A_r, c_z A_z, c_n r A_n]`
    (`_gate_coefficients`): the bracket is formed for `block` steps at a time, so each step is
    one broadcast multiply, one `addcmul` and one `[B, 3h] x [3h, h]` matmul."""
    steps, batch = g.size(0), g.size(1)
    delta = torch.empty_like(g)
    coef = torch.empty(block, batch, 3 * hs, dtype=g.dtype, device=g.device)
    d = g[steps - 1]
    delta[steps - 1] = d
    high = steps  # δ_t reaches the loss beyond its head through step k = t + 1, k in [1, T)
    while high > 1:
        low = max(1, high - block)
        kept, span = aux[low:high], high - low
        c = _gate_coefficients(kept, gain[low:high], states[low:high], hs, coef[:span])
        c.mul_(gain[low:high])
        c[:, :, 2 * hs :].mul_(kept[:, :, 3 * hs : 4 * hs])  # the candidate's reset r⊙
        per_gate = c.view(span, batch, 3, hs)
        z = kept[:, :, 4 * hs : 5 * hs]
        for i in range(span - 1, -1, -1):
            t = low + i - 1
            du = (per_gate[i] * d.unsqueeze(1)).view(batch, 3 * hs)  # [B, 3h]
            d = torch.addmm(torch.addcmul(g[t], d, z[i]), du, w_hh, out=delta[t])
        high = low
    return delta


@functools.cache
def _scripted_exact_deltas() -> Callable[..., Tensor] | None:
    """`_exact_deltas` scripted once per process (None if that fails: the base class's
    per-step `state_vjp` loop gives the same `δ`)."""
    return script_loop(_exact_deltas, "MI-GRU")


@functools.cache
def _scripted_kept_states() -> Callable[..., tuple[Tensor, Tensor]] | None:
    """`_kept_states` scripted once per process (None if that fails: the generic scripted loop
    gives the same states and `cell_backward` recomputes the gates)."""
    return script_loop(_kept_states, "MI-GRU")


@dataclass(frozen=True)
class MiGRUConfig:
    """Architectural hyper-parameters of the MI-GRU."""

    hidden_size: int = 64
    # "gru": α = 0, β1 = β2 = 1 (starts exactly at a GRU); "mi": α = β1 = β2 = 1 (§1.3).
    mi_init: Literal["gru", "mi"] = "gru"


class MiGRUCell(nn.Module):
    """MI-GRU cell with `torch.nn.GRU`'s parameter names and layout (gates stacked r, z, n).

    Attributes:
        weight_ih: `W [3h, d]`; weight_hh: `U [3h, h]`; bias_ih: `b_i [3h]`; bias_hh: `b_h [3h]`;
        alpha, beta1, beta2: MI gates `[3h]`.
    """

    def __init__(self, input_size: int, hidden_size: int, mi_init: str = "gru") -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.mi_init = mi_init
        # Split sizes as attributes: TorchScript sees lists, the ONNX Split gets constant sizes.
        self.input_split = [3 * hidden_size, 2 * hidden_size, hidden_size]
        self.gate_split = [2 * hidden_size, hidden_size]
        self.unit_split = [hidden_size, hidden_size]
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        self.alpha = nn.Parameter(torch.empty(3 * hidden_size))
        self.beta1 = nn.Parameter(torch.empty(3 * hidden_size))
        self.beta2 = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W, U, b uniform ±1/√h as `nn.GRU`; α, β1, β2 per `mi_init` (ALGORITHMS.md §1.3)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            nn.init.uniform_(weight, -bound, bound)
        nn.init.constant_(self.alpha, 1.0 if self.mi_init == "mi" else 0.0)
        nn.init.ones_(self.beta1)
        nn.init.ones_(self.beta2)

    def projection(self) -> tuple[Tensor, Tensor]:
        """The affine map of `project`: weight `[diag(α) W; diag(β2) W] [6h, d]` and bias
        `[α⊙b_i + β1; β2⊙b_i] [6h]`."""
        weight = torch.cat(
            [self.alpha.unsqueeze(1) * self.weight_ih, self.beta2.unsqueeze(1) * self.weight_ih]
        )  # [6h, d]
        bias = torch.cat([self.alpha * self.bias_ih + self.beta1, self.beta2 * self.bias_ih])
        return weight, bias

    def project(self, x: Tensor) -> Tensor:
        """Input-side terms `[A; C]` of the three gates in one matmul: `[..., d] -> [..., 6h]`.

        `A = α⊙(W x + b_i) + β1` and `C = β2⊙(W x + b_i)` are one affine map of `x`, so the
        weights `[diag(α) W; diag(β2) W]` and bias `[α⊙b_i + β1; β2⊙b_i]` are formed first
        (constants after export, `projection`) and applied once.
        """
        weight, bias = self.projection()
        return F.linear(x, weight, bias)  # [..., 6h]

    def forward(self, a_t: Tensor, h: Tensor) -> Tensor:
        """One MI-GRU step: `a_t [N, 6h]` (from `project`), `h [N, h] -> h' [N, h]`.

        Uses `α⊙aˣ⊙aʰ + β1⊙aʰ + β2⊙aˣ = A⊙aʰ + C`, and for the candidate
        `A_n⊙(r⊙aʰ_n) = r⊙(A_n⊙aʰ_n)`; splits use size lists so the exported step has no
        shape arithmetic.
        """
        gain, offset_rz, offset_n = torch.split(a_t, self.input_split, dim=1)  # [N, 3h|2h|h]
        q = gain * F.linear(h, self.weight_hh, self.bias_hh)  # [N, 3h] = A ⊙ (U h + b_h)
        q_rz, q_n = torch.split(q, self.gate_split, dim=1)  # [N, 2h], [N, h]
        r, z = torch.split(torch.sigmoid(q_rz + offset_rz), self.unit_split, dim=1)  # [N, h] each
        n = torch.tanh(r * q_n + offset_n)  # [N, h]: reset after U (torch convention)
        return n + z * (h - n)  # [N, h] = (1 − z) ⊙ n + z ⊙ h


class MiGRU(RecurrentForecaster):
    """MI-GRU forecaster: carried state `h [N, h]`, linear head on `h`."""

    name = "mi_gru"
    supports_feedback = True

    def __init__(self, config: MiGRUConfig, input_size: int, horizon: int) -> None:
        super().__init__(input_size, config.hidden_size, horizon, state_size=config.hidden_size)
        self.config = config
        self.cell = MiGRUCell(input_size, config.hidden_size, config.mi_init)

    def project_inputs(self, x: Tensor) -> Tensor:
        """`[..., d] -> [..., 6h]`: the gates' input-side terms `[A; C]` (see module doc)."""
        return self.cell.project(x)

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """`[N, 6h], [N, h] -> [N, h]`."""
        return self.cell(a_t, s_prev)

    def state_jacobian_diagonal(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """Closed-form diagonal of `∂h_t/∂h_{t−1}`, ALGORITHMS.md §5.3.

        `z + (h − n) z(1−z) A_z U_z[i,i] + (1−z)(1−n²) A_n (r(1−r) A_r U_r[i,i] u_n + r U_n[i,i])`
        with `A = α⊙aˣ + β1` (the gain) and `u = U h + b_h`; about one batched step of work.
        Shapes: `x [..., d], s_prev [..., h] -> [..., h]`. Checked against `torch.func.jacrev`.
        """
        cell, hs = self.cell, self.hidden_size
        gain, offset_rz, offset_n = torch.split(cell.project(x), cell.input_split, dim=-1)
        u = F.linear(s_prev, cell.weight_hh, cell.bias_hh)  # [..., 3h] = U h + b_h
        q_rz, q_n = torch.split(gain * u, cell.gate_split, dim=-1)  # [..., 2h], [..., h]
        r, z = torch.split(torch.sigmoid(q_rz + offset_rz), cell.unit_split, dim=-1)
        n = torch.tanh(r * q_n + offset_n)  # [..., h]
        gain_r, gain_z, gain_n = torch.split(gain, hs, dim=-1)  # [..., h] each
        u_diag = torch.diagonal(cell.weight_hh.reshape(3, hs, hs), dim1=1, dim2=2)  # [3, h]
        dz = z * (1 - z) * gain_z * u_diag[1]  # [..., h]: ∂z_i/∂h_i
        dr = r * (1 - r) * gain_r * u_diag[0]  # [..., h]: ∂r_i/∂h_i
        dn = (1 - n * n) * gain_n * (dr * u[..., 2 * hs :] + r * u_diag[2])  # ∂n_i/∂h_i
        return z + (s_prev - n) * dz + (1 - z) * dn  # [..., h]

    def feedback_forward(self, x: Tensor, s0: Tensor) -> tuple[Tensor, Tensor] | None:
        """The no-grad forward of fixed-feedback training, keeping `u = U h_{t−1} + b_h` and the
        gates `r, z, n` of every step for `cell_backward`: `x [B, T, d], s0 [B, h] ->
        (states [B, T+1, h], aux [T, B, 6h])`. One scripted loop (`_kept_states`); None (the
        generic path) when it cannot be scripted."""
        loop = _scripted_kept_states()
        if loop is None:
            return None
        cell = self.cell
        with torch.no_grad():
            weight, bias = cell.projection()
            return loop(x, s0, weight, bias, cell.weight_hh, cell.bias_hh, _LOOP_BLOCK)  # type: ignore[no-any-return]

    def _kept_backward(
        self, x: Tensor, s_prev: Tensor, delta: Tensor, aux: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The step's backward from the kept `aux` rows `[u; r; z; n] [R, 6h]` (ALGORITHMS.md
        §1.2 differentiated), no re-evaluation: with `δ = dL/dh_t` and the gain
        `A = α⊙(W x + b_i) + β1`, `dz = δ⊙(h − n)`, `dn̂ = δ⊙(1 − z)⊙(1 − n²)`,
        `dr = dn̂⊙A_n⊙u_n`, the pre-activations' gradients `g = [dr⊙r(1−r), dz⊙z(1−z), dn̂]`
        (`= dC`; formed as `δ ⊙ _gate_coefficients`), `dq = [g_r, g_z, g_n⊙r]`, `dA = dq⊙u` and
        `du = dq⊙A`.
        Returns `(g, dA, du)`, each `[R, 3h]`, in `s_prev`'s dtype."""
        cell, hidden = self.cell, self.hidden_size
        dtype = s_prev.dtype
        delta, aux = delta.to(dtype), aux.to(dtype)
        u, r = aux[:, : 3 * hidden], aux[:, 3 * hidden : 4 * hidden]  # [R, 3h], [R, h]
        weight, bias = cell.projection()
        gain = F.linear(x.to(dtype), weight[: 3 * hidden], bias[: 3 * hidden])  # [R, 3h] = A
        g = _gate_coefficients(aux, gain, s_prev, hidden, torch.empty_like(u))  # [R, 3h]
        g.view(-1, 3, hidden).mul_(delta.unsqueeze(1))  # the gradients: δ ⊙ [c_r, c_z, c_n]
        dq = g.clone()
        dq[:, 2 * hidden :].mul_(r)
        grad_gain = dq * u  # [R, 3h] = dA
        return g, grad_gain, dq.mul_(gain)

    @torch.jit.ignore
    def cell_backward(
        self, x: Tensor, s_prev: Tensor, delta: Tensor, aux: Tensor | None = None
    ) -> None:
        """`RecurrentForecaster.cell_backward` in closed form from the kept `aux` rows
        (`_kept_backward`): `dU = duᵀ h`, `db_h = Σ du`, `dβ1 = Σ dA`, and through
        `p = W x + b_i` (`A = α⊙p + β1`, `C = β2⊙p`) with `Gᴬ = dAᵀ x`, `Gᶜ = gᵀ x` `[3h, d]`:
        `dW = α⊙Gᴬ + β2⊙Gᶜ`, `db_i = α⊙Σ dA + β2⊙Σ g`, `dα = Σ_k W⊙Gᴬ + b_i⊙Σ dA`,
        `dβ2 = Σ_k W⊙Gᶜ + b_i⊙Σ g`: `p` itself is never formed over the rows.
        No re-evaluation of the step: the gates and `U h` come from the forward. Without `aux`,
        under autocast or with a frozen parameter, the autograd default runs.
        """
        cell = self.cell
        params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        params += (cell.alpha, cell.beta1, cell.beta2)
        if (
            aux is None
            or torch.is_autocast_enabled(x.device.type)
            or not all(p.requires_grad for p in params)
        ):
            super().cell_backward(x, s_prev, delta, aux)
            return
        with torch.no_grad():
            s_prev = s_prev.to(cell.weight_hh.dtype)
            g, grad_gain, du = self._kept_backward(x, s_prev, delta, aux)
            rows = x.to(s_prev.dtype)
            grad_a, grad_c = grad_gain.t() @ rows, g.t() @ rows  # [3h, d] each
            sum_a, sum_c = grad_gain.sum(0), g.sum(0)  # [3h] each
            alpha, beta2 = cell.alpha.unsqueeze(1), cell.beta2.unsqueeze(1)  # [3h, 1]
            grads = (
                alpha * grad_a + beta2 * grad_c,
                du.t() @ s_prev,
                cell.alpha * sum_a + cell.beta2 * sum_c,
                du.sum(0),
                (cell.weight_ih * grad_a).sum(1) + cell.bias_ih * sum_a,
                sum_a,
                (cell.weight_ih * grad_c).sum(1) + cell.bias_ih * sum_c,
            )
        accumulate_grads(params, grads)

    @torch.jit.ignore
    def state_vjp(self, x: Tensor, s_prev: Tensor, v: Tensor, aux: Tensor | None = None) -> Tensor:
        """`RecurrentForecaster.state_vjp` in closed form from the kept `aux` rows:
        `J_tᵀ v = v⊙z + du U` (`du` from `_kept_backward` with `δ = v`; `h` reaches `h_t`
        directly through `z` and through `u = U h + b_h`). Without `aux` or under autocast, the
        autograd default runs."""
        if aux is None or torch.is_autocast_enabled(x.device.type):
            return super().state_vjp(x, s_prev, v, aux)
        hidden = self.hidden_size
        with torch.no_grad():
            s_prev = s_prev.to(self.cell.weight_hh.dtype)
            du = self._kept_backward(x, s_prev, v, aux)[2]
            z = aux[:, 4 * hidden : 5 * hidden].to(s_prev.dtype)
            return torch.addmm(v.to(s_prev.dtype) * z, du, self.cell.weight_hh)  # [R, h]

    @torch.jit.ignore
    def exact_deltas(
        self, x: Tensor, states: Tensor, direct: Tensor, aux: Tensor | None = None
    ) -> Tensor:
        """`RecurrentForecaster.exact_deltas` as one scripted loop over the kept `aux`
        (`_exact_deltas`); the base class's per-step loop without `aux`, under autocast or when
        the loop cannot be scripted."""
        loop = _scripted_exact_deltas()
        if aux is None or loop is None or torch.is_autocast_enabled(x.device.type):
            return super().exact_deltas(x, states, direct, aux)
        cell, hidden = self.cell, self.hidden_size
        dtype = cell.weight_hh.dtype
        with torch.no_grad():
            weight, bias = cell.projection()
            x_tm = x.transpose(0, 1).to(dtype)  # [T, B, d]
            gain = F.linear(x_tm, weight[: 3 * hidden], bias[: 3 * hidden])  # [T, B, 3h] = A
            delta = loop(
                direct.transpose(0, 1).to(dtype).contiguous(),  # [T, B, h]
                gain,
                aux.to(dtype),
                states.transpose(0, 1).to(dtype),  # [T+1, B, h]
                cell.weight_hh,
                hidden,
                _LOOP_BLOCK,
            )
        return delta.transpose(0, 1)  # type: ignore[no-any-return]
