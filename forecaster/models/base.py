"""The model contract every forecaster implements (DESIGN.md §5, ALGORITHMS.md §0 and §5.2).

Every model maps `x [B, T, d] -> [B, T, H]`: from every time step it forecasts the next `H` values
("forking sequences"). The recurrence is split into three pieces so that the same weights serve
three callers:

- `project_inputs(x) -> a`: the input projections of all steps in one matmul (plus bias), outside
  the time loop (`[..., d] -> [..., P]`);
- `recur(a_t, s_prev) -> s_t`: one step of the recurrence on the projected input and the carried
  state (`[N, P], [N, S] -> [N, S]`, any `N`), so the fixed-feedback trainer can re-evaluate all
  `B*T` steps in one batched call (ALGORITHMS.md §5.2 step (b); oracle O13);
- `readout(s) -> y`: the head, a plain batched layer on states (`[..., S] -> [..., H]`);
  `window_readout(s, x, s0)` is the same on a whole window, where a model may read what its
  state copies from the inputs (`LinearLags`) from the inputs instead.

The carried state is always ONE tensor `s [N, S]` with `S = state_size` (GRU/MI-GRU: `h`;
LSTM: `[h; c]`; LMN: `m`; SCRN: `[s_ctx; h]`), which keeps the time loop, the ONNX step graph and
the feedback trainer generic. Everything else (`step`, `run_states`, `forward`, `forecast`,
`recompute_states`, `cell_backward`) is written once here from those three pieces; a model may
replace `run_states`, `cell_backward` and `exact_deltas` (BPTT's reverse recursion) with faster
equivalents, and may keep per-step values of its forward for its `cell_backward`
(`feedback_forward`, LMN). A model whose state carries units
that feed only the head (`feedback_units < state_size`) hands the fixed-feedback trainer the
model of the other units (`feedback_core`, `LinearLags`: the wrapped model).

Export requirements (forecaster/export.py scripts the loop with `torch.jit.script`):
`project_inputs`, `recur` and `readout` must be TorchScript-compatible (annotated tensor
arguments, sizes kept as module attributes, no closures over Python values), and the initial
state must be zeros (the exported graphs build it as zeros). `forward` is marked
`@torch.jit.ignore` so a model can be scripted as a submodule without compiling it; a subclass
that overrides `forward` must keep that decorator. For a compact step graph, split tensors with
`torch.split(t, sizes_list_attribute, dim)` rather than slicing with attribute bounds
(`t[:, :self.n]` exports as a Slice plus shape arithmetic per slice).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from forecaster.errors import ModelError

logger = logging.getLogger(__name__)


def script_loop(function: Callable[..., Any], owner: str) -> Callable[..., Any] | None:
    """`torch.jit.script(function)` for a model's no-grad time loop, or None with a warning when
    scripting fails (the caller then runs its eager loop, which gives the same states)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script in torch 2.13
            return torch.jit.script(function)  # type: ignore[no-any-return]
    except Exception:
        logger.warning(
            "%s: the no-grad loop cannot be scripted; using the eager one", owner, exc_info=True
        )
        return None


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Back-propagate `grads` from `params` as `backward()` would (a closed-form
    `cell_backward`'s last step): into `.grad` of a plain parameter, through the
    parametrization of a parametrized weight (`torch.nn.utils.parametrize`: the tensor read from
    the module is computed from the stored originals), with the parameters' hooks run."""
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
    torch.autograd.backward(list(params), list(grads))


class RecurrentForecaster(nn.Module):
    """Base class of all recurrent forecasters: the shared loop, head and batched-cell contract.

    Subclasses implement `project_inputs`, `recur` and (optionally) `readout`; the default
    readout is the linear head `self.head` applied to the first `head_features` state units
    (all of them unless told otherwise).

    Attributes:
        input_size: features per time step `d`.
        hidden_size: width of the model's hidden layer `h` (architecture-specific meaning).
        horizon: forecast length `H`.
        state_size: width `S` of the carried state tensor.
        head: `nn.Linear(head_features, horizon)`.
    """

    # Registry name of the model family; subclasses set it.
    name: str = "recurrent"
    # Whether fixed-feedback training applies (ALGORITHMS.md §5.2); the trainer checks it.
    supports_feedback: bool = True
    __jit_unused_properties__ = ["feedback_units"]  # noqa: RUF012  (Python-side only)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        horizon: int,
        state_size: int,
        *,
        head_features: int | None = None,
    ) -> None:
        super().__init__()
        sizes = {
            "input_size": input_size,
            "hidden_size": hidden_size,
            "horizon": horizon,
            "state_size": state_size,
        }
        for key, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{key}: {value!r} is not a positive integer", field=key)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.horizon = horizon
        self.state_size = state_size
        self.head_features = state_size if head_features is None else head_features
        self.head = nn.Linear(self.head_features, horizon)

    # ---- the cell contract: implemented by every model --------------------------------------

    def project_inputs(self, x: Tensor) -> Tensor:
        """Input projections of every step in one matmul: `[..., d] -> [..., P]`."""
        raise NotImplementedError

    def recur(self, a_t: Tensor, s_prev: Tensor) -> Tensor:
        """One recurrence step on the projected input: `[N, P], [N, S] -> [N, S]`, any `N`."""
        raise NotImplementedError

    def readout(self, s: Tensor) -> Tensor:
        """Forecast from states: `[..., S] -> [..., H]` (the linear head on the first units)."""
        if self.head_features == self.state_size:
            return self.head(s)
        return self.head(s[..., : self.head_features])

    @torch.jit.ignore
    def window_readout(self, s: Tensor, x: Tensor, s0: Tensor) -> Tensor:
        """Forking forecasts of a window's steps: `s [B, T, S]` (the state after each step),
        `x [B, T, d]` (the window's inputs), `s0 [B, S]` (the state before it) -> `[B, T, H]`.

        Equals `readout(s)` (this default). A model whose state carries copies of its inputs
        (`LinearLags`' register) reads them from `x` and `s0` instead, as one convolution, so the
        gradient reaches those units through `x` and `s0`, never through `s`; there `s` may also
        be the states of `feedback_core()` alone (`[B, T, feedback_units]`). The training paths
        (`forward`, the fixed-feedback head, truncated BPTT) call this; the exported graphs and
        single steps call `readout`.
        """
        return self.readout(s)

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Zero state `[batch_size, S]` on the model's device and dtype unless given."""
        reference = self.head.weight
        return torch.zeros(
            batch_size,
            self.state_size,
            device=reference.device if device is None else device,
            dtype=reference.dtype if dtype is None else dtype,
        )

    @property
    def feedback_units(self) -> int:
        """The leading state units whose `δ` can reach a parameter: those of `feedback_core()`
        (all of them unless a model carries units that feed only the head, e.g. `LinearLags`'
        input register)."""
        return self.feedback_core().state_size

    @torch.jit.ignore
    def feedback_core(self) -> RecurrentForecaster:
        """The model whose state is this one's first `feedback_units` units, with the same
        recurrence there: the fixed-feedback trainer runs its no-grad forward, re-evaluation and
        Jacobian products on it, and `window_readout` reads its states. This model itself unless
        it carries units that feed only the head (`LinearLags`: the wrapped model, whose own
        head is gone: callers pass its initial state rather than ask it for one)."""
        return self

    # ---- written once from the three pieces -------------------------------------------------

    def step(self, x_t: Tensor, s_prev: Tensor) -> Tensor:
        """One step from raw inputs: `x_t [N, d], s_prev [N, S] -> s_t [N, S]`, any `N`."""
        return self.recur(self.project_inputs(x_t), s_prev)

    def run_states(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """All carried states of a window: `x [B, T, d] -> [B, T+1, S]`, with `[:, 0] = s0`.

        Input projections are computed once for the window; the loop walks a time-major tensor
        (`unbind(0)` on `[T, B, P]`), never a batch-first slice. Subclasses may replace this
        with a fused kernel as long as `recur` yields the same states (oracle O13).
        """
        self._check_input(x, s0)
        s = self.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        # Transpose the narrow input, not the projections: [T, B, d] -> [T, B, P].
        a = self.project_inputs(x.transpose(0, 1))  # [T, B, P]
        states = [s]
        for a_t in a.unbind(0):
            s = self.recur(a_t, s)  # [B, S]
            states.append(s)
        return torch.stack(states, dim=1)  # [B, T+1, S]

    @torch.jit.ignore
    def forward(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """Forecasts from every step: `x [B, T, d] -> [B, T, H]` (forking sequences)."""
        states = self.run_states(x, s0)  # [B, T+1, S]
        return self.window_readout(states[:, 1:], x, states[:, 0])

    def forecast(self, x: Tensor, s0: Tensor | None = None) -> Tensor:
        """Forecast from the last step of each window: `x [B, T, d] -> [B, H]`."""
        return self.readout(self.run_states(x, s0)[:, -1])

    def recompute_states(self, x: Tensor, s_prev: Tensor) -> Tensor:
        """Re-evaluate all steps in one batched cell call, given the previous states.

        Args:
            x: inputs `[B, T, d]`.
            s_prev: the state before each step `[B, T, S]` (typically `run_states(x)[:, :-1]`,
                detached).

        Returns:
            States after each step `[B, T, S]`; equal to `run_states(x)[:, 1:]` when `s_prev`
            comes from `run_states` (oracle O13).
        """
        self._check_input(x, None)
        batch, steps = x.size(0), x.size(1)
        if s_prev.shape != (batch, steps, self.state_size):
            raise ModelError(
                f"s_prev: shape {tuple(s_prev.shape)} is not "
                f"[B, T, S] = {(batch, steps, self.state_size)}",
                field="s_prev",
            )
        a = self.project_inputs(x).reshape(batch * steps, -1)  # [B*T, P]
        s = self.recur(a, s_prev.reshape(batch * steps, self.state_size))  # [B*T, S]
        return s.reshape(batch, steps, self.state_size)

    @torch.jit.ignore
    def feedback_forward(self, x: Tensor, s0: Tensor) -> tuple[Tensor, Tensor] | None:
        """Optional no-grad forward of fixed-feedback training that also keeps per-step values
        the model's `cell_backward` reuses instead of recomputing them (step (a) of
        ALGORITHMS.md §5.2): `x [B, T, d], s0 [B, S] -> (states [B, T+1, S], aux [T, B, C])`,
        `aux` time-major. None (this default): the trainer runs the generic `states_no_grad` and
        passes no `aux` (LMN keeps its functional component's outputs `h_t`).
        """
        return None

    @torch.jit.ignore
    def cell_backward(
        self, x: Tensor, s_prev: Tensor, delta: Tensor, aux: Tensor | None = None
    ) -> None:
        """Accumulate `Σ_rows (∂ recur(project_inputs(x), s_prev) / ∂θ)ᵀ δ` into the parameters'
        `.grad` for rows `x [R, d]`, `s_prev [R, S]` (no gradient flows into it), `δ [R, S]`:
        steps (b) and (d) of ALGORITHMS.md §5.2 for one block of rows (the fixed-feedback
        trainer's `batched_cell_backward`). `aux [R, C]`: the rows of `feedback_forward`'s
        auxiliaries when the model returned them, else None.

        This default re-evaluates the rows with autograd and back-propagates `δ` (it returns no
        `aux`, so it ignores it); a model may replace it with a closed form giving the same
        gradients (LMN: no forward of the linear memory, no input gradient of it).
        """
        s_hat = self.recur(self.project_inputs(x), s_prev)  # [R, S]
        if s_hat.requires_grad:  # else every cell parameter is frozen: nothing to accumulate
            s_hat.backward(delta.to(s_hat.dtype))

    @torch.jit.ignore
    def state_vjp(self, x: Tensor, s_prev: Tensor, v: Tensor, aux: Tensor | None = None) -> Tensor:
        """`J_tᵀ v_t` for rows `x [R, d]`, `s_prev [R, S]`, `v [R, S]` -> `[R, S]`, with
        `J_t = ∂ recur(project_inputs(x_t), s_{t−1}) / ∂s_{t−1}`: one block of the Jacobian
        correction sweeps (`state_vector_jacobian`); the parameters' `.grad` are left untouched.
        `aux [R, C]`: as `cell_backward`.

        This default re-evaluates the rows with autograd (ignoring `aux`); a model may replace it
        with a closed form giving the same products (MI-GRU, LMN: from their kept gates).
        """
        with torch.no_grad():
            a = self.project_inputs(x)  # [R, P]
        with torch.enable_grad():
            s_in = s_prev.detach().requires_grad_(True)  # [R, S]
            s_hat = self.recur(a, s_in)  # [R, S]
            (product,) = torch.autograd.grad(s_hat, s_in, v.to(s_hat.dtype))
        return product

    @torch.jit.ignore
    def exact_deltas(
        self, x: Tensor, states: Tensor, direct: Tensor, aux: Tensor | None = None
    ) -> Tensor:
        """BPTT's `δ_t = dL/ds_t` by the exact reverse recursion `δ_t = g_t + J_{t+1}ᵀ δ_{t+1}`
        (ALGORITHMS.md §5.1): `x [B, T, d]`, the window's states `[B, T+1, S]`, the head's
        direct gradients `g [B, T, S]`, `aux [T, B, C]` as `cell_backward` -> `δ [B, T, S]`.
        With `cell_backward` this is exact BPTT from the no-grad forward (the trainer's `bptt`
        for a model that overrides it, `forecaster.training.feedback.exact_bptt_gradients`).

        This default walks the steps with `state_vjp`, one Python call per step: correct for
        every model, fast for none; the MI-GRU, LMN and SCRN replace it with one scripted loop.
        """
        with torch.no_grad():
            x_tm, s_tm = x.transpose(0, 1), states.transpose(0, 1)  # [T, B, d], [T+1, B, S]
            g_tm = direct.transpose(0, 1)  # [T, B, S]
            delta = torch.empty_like(g_tm)  # [T, B, S]
            d = g_tm[-1]
            delta[-1] = d
            for t in range(g_tm.size(0) - 2, -1, -1):
                kept = None if aux is None else aux[t + 1]
                d = g_tm[t] + self.state_vjp(x_tm[t + 1], s_tm[t + 1], d, kept).to(d.dtype)
                delta[t] = d
        return delta.transpose(0, 1)

    def _check_input(self, x: Tensor, s0: Tensor | None) -> None:
        if x.dim() != 3 or x.size(-1) != self.input_size:
            raise ModelError(
                f"x: shape {tuple(x.shape)} is not [B, T, d] with d = {self.input_size}",
                field="x",
            )
        if s0 is not None and s0.shape != (x.size(0), self.state_size):
            raise ModelError(
                f"s0: shape {tuple(s0.shape)} is not [B, S] = {(x.size(0), self.state_size)}",
                field="s0",
            )
