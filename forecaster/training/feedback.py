"""Fixed-feedback gradients: reverse scans, the batched gradient step and the estimate of `d`.

Caillon, Fagnou, Allauzen 2025 (arXiv 2503.23104), Diagonal State Feedbacks. Implements
ALGORITHMS.md §5.2 (per-step loss: no-grad forward, batched cell re-evaluation on detached
previous states, head gradients, reverse linear scan `δ_t = g_t + d ⊙ δ_{t+1}`, one backward) and
§5.3 (choosing `d`: `constant`, `ssm_grid`, `jacobian_mean` from the exact Jacobian diagonal).

Two extensions of ours, both exact in a limit and tested there:
- `jacobian_matrix`: the whole mean Jacobian `M` as a non-diagonal fixed feedback,
  `δ_t = g_t + Mᵀ δ_{t+1}` (§5.2 "Non-diagonal fixed feedback"). The diagonal drops the
  off-diagonal paths that carry LMN's memory mixing and SCRN's context → hidden coupling; on
  ETTh2 (trained models) the gradient cosine with BPTT rose from 0.62 to 0.89 (LMN) and the
  test MSE gap to BPTT closed (benchmarks/results/ett_corrections.md). Equals BPTT for a
  linear cell whose Jacobian is `M`.
- correction sweeps (`corrected_deltas`): batched vector–Jacobian products on the stored
  states, parallel in time, each making one more step of every path exact; `T − 1` sweeps are
  BPTT.
And the ablation §5.3 lists as option 4, `per_step_diag` (`PerStepDiagonal`): the exact Jacobian
diagonal of every visited step in the scan instead of its mean — not a fixed feedback, so it
measures what the stationarity assumption costs, with the diagonal structure kept.
Where the mean Jacobian has a closed form in the weights and a statistic of the visited steps
(LMN: the mean activation slope), the estimate keeps that statistic and `feedback_at_parameters`
re-evaluates `d` at the current weights, which the trainer does every step: "fixed" then means
fixed over the time steps of a window, as §5.2 needs, not over the steps of an epoch.
Pinned by oracles O9 (T = 1 equals BPTT), O10 (exact when the cell's Jacobian is the fixed
diagonal), O11 (`d = 0` equals fully truncated BPTT), O12 (the scans agree), O13 (the fast
forward and the blocked re-evaluation match the model) and O14 (gradient quality). Gradients
only: the trainer zeroes, clips and steps."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from forecaster.errors import ModelError
from forecaster.losses import to_loss_dtype
from forecaster.models.base import RecurrentForecaster, script_loop

if TYPE_CHECKING:
    from forecaster.config import FeedbackConfig

__all__ = [
    "ChunkLocal",
    "Feedback",
    "FeedbackEstimate",
    "JacobianMethod",
    "LossFn",
    "PerStepDiagonal",
    "ScanMethod",
    "batched_cell_backward",
    "corrected_deltas",
    "estimate_feedback",
    "exact_bptt_gradients",
    "feedback_at_parameters",
    "feedback_gradients",
    "feedback_states",
    "jacobian_diagonal",
    "jacobian_mean_matrix",
    "jacobian_profile",
    "per_step_feedback",
    "reverse_scan",
    "reverse_scan_matrix",
    "spectral_radius",
    "state_vector_jacobian",
    "states_no_grad",
]

logger = logging.getLogger(__name__)

ScanMethod = Literal["loop", "chunked", "associative", "fft"]
ChunkLocal = Literal["auto", "toeplitz", "recurrence"]
JacobianMethod = Literal["auto", "closed_form", "exact", "hutchinson"]
LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (pred, target, mask) -> scalar

SCAN_METHODS: tuple[str, ...] = ("loop", "chunked", "associative", "fft")
# Above this state width the exact Jacobian (S vector-Jacobian products per row) costs more than
# it is worth; Hutchinson probes take over (ALGORITHMS.md §5.3).
EXACT_JACOBIAN_MAX_STATE = 256
# Rows per vmap(jacrev) call: bounds the [rows, S, S] Jacobian block in memory (~4M elements).
_JACOBIAN_BLOCK_ELEMENTS = 1 << 22
# Working set of one CPU block of the batched re-evaluation (~4 MiB: stays in a core's cache).
_CPU_BLOCK_BYTES = 1 << 22


@dataclass(frozen=True)
class PerStepDiagonal:
    """The time-varying diagonal feedback of ALGORITHMS.md §5.3 option 4 (`per_step_diag`).

    Not the paper's fixed feedback but an ablation of it: every batch, the scan uses the exact
    Jacobian diagonal of each visited step, `d_t = clip(diag ∂s_{t+1}/∂s_t, ±rho_max)`
    (`per_step_feedback`), computed after the no-grad forward. Exact where the cell's Jacobian
    is diagonal; what it gains over `jacobian_mean` is what the stationarity assumption costs.
    """

    rho_max: float = 0.999

    def __post_init__(self) -> None:
        if not 0.0 < self.rho_max < 1.0:
            raise ModelError(f"rho_max: {self.rho_max!r} is not in (0, 1)", field="rho_max")


# The feedback of a gradient call: a fixed `d` ([S], [B, T, S] or [S, S]) or the per-step rule.
Feedback = Tensor | PerStepDiagonal


# ---- reverse scans (ALGORITHMS.md §5.2, oracle O12) --------------------------------------------


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: half-precision gradients (AMP) are scanned in float32."""
    return torch.promote_types(dtype, torch.float32)


def _powers(d: Tensor, n: int) -> Tensor:
    """`d^0 .. d^n` by repeated products (never a negative power): `[S] -> [n + 1, S]`."""
    ones = torch.ones_like(d).unsqueeze(0)  # [1, S]
    if n == 0:
        return ones
    return torch.cat([ones, d.unsqueeze(0).expand(n, -1)]).cumprod(0)  # [n + 1, S]


def _scan_loop(g: Tensor, d: Tensor, varying: bool) -> Tensor:
    steps = g.shape[-2]
    out = torch.empty_like(g)  # [..., T, S]
    acc = g[..., steps - 1, :]
    out[..., steps - 1, :] = acc
    for t in range(steps - 2, -1, -1):
        acc = torch.addcmul(g[..., t, :], d[..., t, :] if varying else d, acc)  # [..., S]
        out[..., t, :] = acc
    return out


def _carry_chunks(first: Tensor, transfer: Tensor) -> Tensor:
    """True `δ` at the start of chunk `c + 1`, for every chunk `c`: `[n, L, S]`.

    `first[c]` is the chunk-local `δ` at the start of chunk `c`; `transfer` (`[S]`, or `[n, L, S]`
    for a time-varying `d`) maps the `δ` after a chunk to its start.
    """
    chunks = first.shape[0]
    carry = torch.zeros_like(first)  # [n, L, S]; the last chunk has nothing after it
    acc = torch.zeros_like(first[0])  # [L, S]
    varying = transfer.dim() > 1
    for c in range(chunks - 2, -1, -1):
        factor = transfer[c + 1] if varying else transfer
        acc = torch.addcmul(first[c + 1], factor, acc)  # δ at the start of chunk c + 1
        carry[c] = acc
    return carry


def _time_major(t: Tensor, pad: int) -> Tensor:
    """`[..., T, S] -> [T + pad, L, S]` (zero rows appended); a view when `t` is time-major."""
    steps, width = t.shape[-2], t.shape[-1]
    out = t.movedim(-2, 0).reshape(steps, -1, width)  # [T, L, S]
    if pad:
        out = torch.cat([out, out.new_zeros(pad, *out.shape[1:])])
    return out


def _scan_chunked(g: Tensor, d: Tensor, varying: bool, chunk: int, local: str) -> Tensor:
    # Works time-major, [n, C, L, S]: every per-step slice is contiguous (free when G is stored
    # time-major, as the scripted forward leaves it). Zero-padding after T is exact: the padded
    # steps carry δ = 0 back to step T − 1.
    steps, width = g.shape[-2], g.shape[-1]
    size = min(chunk, steps)
    chunks = -(-steps // size)
    pad = chunks * size - steps
    gc = _time_major(g, pad).reshape(chunks, size, -1, width)  # [n, C, L, S]
    toeplitz = local == "toeplitz" or (local == "auto" and g.device.type != "cpu")
    if varying:
        dc = _time_major(d, pad).reshape(chunks, size, -1, width)  # [n, C, L, S]
        local_delta = torch.empty_like(gc)  # chunk-local δ
        gain = torch.empty_like(gc)  # Π_{k=i}^{C−1} d_k: maps δ after the chunk to position i
        acc, prod = gc[:, size - 1], dc[:, size - 1]
        local_delta[:, size - 1], gain[:, size - 1] = acc, prod
        for i in range(size - 2, -1, -1):  # all chunks at once: C sequential steps
            acc = torch.addcmul(gc[:, i], dc[:, i], acc)
            prod = dc[:, i] * prod
            local_delta[:, i], gain[:, i] = acc, prod
        carry = _carry_chunks(local_delta[:, 0], gain[:, 0])  # [n, L, S]
        delta = torch.addcmul(local_delta, gain, carry.unsqueeze(1))
    else:
        powers = _powers(d, size)  # [C + 1, S]: d^0 .. d^C
        if toeplitz:
            # Closed form inside each chunk: δ^loc_i = Σ_{j ≥ i} d^{j−i} g_j, one batched matmul
            # with units leading, [S, C(i), C(j)] @ [S, C(j), n·L].
            index = torch.arange(size, device=g.device)
            lag = index.unsqueeze(0) - index.unsqueeze(1)  # [C, C]: lag[i, j] = j − i
            kernel = powers[lag.clamp_min(0)] * (lag >= 0).unsqueeze(-1).to(g.dtype)  # [C, C, S]
            g_units = gc.permute(3, 1, 0, 2).reshape(width, size, -1)  # [S, C, n·L]
            local_delta = torch.bmm(kernel.permute(2, 0, 1), g_units)  # [S, C, n·L]
            local_delta = local_delta.reshape(width, size, chunks, -1).permute(2, 1, 3, 0)
        else:
            # The same chunk-local δ by a C-step recurrence over all chunks at once: O(1) work
            # per element instead of O(C), and measured 3x faster on CPU.
            local_delta = torch.empty_like(gc)  # [n, C, L, S]
            acc = gc[:, size - 1]
            local_delta[:, size - 1] = acc
            for i in range(size - 2, -1, -1):
                acc = torch.addcmul(gc[:, i], d, acc)
                local_delta[:, i] = acc
        carry = _carry_chunks(local_delta[:, 0], powers[size])  # [n, L, S]
        # δ_t = δ^loc_t + d^{e+1−t} δ_{e+1}, e + 1 − t = C − i for position i in its chunk.
        delta = torch.addcmul(local_delta, powers.flip(0)[:size].unsqueeze(1), carry.unsqueeze(1))
    delta = delta.reshape(chunks * size, -1, width)[:steps]  # [T, L, S]
    return delta.reshape(steps, *g.shape[:-2], width).movedim(0, -2)  # [..., T, S]


def _scan_associative(g: Tensor, d: Tensor, varying: bool) -> Tensor:
    # Reverse-time Hillis–Steele scan of (a, b) ∘ (a', b') = (a a', a b' + b): log2 T sweeps.
    steps = g.shape[-2]
    b, a = g, d
    offset = 1
    while offset < steps:
        keep = steps - offset
        head = a[..., :keep, :] if varying else a
        combined = torch.addcmul(b[..., :keep, :], head, b[..., offset:, :])  # [..., T−k, S]
        b = torch.cat([combined, b[..., keep:, :]], dim=-2)
        if varying:
            a = torch.cat([a[..., :keep, :] * a[..., offset:, :], a[..., keep:, :]], -2)
        else:
            a = a * a  # d^{2·offset}: only ever used where the full product exists
        offset *= 2
    return b


def _scan_fft(g: Tensor, d: Tensor) -> Tensor:
    # δ reversed = (g reversed) * (1, d, d², …): a causal convolution, padded to 2T (no wrap).
    steps = g.shape[-2]
    kernel = _powers(d, steps - 1)  # [T, S]
    spectrum = torch.fft.rfft(g.flip(-2), n=2 * steps, dim=-2)  # [..., T + 1, S]
    spectrum = spectrum * torch.fft.rfft(kernel, n=2 * steps, dim=0)
    out = torch.fft.irfft(spectrum, n=2 * steps, dim=-2)[..., :steps, :]  # [..., T, S]
    return out.flip(-2)


def reverse_scan_matrix(G: Tensor, M: Tensor) -> Tensor:
    """The reverse recursion of a non-diagonal fixed feedback `δ_t = g_t + Mᵀ δ_{t+1}` (§5.2).

    T sequential `[B, S] × [S, S]` products over a time-major copy (row vectors: `δ_{t+1} M`).
    Half precision is scanned in float32 and cast back.

    Args:
        G: direct gradients `[B, T, S]`.
        M: the fixed feedback `[S, S]` (`M[i, j] ≈ ∂s_{t+1}[i]/∂s_t[j]`).
    """
    if G.dim() != 3 or M.shape != (G.shape[-1], G.shape[-1]):
        raise ModelError(
            f"M: shape {tuple(M.shape)} is not [S, S] for G {tuple(G.shape)} = [B, T, S]",
            field="d",
        )
    dtype = _scan_dtype(G.dtype)
    g = G.to(dtype).transpose(0, 1)  # [T, B, S]
    m = M.to(device=G.device, dtype=dtype)
    out = torch.empty_like(g)
    acc = g[-1]
    out[-1] = acc
    for t in range(g.shape[0] - 2, -1, -1):
        acc = torch.addmm(g[t], acc, m)  # g_t + δ_{t+1} M
        out[t] = acc
    return out.transpose(0, 1).to(G.dtype)


def reverse_scan(
    G: Tensor,
    d: Tensor,
    method: ScanMethod = "chunked",
    chunk: int = 64,
    *,
    local: ChunkLocal = "auto",
) -> Tensor:
    """The reverse linear recursion `δ_t = g_t + d ⊙ δ_{t+1}`, `δ_{T−1} = g_{T−1}` (§5.2).

    Every method uses non-negative powers of `d` only (never `d^{−t}`) and they agree to
    rounding (oracle O12). Half-precision input is scanned in float32 and cast back.

    Args:
        G: direct gradients `g_t = ∂L/∂s_t`, `[B, T, S]` (any leading shape, time at dim −2).
        d: the fixed feedback `[S]`, or a time-varying one of G's shape where `d[..., t, :]`
            multiplies `δ_{t+1}` (the diagonal of `∂s_{t+1}/∂s_t`; `d[..., T−1, :]` is unused).
        method: `loop` (T sequential element-wise steps; the reference), `chunked` (chunk-local
            scans, a pass over the T / C chunk boundaries, one fix-up), `associative` (log2 T
            sweeps of a Hillis–Steele scan), `fft` (the paper's convolution route; constant `d`).
        chunk: chunk length `C` of `chunked`.
        local: how `chunked` scans inside a chunk for a constant `d`: `toeplitz` (the closed
            form, kernel `d_u^{j−i}` applied as one batched matmul: parallel, for GPUs),
            `recurrence` (C sequential steps over all chunks at once: least work, for CPUs), or
            `auto` (toeplitz off the CPU). A time-varying `d` always uses the recurrence.

    Returns:
        `δ`, G's shape and dtype.

    Raises:
        ModelError: unknown method, a `d` of the wrong shape, `fft` with a time-varying `d`,
            `chunk < 1`.
    """
    if method not in SCAN_METHODS:
        raise ModelError(f"scan: {method!r} is not one of {list(SCAN_METHODS)}", field="scan")
    if G.dim() < 2 or G.shape[-2] < 1:
        raise ModelError(f"G: shape {tuple(G.shape)} is not [..., T, S] with T >= 1", field="G")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ModelError(f"chunk: {chunk!r} is not a positive integer", field="chunk")
    varying = d.dim() > 1
    if (varying and d.shape != G.shape) or (not varying and d.shape != G.shape[-1:]):
        raise ModelError(
            f"d: shape {tuple(d.shape)} is neither [S] = {tuple(G.shape[-1:])} nor G's "
            f"{tuple(G.shape)}",
            field="d",
        )
    if varying and method == "fft":
        raise ModelError(
            "scan: 'fft' needs a constant d [S] (a time-varying d is not a convolution); "
            "use 'associative', 'chunked' or 'loop'",
            field="scan",
        )
    if local not in ("auto", "toeplitz", "recurrence"):
        raise ModelError(
            f"local: {local!r} is not one of ['auto', 'toeplitz', 'recurrence']", field="local"
        )
    dtype = _scan_dtype(G.dtype)
    g = G.to(dtype)
    dd = d.to(device=G.device, dtype=dtype)
    if method == "loop":
        out = _scan_loop(g, dd, varying)
    elif method == "chunked":
        out = _scan_chunked(g, dd, varying, chunk, local)
    elif method == "associative":
        out = _scan_associative(g, dd, varying)
    else:
        out = _scan_fft(g, dd)
    return out.to(G.dtype)


# ---- the Jacobian diagonal and the estimate of d (ALGORITHMS.md §5.3) --------------------------


def _require_feedback(model: RecurrentForecaster) -> None:
    if not model.supports_feedback:
        raise ModelError(
            f"model {model.name!r} does not support fixed-feedback training: a diagonal feedback "
            "on its carried state cannot move gradient into the memory it depends on "
            "(ALGORITHMS.md §5.2); train it with method 'bptt' or 'tbptt'",
            field="method",
        )


def _check_states(model: RecurrentForecaster, x: Tensor, s_prev: Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] != model.input_size:
        raise ModelError(
            f"x: shape {tuple(x.shape)} is not [..., d] with d = {model.input_size}", field="x"
        )
    if s_prev.shape != (*x.shape[:-1], model.state_size):
        raise ModelError(
            f"s_prev: shape {tuple(s_prev.shape)} is not [..., S] = "
            f"{(*x.shape[:-1], model.state_size)}",
            field="s_prev",
        )


def _exact_diagonal(model: RecurrentForecaster, x: Tensor, s_prev: Tensor) -> Tensor:
    width = model.state_size
    a = model.project_inputs(x)  # [..., P]
    a = a.reshape(-1, a.shape[-1])  # [N, P]
    s = s_prev.reshape(-1, width)  # [N, S]

    def one_step(a_i: Tensor, s_i: Tensor) -> Tensor:
        return model.recur(a_i.unsqueeze(0), s_i.unsqueeze(0)).squeeze(0)  # [S]

    jacobian = torch.func.vmap(torch.func.jacrev(one_step, argnums=1))
    rows = max(1, _JACOBIAN_BLOCK_ELEMENTS // (width * width))
    blocks = [
        torch.diagonal(jacobian(a[i : i + rows], s[i : i + rows]), dim1=-2, dim2=-1)  # [n, S]
        for i in range(0, s.shape[0], rows)
    ]
    return torch.cat(blocks).reshape(s_prev.shape)


def _hutchinson_diagonal(
    model: RecurrentForecaster,
    x: Tensor,
    s_prev: Tensor,
    probes: int,
    generator: torch.Generator | None,
) -> Tensor:
    # diag(J) = E_v[v ⊙ Jᵀv] for Rademacher v; one vector–Jacobian product per probe.
    with torch.enable_grad():
        s = s_prev.detach().clone().requires_grad_(True)  # [..., S]
        a = model.project_inputs(x).detach()  # [..., P]
        out = model.recur(a.reshape(-1, a.shape[-1]), s.reshape(-1, model.state_size))  # [N, S]
        out = out.reshape(s.shape)  # [..., S]
        total = torch.zeros_like(s_prev)
        for k in range(probes):
            bits = torch.randint(0, 2, s.shape, generator=generator, device=s.device)
            v = (2 * bits - 1).to(s.dtype)  # [..., S] Rademacher
            (vjp,) = torch.autograd.grad(out, s, v, retain_graph=k < probes - 1)
            total += v * vjp
    return total / probes


def jacobian_diagonal(
    model: RecurrentForecaster,
    x: Tensor,
    s_prev: Tensor,
    *,
    method: JacobianMethod = "auto",
    probes: int = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diagonal of the state Jacobian `∂s_t/∂s_{t−1}` at every step (ALGORITHMS.md §5.3).

    Args:
        model: the forecaster.
        x: inputs `[..., d]` (e.g. `[B, T, d]`).
        s_prev: the state before each step `[..., S]` (e.g. `run_states(x)[:, :-1]`).
        method: `closed_form` (the model's `state_jacobian_diagonal`), `exact`
            (`torch.func.vmap(jacrev(recur))`), `hutchinson` (`mean_v v ⊙ Jᵀv`, Rademacher
            probes: unbiased, noisy per step), or `auto`: closed form when the model has one,
            else exact for `S ≤ 256`, else Hutchinson.
        probes: Hutchinson probes.
        generator: random source of the Hutchinson probes.

    Returns:
        `[..., S]`, detached.
    """
    _check_states(model, x, s_prev)
    closed_form = getattr(model, "state_jacobian_diagonal", None)
    if method == "auto":
        if closed_form is not None:
            method = "closed_form"
        elif model.state_size <= EXACT_JACOBIAN_MAX_STATE:
            method = "exact"
        else:
            method = "hutchinson"
    if method == "closed_form":
        if closed_form is None:
            raise ModelError(
                f"model {model.name!r} has no closed-form state_jacobian_diagonal; use method "
                "'auto', 'exact' or 'hutchinson'",
                field="method",
            )
        with torch.no_grad():
            return closed_form(x, s_prev)
    if method == "exact":
        with torch.no_grad():
            return _exact_diagonal(model, x, s_prev.detach())
    if method == "hutchinson":
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ModelError(f"probes: {probes!r} is not a positive integer", field="probes")
        return _hutchinson_diagonal(model, x, s_prev, probes, generator).detach()
    raise ModelError(
        f"method: {method!r} is not one of ['auto', 'closed_form', 'exact', 'hutchinson']",
        field="method",
    )


def per_step_feedback(
    model: RecurrentForecaster, x: Tensor, s_prev: Tensor, rho_max: float
) -> Tensor:
    """The time-varying feedback of `PerStepDiagonal` for one batch: `d [B, T, S]`.

    `d[:, t] = clip(diag ∂s_{t+1}/∂s_t, ±rho_max)` at the visited states (the layout
    `reverse_scan` reads: `d[:, t]` multiplies `δ_{t+1}`); `d[:, T−1]` is unused and 0.

    Args:
        model: the forecaster.
        x: inputs `[B, T, d]`.
        s_prev: the state before each step `[B, T, S]`.
        rho_max: the clip, in (0, 1).
    """
    diagonal = jacobian_diagonal(model, x, s_prev)  # [B, T, S]: diag ∂s_t/∂s_{t−1}
    d = torch.zeros_like(diagonal)
    d[:, :-1] = diagonal[:, 1:].clamp(-rho_max, rho_max)
    return d


def jacobian_profile(
    model: RecurrentForecaster,
    batches: Iterable[Tensor | Sequence[Tensor]],
    *,
    max_batches: int | None = None,
) -> Tensor:
    """Per time step, the mean over windows of the Jacobian diagonal `diag(J_t)`: `[T, S]`.

    The states are those the model visits on each window from a zero state (`states_no_grad`);
    the diagonal is `jacobian_diagonal` (method auto). Its mean over time is the `jacobian_mean`
    feedback (§5.3); its variation over time is the Jacobian-stationarity check (§5.5 check 3).

    Args:
        model: the forecaster.
        batches: input windows `x [B, T, d]` (or `(x, ...)` tuples), all of the same `T`; moved
            to the model's device and dtype.
        max_batches: use at most this many batches (None: all).

    Returns:
        `[T, S]` float64 on the model's device, detached.

    Raises:
        ModelError: no batch, or batches of different window lengths.
    """
    reference = model.head.weight
    core, units = model.feedback_core(), model.feedback_units  # the rest: zero diagonal
    total: Tensor | None = None
    count = 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        x = _batch_inputs(batch).to(device=reference.device, dtype=reference.dtype)
        if total is not None and x.shape[1] != total.shape[0]:
            raise ModelError(
                f"batches: windows of {x.shape[1]} and {total.shape[0]} steps; the Jacobian "
                "profile needs one window length",
                field="batches",
            )
        with torch.no_grad():
            s0 = x.new_zeros(x.shape[0], units)
            s_prev = states_no_grad(core, x, s0)[:, :-1]  # [B, T, F]
        diagonal = jacobian_diagonal(core, x, s_prev).to(torch.float64).sum(dim=0)  # [T, F]
        total = diagonal if total is None else total + diagonal
        count += x.shape[0]
    if total is None or count == 0:
        raise ModelError(
            "batches: no input window to estimate the Jacobian diagonal from", field="batches"
        )
    if units < model.state_size:
        total = torch.cat([total, total.new_zeros(total.shape[0], model.state_size - units)], 1)
    return total / count


def jacobian_mean_matrix(
    model: RecurrentForecaster,
    batches: Iterable[Tensor | Sequence[Tensor]],
    *,
    max_batches: int | None = None,
    max_rows: int = 4096,
) -> Tensor:
    """The mean over visited steps of the full state Jacobian `E[∂s_t/∂s_{t−1}]`: `[S, S]`.

    Only the mean is needed, so no per-step Jacobian is formed: one batched cell call on up to
    `max_rows` steps spread evenly over the windows of the first `max_batches` batches (states
    from a zero state), then one vector–Jacobian product per unit `i` of its row-summed output,
    `Σ_n ∂s_t[n, i]/∂s_{t−1}[n, :]` (row `i` of the summed Jacobian). `w` backward passes over
    the rows instead of `N·w` for per-step Jacobians (S = 80, 4096 steps: 0.1 s instead of
    2.4 s on one CPU thread). Its diagonal is the `jacobian_mean` feedback.

    Returns:
        `[S, S]` float64 on the model's device, detached; row `i` holds `∂s_t[i]/∂s_{t−1}`;
        rows and columns beyond `model.feedback_units` are zero.

    Raises:
        ModelError: no batch.
    """
    reference = model.head.weight
    width = model.state_size
    # The units that reach a parameter, as their own model; the rest feed only the head: their
    # rows and columns stay 0.
    core, units = model.feedback_core(), model.feedback_units
    inputs: list[Tensor] = []
    previous: list[Tensor] = []
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        x = _batch_inputs(batch).to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            s_prev = states_no_grad(core, x, x.new_zeros(x.shape[0], units))[:, :-1]  # [B, T, F]
            a = core.project_inputs(x)  # [B, T, P]
        inputs.append(a.reshape(-1, a.shape[-1]))
        previous.append(s_prev.reshape(-1, units))
    if not inputs:
        raise ModelError(
            "batches: no input window to estimate the Jacobian matrix from", field="batches"
        )
    a, s = torch.cat(inputs), torch.cat(previous)  # [N, P], [N, F]
    pick = torch.linspace(0, s.shape[0] - 1, min(max_rows, s.shape[0]), device=s.device)
    pick = pick.round().long().unique()
    a, s = a[pick], s[pick]
    total = torch.zeros(width, width, dtype=torch.float64, device=s.device)
    with torch.enable_grad():
        lead = s.detach().requires_grad_(True)  # [N, F]
        out = core.recur(a, lead).sum(dim=0)  # [F]
        for i in range(units):
            (row,) = torch.autograd.grad(out[i], lead, retain_graph=i < units - 1)  # [N, F]
            total[i, :units] = row.sum(dim=0).to(torch.float64)
    return total / s.shape[0]


def spectral_radius(matrix: Tensor) -> float:
    """`max |λ|` over the eigenvalues of a square matrix (float64 on the CPU)."""
    return float(torch.linalg.eigvals(matrix.detach().to("cpu", torch.float64)).abs().max())


@dataclass(frozen=True, eq=False)
class FeedbackEstimate:
    """A fixed feedback `d` and how it was obtained (ALGORITHMS.md §5.3, §5.5 check 2).

    Attributes:
        d: the feedback `[S]`, clipped to `[−ρ_max, ρ_max]` — or for `jacobian_matrix` the
            matrix `M [S, S]` scaled down to spectral radius `ρ_max` when above it — on the
            model's device and dtype.
        spectral_radius: `max_u |d_u|` (`max |λ(M)|`) after the clip (< 1: the backward system
            is stable).
        unclipped_spectral_radius: the same before the clip (> 1: expanding dynamics, BPTT
            gradients would explode too).
        kind: `constant`, `ssm_grid`, `jacobian_mean`, `jacobian_matrix` or `per_step_diag`.
        seconds: wall time of the estimate.
        statistic: for a model with a closed-form mean Jacobian (`mean_jacobian`, LMN), the
            statistic of the visited steps it was computed from, so that `feedback_at_parameters`
            can re-evaluate `d` at later parameters; None otherwise.
    """

    d: Tensor
    spectral_radius: float
    unclipped_spectral_radius: float
    kind: str
    seconds: float
    statistic: Tensor | None = None


def _batch_inputs(batch: object) -> Tensor:
    """`x` from a batch given as a tensor or as a tuple/list whose first item is `x`."""
    x = batch[0] if isinstance(batch, tuple | list) else batch
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ModelError(f"batches: an item {shape} is not an input tensor [B, T, d]", field="x")
    return x


def estimate_feedback(
    model: RecurrentForecaster,
    batches: Iterable[Tensor | Sequence[Tensor]],
    config: FeedbackConfig,
) -> FeedbackEstimate:
    """The fixed feedback `d [S]` of `config.kind` at the model's current parameters (§5.3).

    - `constant`: `d_u = config.value` for every unit.
    - `ssm_grid`: `d_u = exp(−1/τ_u)`, `τ_u` log-spaced in `[1, T]` (T from the first batch).
    - `jacobian_mean`: the mean over batch and time of the exact Jacobian diagonal at the states
      visited on the first `config.estimate_batches` batches (`jacobian_diagonal`, method auto).
    - `jacobian_matrix`: the whole mean Jacobian `M [S, S]` on the same steps
      (`jacobian_mean_matrix`): a non-diagonal fixed feedback, `δ_t = g_t + Mᵀ δ_{t+1}` (§5.2).
    - `per_step_diag`: the `jacobian_mean` estimate, which reports the radius and feeds the
      gate; the gradients use `PerStepDiagonal` instead (`Trainer`).

    Then `d` is clipped to `[−rho_max, rho_max]` (M is scaled to spectral radius `rho_max`).

    Args:
        model: the forecaster (must support feedback).
        batches: input windows `x [B, T, d]` (or `(x, ...)` tuples); moved to the model's device
            and dtype.
        config: `train.feedback`.

    Raises:
        ModelError: the model does not support feedback, or `batches` is empty where needed.
    """
    _require_feedback(model)
    start = time.perf_counter()
    reference = model.head.weight
    width = model.state_size
    statistic: Tensor | None = None
    if config.kind == "constant":
        raw = torch.full((width,), float(config.value), dtype=torch.float64)
    elif config.kind == "ssm_grid":
        first = next(iter(batches), None)
        if first is None:
            raise ModelError(
                "batches: no input window to estimate the 'ssm_grid' feedback from",
                field="batches",
            )
        steps = _batch_inputs(first).shape[1]
        tau = torch.logspace(0.0, math.log10(max(steps, 1)), width, dtype=torch.float64)
        raw = torch.exp(-1.0 / tau)  # [S]
    else:
        batches = list(batches)
        statistic = _jacobian_statistic(model, batches, config.estimate_batches)
        if statistic is not None:  # the closed form (LMN): exact over every visited step
            raw = model.mean_jacobian(statistic, config.kind == "jacobian_matrix")  # type: ignore[operator]
        elif config.kind == "jacobian_matrix":
            raw = jacobian_mean_matrix(model, batches, max_batches=config.estimate_batches)
        else:
            # Every window has the same T, so the mean over time of the per-step means is the
            # mean over batch and time.
            raw = jacobian_profile(model, batches, max_batches=config.estimate_batches).mean(0)
    d, radius, unclipped = _bounded(raw.cpu(), config.rho_max, exact=True)
    return FeedbackEstimate(
        d=d.to(device=reference.device, dtype=reference.dtype),
        spectral_radius=radius,
        unclipped_spectral_radius=unclipped,
        kind=config.kind,
        seconds=time.perf_counter() - start,
        statistic=statistic,
    )


def _jacobian_statistic(
    model: RecurrentForecaster, batches: list[Tensor | Sequence[Tensor]], max_batches: int
) -> Tensor | None:
    """The model's closed-form mean-Jacobian statistic (`jacobian_statistic`) over the steps of
    the first `max_batches` batches (states from a zero state; equal-length windows, so the mean
    of the batch means), or None when the model has no closed form."""
    closed_form = getattr(model, "jacobian_statistic", None)
    if closed_form is None:
        return None
    reference = model.head.weight
    means: list[Tensor] = []
    for batch in batches[:max_batches]:
        x = _batch_inputs(batch).to(device=reference.device, dtype=reference.dtype)
        mean = closed_form(x, states_no_grad(model, x)[:, :-1])
        if mean is None:
            return None
        means.append(mean)
    if not means:
        raise ModelError("batches: no input window to estimate the feedback from", field="batches")
    return torch.stack(means).mean(dim=0)


def _radius_bound(matrix: Tensor, squarings: int = 7) -> float:
    """An upper bound of the spectral radius: `‖M^k‖_F^{1/k} ≥ ρ(M)` with `k = 2^squarings`, by
    repeated normalised squaring — a few matmuls where `eigvals` of a 256 × 256 matrix takes
    ~40 ms on one CPU thread. The excess is the k-th root of `√n` times the conditioning of
    `M`'s eigenvectors: a few % at k = 128."""
    a = matrix.detach().to(torch.float64)
    log_scale = 0.0  # invariant: M^(2^j) = exp(log_scale) · a
    for _ in range(squarings):
        norm = float(torch.linalg.matrix_norm(a))
        if norm == 0.0:
            return 0.0
        a = a / norm
        log_scale = 2.0 * (log_scale + math.log(norm))
        a = a @ a
    norm = float(torch.linalg.matrix_norm(a))
    if norm == 0.0:
        return 0.0
    return math.exp((log_scale + math.log(norm)) / 2.0**squarings)


def _bounded(raw: Tensor, rho_max: float, *, exact: bool) -> tuple[Tensor, float, float]:
    """`(d, radius, unclipped radius)`: a diagonal clipped to `[−rho_max, rho_max]`, a matrix
    scaled down to spectral radius `rho_max` when above it. `exact=False` (the per-step
    re-evaluation) checks a matrix with `_radius_bound` first and pays for `eigvals` only when
    the bound reaches `rho_max` (the radius reported is then the bound, ≥ the true one)."""
    if raw.dim() == 2:
        unclipped = spectral_radius(raw) if exact else _radius_bound(raw)
        if not exact and unclipped >= rho_max:
            unclipped = spectral_radius(raw)
        d = raw * (rho_max / unclipped) if unclipped > rho_max else raw
        return d, min(unclipped, rho_max), unclipped
    unclipped = float(raw.abs().max())
    d = raw.clamp(-rho_max, rho_max)
    return d, float(d.abs().max()), unclipped


def feedback_at_parameters(
    model: RecurrentForecaster, estimate: FeedbackEstimate, rho_max: float
) -> FeedbackEstimate:
    """`estimate` re-evaluated at the model's current parameters from its `statistic` (the
    closed-form mean Jacobian, LMN): the same visited-step statistic, the weights of now, then
    the same clip (`rho_max`). The trainer calls it every `train.feedback.refresh_steps` steps:
    the mean Jacobian of a linear memory moves with its weights within an epoch (ETTh1 H = 96,
    LMN with the matrix feedback: 0.068 → 0.066 test MSE, BPTT 0.063).

    Raises:
        ModelError: `estimate` carries no statistic (the model has no closed form).
    """
    if estimate.statistic is None:
        raise ModelError(
            f"feedback: model {model.name!r} has no closed-form mean Jacobian to re-evaluate",
            field="refresh_steps",
        )
    start = time.perf_counter()
    reference = model.head.weight
    raw = model.mean_jacobian(estimate.statistic, estimate.d.dim() == 2)  # type: ignore[operator]
    d, radius, unclipped = _bounded(raw, rho_max, exact=False)
    return replace(
        estimate,
        d=d.to(device=reference.device, dtype=reference.dtype),
        spectral_radius=radius,
        unclipped_spectral_radius=unclipped,
        seconds=time.perf_counter() - start,
    )


# ---- the gradient step (ALGORITHMS.md §5.2) -----------------------------------------------------


class _StatesLoop(nn.Module):
    """The no-grad forward as one scripted loop: `x [B, T, d], s0 [B, S] -> [B, T+1, S]`.

    Walks a time-major copy of the (narrow) input and projects it `block` steps at a time: on
    CPU this measured faster than one projection of the whole window (whose `[T, B, P]` result
    goes to memory and back) and than per-step projections (more ops per step). The states are
    stored time-major; the result is a `[B, T+1, S]` view of them.
    """

    def __init__(self, model: RecurrentForecaster, block: int = 32) -> None:
        super().__init__()
        self.model = model
        self.state_size = model.state_size
        self.block = block

    def forward(self, x: Tensor, s0: Tensor) -> Tensor:
        xt = x.transpose(0, 1).contiguous()  # [T, B, d]
        steps = xt.size(0)
        out = torch.empty(steps + 1, x.size(0), self.state_size, dtype=x.dtype, device=x.device)
        out[0] = s0
        s = s0
        for start in range(0, steps, self.block):
            a = self.model.project_inputs(xt[start : start + self.block])  # [L, B, P]
            for t in range(a.size(0)):
                s = self.model.recur(a[t], s)  # [B, S]
                out[start + t + 1] = s
        return out.transpose(0, 1)  # [B, T+1, S]


# Scripted loops of the last few models. A script module holds its Python module strongly, so a
# weak-keyed cache would never release its keys; a small bounded cache keeps at most this many
# models alive instead.
_SCRIPTED: OrderedDict[int, tuple[RecurrentForecaster, tuple[object, ...], object]] = OrderedDict()
_SCRIPTED_MAX = 4
_SCRIPT_FAILED: set[type] = set()


def _parameter_signature(model: RecurrentForecaster) -> tuple[object, ...]:
    # A scripted copy shares the model's tensors; re-script when any was replaced (e.g. `.to()`).
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t.dtype, t.device) for t in tensors)


def _scripted_loop(model: RecurrentForecaster) -> Callable[[Tensor, Tensor], Tensor] | None:
    if type(model) in _SCRIPT_FAILED:
        return None
    signature = _parameter_signature(model)
    cached = _SCRIPTED.get(id(model))
    if cached is not None and cached[0] is model and cached[1] == signature:
        _SCRIPTED.move_to_end(id(model))
        return cached[2]  # type: ignore[return-value]
    scripted = script_loop(_StatesLoop(model), f"model {model.name!r}")
    if scripted is None:  # the eager loop gives the same states, slower
        _SCRIPT_FAILED.add(type(model))
        return None
    _SCRIPTED[id(model)] = (model, signature, scripted)
    _SCRIPTED.move_to_end(id(model))
    while len(_SCRIPTED) > _SCRIPTED_MAX:
        _SCRIPTED.popitem(last=False)
    return scripted  # type: ignore[return-value]


def _check_window(model: RecurrentForecaster, x: Tensor, s0: Tensor | None) -> None:
    if x.dim() != 3 or x.shape[-1] != model.input_size or x.shape[1] < 1:
        raise ModelError(
            f"x: shape {tuple(x.shape)} is not [B, T, d] with T >= 1 and d = {model.input_size}",
            field="x",
        )
    if s0 is not None and s0.shape != (x.shape[0], model.state_size):
        raise ModelError(
            f"s0: shape {tuple(s0.shape)} is not [B, S] = {(x.shape[0], model.state_size)}",
            field="s0",
        )


def states_no_grad(model: RecurrentForecaster, x: Tensor, s0: Tensor | None = None) -> Tensor:
    """All carried states without autograd, step (a) of §5.2: `x [B, T, d] -> [B, T+1, S]`.

    A model that overrides `run_states` (the GRU's fused kernel, SCRN's prebuilt matrix) runs its
    own; otherwise the base loop runs as one scripted loop (`_StatesLoop`, ~2x faster than the
    eager loop for the MI-GRU on CPU), falling back to `run_states` when scripting fails or under
    autocast. Same states either way (oracle O13); the result may be a time-major view.
    """
    _check_window(model, x, s0)
    with torch.no_grad():
        if type(model).run_states is not RecurrentForecaster.run_states or (
            torch.is_autocast_enabled(x.device.type)
        ):
            return model.run_states(x, s0)
        loop = _scripted_loop(model)
        if loop is None:
            return model.run_states(x, s0)
        s = model.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
        return loop(x, s)


def feedback_states(
    model: RecurrentForecaster, x: Tensor, s0: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Step (a) of §5.2 for the fixed-feedback gradient: the states `[B, T+1, S]` and the
    model's per-step auxiliaries `[T, B, C]` for its `cell_backward` (`feedback_forward`), or
    `states_no_grad`'s states and None where the model keeps none (or under autocast)."""
    _check_window(model, x, s0)
    if not torch.is_autocast_enabled(x.device.type):
        with torch.no_grad():
            s = model.initial_state(x.size(0), x.device, x.dtype) if s0 is None else s0
            kept = model.feedback_forward(x, s)
        if kept is not None:
            return kept
    return states_no_grad(model, x, s0), None


def _default_block_rows(model: RecurrentForecaster, x: Tensor) -> int:
    if x.device.type != "cpu":
        return x.shape[0] * x.shape[1]  # one call: the GPU wants the big batched matmuls
    with torch.no_grad():
        width = model.project_inputs(x[:1, :1]).shape[-1] + 4 * model.state_size
    return max(256, _CPU_BLOCK_BYTES // (width * x.element_size()))


def batched_cell_backward(
    model: RecurrentForecaster,
    x: Tensor,
    s_prev: Tensor,
    delta: Tensor,
    *,
    block_rows: int | None = None,
    aux: Tensor | None = None,
) -> None:
    """Steps (b) and (d) of §5.2: re-evaluate every step on the given previous states with
    autograd and back-propagate `δ`, i.e. accumulate `Σ_t (∂f(x_t, s_{t−1}; θ)/∂θ)ᵀ δ_t` into
    the cell parameters' `.grad`.

    The re-evaluation is `recur(project_inputs(x), s_prev)` on `[rows, ·]` (what
    `recompute_states` does in one call; oracle O13). On CPU the rows go in blocks of whole time
    steps sized to stay in cache: the batched element-wise passes are memory-bound, and blocks
    of ~1–2k rows measured 2–3x faster than one `[B·T, ·]` call (MI-GRU, h = 64 and 256).

    Args:
        model: the forecaster.
        x: inputs `[B, T, d]`.
        s_prev: the state before each step `[B, T, S]` (no gradient flows into it).
        delta: `δ_t = dL/ds_t` `[B, T, S]` (from `reverse_scan`).
        block_rows: rows per block (rounded to whole steps); None: cache-sized on CPU, all
            rows on other devices.
        aux: the model's per-step auxiliaries `[T, B, C]` from `feedback_forward`, handed to its
            `cell_backward` block by block; None: none.
    """
    _check_window(model, x, None)
    batch, steps = x.shape[0], x.shape[1]
    width = model.state_size
    for name, value in (("s_prev", s_prev), ("delta", delta)):
        if value.shape != (batch, steps, width):
            raise ModelError(
                f"{name}: shape {tuple(value.shape)} is not [B, T, S] = {(batch, steps, width)}",
                field=name,
            )
    _check_aux(aux, x)
    x_tm = x.transpose(0, 1)  # [T, B, d]: time blocks are contiguous slices of time-major data
    s_tm = s_prev.detach().transpose(0, 1)  # [T, B, S]
    d_tm = delta.transpose(0, 1)  # [T, B, S]
    for steps_block in _time_blocks(model, x, block_rows):
        model.cell_backward(
            x_tm[steps_block].reshape(-1, x.shape[-1]),  # [rows, d]
            s_tm[steps_block].reshape(-1, width),  # [rows, S]
            d_tm[steps_block].reshape(-1, width),  # [rows, S]
            None if aux is None else aux[steps_block].reshape(-1, aux.shape[-1]),  # [rows, C]
        )


def _check_aux(aux: Tensor | None, x: Tensor) -> None:
    """`aux` (a model's kept per-step values) is time-major `[T, B, C]` for `x [B, T, d]`."""
    steps, batch = x.shape[1], x.shape[0]
    if aux is not None and (aux.dim() != 3 or aux.shape[:2] != (steps, batch)):
        raise ModelError(
            f"aux: shape {tuple(aux.shape)} is not [T, B, C] with [T, B] = {[steps, batch]}",
            field="aux",
        )


def _time_blocks(model: RecurrentForecaster, x: Tensor, block_rows: int | None) -> list[slice]:
    """Slices of whole time steps holding about `block_rows` rows each (cache-sized on CPU)."""
    if block_rows is not None and (
        isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1
    ):
        raise ModelError(
            f"block_rows: {block_rows!r} is not a positive integer", field="block_rows"
        )
    batch, steps = x.shape[0], x.shape[1]
    rows = _default_block_rows(model, x) if block_rows is None else block_rows
    block = max(1, min(steps, rows // batch))  # time steps per block
    return [slice(start, min(start + block, steps)) for start in range(0, steps, block)]


def state_vector_jacobian(
    model: RecurrentForecaster,
    x: Tensor,
    s_prev: Tensor,
    v: Tensor,
    *,
    block_rows: int | None = None,
    aux: Tensor | None = None,
) -> Tensor:
    """`u_t = J_tᵀ v_t` at every step, `J_t = ∂s_t/∂s_{t−1}` at `(x_t, s_{t−1})`: `[B, T, S]`.

    All steps at once, in the blocks of `batched_cell_backward` (the previous states are known,
    so the products are independent), each by the model's `state_vjp`; `aux`: as
    `batched_cell_backward`. The parameters' `.grad` are left untouched.
    """
    width = model.state_size
    _check_aux(aux, x)
    x_tm = x.transpose(0, 1)  # [T, B, d]
    s_tm = s_prev.detach().transpose(0, 1)  # [T, B, S]
    v_tm = v.transpose(0, 1)  # [T, B, S]
    out = torch.empty_like(s_tm)  # [T, B, S]
    for steps_block in _time_blocks(model, x, block_rows):
        u = model.state_vjp(
            x_tm[steps_block].reshape(-1, x.shape[-1]),  # [rows, d]
            s_tm[steps_block].reshape(-1, width),  # [rows, S]
            v_tm[steps_block].reshape(-1, width),  # [rows, S]
            None if aux is None else aux[steps_block].reshape(-1, aux.shape[-1]),  # [rows, C]
        )
        out[steps_block] = u.reshape(out[steps_block].shape).to(out.dtype)
    return out.transpose(0, 1)  # [B, T, S]


def _check_corrections(sweeps: object) -> None:
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ModelError(
            f"corrections: {sweeps!r} is not a non-negative integer", field="corrections"
        )


def corrected_deltas(
    model: RecurrentForecaster,
    x: Tensor,
    s_prev: Tensor,
    direct: Tensor,
    d: Tensor,
    sweeps: int,
    *,
    scan: ScanMethod = "chunked",
    block_rows: int | None = None,
    aux: Tensor | None = None,
) -> Tensor:
    """`δ` of the fixed feedback improved by `sweeps` Jacobian corrections (ours, §5.2 [O]).

    The exact recursion `δ_t = g_t + J_{t+1}ᵀ δ_{t+1}` splits into the fixed diagonal and the
    rest: `δ_t = [g_t + (J_{t+1}ᵀ − D) δ_{t+1}] + d ⊙ δ_{t+1}`. Sweep k evaluates the bracket
    with the previous `δ^{(k)}` — one batched vector–Jacobian product over all `B·T` steps on
    the stored states, parallel in time like the re-evaluation — and scans again with `d`:
    `δ^{(k+1)} = scan(g + shift((Jᵀ − D) δ^{(k)}), d)`, `δ^{(0)} = scan(g, d)`. Sweep k makes
    the first k steps of every path through time exact (the off-diagonal Jacobian terms the
    diagonal drops: SCRN's context → hidden, LMN's memory mixing, a gate's cross-unit terms),
    so `δ^{(T−1)}` is BPTT's `δ`; one or two sweeps already recover most of the difference.

    The sweeps are a splitting iteration for `(I − J)δ = g` preconditioned by the scan, whose
    terms grow like `‖J_t − D‖ / (1 − ρ(D))` before the shift truncates them: with a feedback
    radius near 1 and Jacobians that vary around it the partial sums alternate in sign and
    grow (an LMN on ETTh1 with the matrix feedback at radius 0.99: one sweep's gradient had
    cosine −0.9 with BPTT's at 240× its norm, and the weights diverged within an epoch). So a
    sweep whose `δ` points against the previous one (`⟨δ^{(k+1)}, δ^{(k)}⟩ ≤ 0`, or not finite)
    is dropped and the sweeps stop there: the plain feedback's `δ` is kept at worst.

    Args:
        model, x, s_prev: as `batched_cell_backward`.
        direct: the head's direct gradients `g [B, T, S]`.
        d: the fixed feedback `[S]`, a time-varying one of `direct`'s shape (`reverse_scan`)
            or a matrix `M [S, S]` (`reverse_scan_matrix`).
        sweeps: number of corrections (0: the plain fixed-feedback `δ`).
        scan, block_rows: as `feedback_gradients`.
        aux: the model's kept per-step values (`feedback_forward`), for its `state_vjp`.
    """
    _check_corrections(sweeps)
    matrix = _is_matrix(d, direct)
    units = model.feedback_units  # a matrix acts on these; the other units' δ is their g

    lead = d[:units, :units] if matrix else d[..., :units]  # the feedback on those units

    def scan_with_d(g: Tensor) -> Tensor:
        if matrix:
            scanned = reverse_scan_matrix(g[..., :units], lead)
        else:
            scanned = reverse_scan(g[..., :units], lead, method=scan)
        if units == g.shape[-1]:
            return scanned
        out = g.clone()  # the units beyond `units` reach no parameter: their δ stays g
        out[..., :units] = scanned
        return out

    delta = scan_with_d(direct)  # [B, T, S]
    for _ in range(sweeps):
        u = state_vector_jacobian(model, x, s_prev, delta, block_rows=block_rows, aux=aux)
        ahead = delta[..., 1:, :]  # δ_{t+1}
        if matrix:
            fixed = torch.zeros_like(ahead)  # Mᵀ δ_{t+1} as rows, M zero beyond `units`
            fixed[..., :units] = ahead[..., :units] @ lead.to(ahead.dtype)
        else:
            fixed = (d[..., :-1, :] if d.dim() > 1 else d) * ahead  # d[..., t, :] ⊙ δ_{t+1}
        rest = torch.zeros_like(direct)
        rest[..., :-1, :] = u[..., 1:, :] - fixed
        corrected = scan_with_d(direct + rest)
        agreement = float(torch.vdot(corrected.flatten(), delta.flatten()))
        if not agreement > 0.0:  # reversed (or NaN / inf): the sweeps diverge here
            logger.debug("correction sweep dropped: it reverses δ (⟨δ_new, δ⟩ = %.3g)", agreement)
            break
        delta = corrected
    return delta


def _is_matrix(d: Tensor, G: Tensor) -> bool:
    """`d` is a non-diagonal feedback `M [S, S]` (a time-varying diagonal is `[B, T, S]`)."""
    return d.dim() == 2 and G.dim() == 3 and d.shape == (G.shape[-1], G.shape[-1])


def feedback_gradients(
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    d: Feedback,
    *,
    s0: Tensor | None = None,
    scan: ScanMethod = "chunked",
    block_rows: int | None = None,
    corrections: int = 0,
) -> Tensor:
    """Fixed-feedback gradients of one batch into the parameters' `.grad` (ALGORITHMS.md §5.2).

    (a) no-grad forward storing the states (`feedback_states`: `states_no_grad`, or the
    model's `feedback_forward` with what its `cell_backward` reuses); (c1) head on the stored states
    as detached leaves, `loss.backward()` → head gradients and the direct gradients `G`;
    (c2) `δ = reverse_scan(G, d)`; (b)+(d) `batched_cell_backward`: the batched cell
    re-evaluation on the detached previous states, back-propagated with `δ`. The head reads the
    stored states rather than the re-evaluated ones (equal up to rounding, oracle O13), so the
    batched call's tape never coexists with the head's and can be processed in blocks.
    Steps (a), (c2), (b) and (d) run on `model.feedback_core()`, the units that reach a parameter
    (all of them but `LinearLags`' register, which the head reads from `x` and `s0` through
    `window_readout`). Gradients accumulate into `.grad` like `loss.backward()`; the caller
    zeroes, clips and steps.

    Args:
        model: a forecaster with `supports_feedback`.
        x: inputs `[B, T, d]`.
        target: forking-sequence targets `[B, T, H]`.
        mask: validity `[B, T, H]` or None.
        loss_fn: `(pred, target, mask) -> scalar`, e.g. `ForecastLoss` (float32 at least).
        d: the fixed feedback `[S]` (or time-varying `[B, T, S]`, see `reverse_scan`; or a
            non-diagonal `M [S, S]`, see `reverse_scan_matrix`), or `PerStepDiagonal`: the
            exact diagonal of every visited step (`per_step_feedback`, after the forward).
        s0: initial state `[B, S]` (zeros when None); no gradient flows into it.
        scan: the `reverse_scan` method.
        block_rows: rows per block of the batched re-evaluation (see `batched_cell_backward`).
        corrections: Jacobian correction sweeps of `δ` (`corrected_deltas`; 0: the paper's
            fixed feedback alone).

    Returns:
        The loss, detached.

    Raises:
        ModelError: the model does not support feedback, or `d` has the wrong shape.
    """
    _require_feedback(model)
    _check_window(model, x, s0)
    _check_corrections(corrections)
    width = model.state_size
    expected = (width,), (x.shape[0], x.shape[1], width), (width, width)
    if not isinstance(d, Tensor | PerStepDiagonal):
        raise ModelError(
            f"d: {type(d).__name__} is neither a tensor nor a PerStepDiagonal", field="d"
        )
    if isinstance(d, Tensor) and d.shape not in expected:  # refuse before any gradient
        raise ModelError(
            f"d: shape {tuple(d.shape)} is neither [S] = {expected[0]}, [B, T, S] = "
            f"{expected[1]} nor [S, S] = {expected[2]}",
            field="d",
        )
    units = model.feedback_units
    if isinstance(d, Tensor) and units < width:
        d = d[:units, :units] if d.shape == expected[2] else d[..., :units]

    def deltas(
        core: RecurrentForecaster, states: Tensor, direct: Tensor, aux: Tensor | None
    ) -> Tensor:
        fixed = d
        if isinstance(fixed, PerStepDiagonal):
            fixed = per_step_feedback(core, x, states[:, :-1], fixed.rho_max)  # [B, T, F]
        return corrected_deltas(
            core,
            x,
            states[:, :-1],
            direct,
            fixed,
            corrections,
            scan=scan,
            block_rows=block_rows,
            aux=aux,
        )

    return _gradients_from_deltas(model, x, target, mask, loss_fn, s0, deltas, block_rows)


def exact_bptt_gradients(
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    *,
    s0: Tensor | None = None,
) -> Tensor:
    """Exact BPTT gradients from the parts of `feedback_gradients` (ALGORITHMS.md §5.1): the
    same no-grad forward, head and batched cell backward, with the exact reverse recursion
    `δ_t = g_t + J_{t+1}ᵀ δ_{t+1}` (`model.feedback_core().exact_deltas`) in place of the fixed
    feedback's scan. Equal to autograd BPTT up to rounding, without its tape: the MI-GRU, LMN
    and SCRN run the recursion as one scripted loop, 1.5–2.0x faster than autograd through
    their forward at h = 64 on CPU (1.1–1.3x at h = 256), the MI-GRU at about half autograd's
    memory (benchmarks/results/train_speed.md). Not under autocast (the kept gates are not
    autocast's): the caller uses autograd there.

    Returns:
        The loss, detached.

    Raises:
        ModelError: the model does not support feedback (its window cannot be split into a
            stored forward and a head; LSTM).
    """
    _require_feedback(model)
    _check_window(model, x, s0)

    def deltas(
        core: RecurrentForecaster, states: Tensor, direct: Tensor, aux: Tensor | None
    ) -> Tensor:
        return core.exact_deltas(x, states, direct, aux)

    return _gradients_from_deltas(model, x, target, mask, loss_fn, s0, deltas, None)


def _gradients_from_deltas(
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    s0: Tensor | None,
    deltas: Callable[[RecurrentForecaster, Tensor, Tensor, Tensor | None], Tensor],
    block_rows: int | None,
) -> Tensor:
    """(a) the no-grad forward, (c1) the head's gradients and the direct `G`, `δ` from
    `deltas(core, states [B, T+1, F], G [B, T, F], aux)`, then (b)+(d) the batched cell
    backward: `feedback_gradients` and `exact_bptt_gradients` differ only in `deltas`."""
    # The units that reach a parameter, as a model of their own (`feedback_core`); the rest
    # feed only the head, which `window_readout` reads from x and s0.
    core, units = model.feedback_core(), model.feedback_units
    if s0 is None:
        s0 = model.initial_state(x.shape[0], x.device, x.dtype)
    states, aux = feedback_states(core, x, s0[:, :units])  # [B, T+1, F], [T, B, C] or None
    s_leaf = states[:, 1:].detach().requires_grad_(True)  # [B, T, F]
    pred = model.window_readout(s_leaf, x, s0)  # [B, T, H]
    loss = loss_fn(to_loss_dtype(pred), target, mask)
    del pred
    loss.backward()
    direct = s_leaf.grad if s_leaf.grad is not None else torch.zeros_like(s_leaf)  # G [B, T, F]
    del s_leaf
    delta = deltas(core, states, direct, aux)  # [B, T, F]
    del direct
    batched_cell_backward(core, x, states[:, :-1], delta, block_rows=block_rows, aux=aux)
    return loss.detach()
