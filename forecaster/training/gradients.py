"""Gradients of one batch by BPTT, truncated BPTT or fixed feedback: the trainer's one entry point.

`compute_gradients(method, ...)` fills the parameters' `.grad` (accumulating, like
`loss.backward()`) and returns the detached loss; the trainer zeroes, clips and steps.

- `bptt`: exact backpropagation through time. For a model with a hand-written reverse
  recursion (`exact_deltas`: MI-GRU, LMN, SCRN) it runs from the fixed-feedback trainer's parts
  (`exact_bptt_gradients`: the scripted no-grad forward, the exact recursion, the batched cell
  backward), 1.5–1.8x faster than autograd at h = 64 on CPU; otherwise, and under autocast
  or when `x` or `s0` needs a gradient, plain autograd through `model(x)`
  (`autograd_bptt_gradients`). The base loop iterates a time-major tensor with `unbind`
  (ALGORITHMS.md §5.4: a batch-first `x[:, t]` slice would make backward O(T²)), and the GRU
  baseline runs its fused kernel, so backward is linear in T either way.
- `tbptt`: segments of `truncation` steps, the state detached between segments. A no-grad pass
  first gives the full-window loss and `∂L/∂ŷ` (so any `loss_fn` is normalised over the whole
  window exactly), then each segment is re-run with autograd from its stored start state and
  back-propagated on its own: memory is that of one segment.
- `feedback`: fixed-feedback training (ALGORITHMS.md §5.2), `forecaster.training.feedback`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from forecaster.errors import ModelError
from forecaster.losses import to_loss_dtype
from forecaster.models.base import RecurrentForecaster
from forecaster.training.feedback import (
    Feedback,
    LossFn,
    ScanMethod,
    exact_bptt_gradients,
    feedback_gradients,
    states_no_grad,
)

__all__ = [
    "GRADIENT_METHODS",
    "GradientMethod",
    "autograd_bptt_gradients",
    "bptt_gradients",
    "compute_gradients",
    "hand_written_bptt",
    "tbptt_gradients",
]

GradientMethod = Literal["feedback", "bptt", "tbptt"]
GRADIENT_METHODS: tuple[str, ...] = ("feedback", "bptt", "tbptt")


def bptt_gradients(
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    *,
    s0: Tensor | None = None,
) -> Tensor:
    """Full backpropagation through time: the gradients of `loss_fn(model(x, s0), target, mask)`
    into `.grad`, by `exact_bptt_gradients` where the model has a hand-written recursion
    (`hand_written_bptt`), else by autograd (`autograd_bptt_gradients`). Same gradients either
    way, up to rounding.

    Args:
        model: the forecaster.
        x: inputs `[B, T, d]`; target, mask: `[B, T, H]` (mask may be None).
        loss_fn: `(pred, target, mask) -> scalar`.
        s0: initial state `[B, S]` (zeros when None).

    Returns:
        The loss, detached.
    """
    if hand_written_bptt(model, x, s0):
        return exact_bptt_gradients(model, x, target, mask, loss_fn, s0=s0)
    return autograd_bptt_gradients(model, x, target, mask, loss_fn, s0=s0)


def hand_written_bptt(model: RecurrentForecaster, x: Tensor, s0: Tensor | None = None) -> bool:
    """Whether `bptt_gradients` runs `exact_bptt_gradients`: the model's feedback core has its
    own `exact_deltas`, no autocast is active (the kept gates would not be autocast's), and
    neither `x` nor `s0` asks for a gradient (the hand-written path gives the parameters'
    only)."""
    if not model.supports_feedback or torch.is_autocast_enabled(x.device.type):
        return False
    if x.requires_grad or (s0 is not None and s0.requires_grad):
        return False
    core = type(model.feedback_core())
    return core.exact_deltas is not RecurrentForecaster.exact_deltas


def autograd_bptt_gradients(
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    *,
    s0: Tensor | None = None,
) -> Tensor:
    """BPTT by autograd: `loss_fn(model(x, s0), target, mask).backward()` (arguments as
    `bptt_gradients`); the reference the hand-written path is tested and timed against."""
    loss = loss_fn(to_loss_dtype(model(x, s0)), target, mask)
    loss.backward()
    return loss.detach()


def tbptt_gradients(
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    truncation: int,
    *,
    s0: Tensor | None = None,
) -> Tensor:
    """Truncated BPTT over segments of `truncation` steps, state detached between segments.

    The gradient of the full-window loss with every path through a segment boundary cut: the
    sum over segments equals BPTT when `truncation >= T`. Memory is one segment's tape.

    Returns:
        The full-window loss, detached.

    Raises:
        ModelError: `truncation < 1`.
    """
    if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 1:
        raise ModelError(
            f"train.truncation: {truncation!r} is not a positive integer", field="truncation"
        )
    steps = x.shape[1]
    if truncation >= steps:
        return bptt_gradients(model, x, target, mask, loss_fn, s0=s0)
    states = states_no_grad(model, x, s0)  # [B, T+1, S]
    with torch.no_grad():
        pred = model.window_readout(states[:, 1:], x, states[:, 0])  # [B, T, H]
    pred_leaf = to_loss_dtype(pred).requires_grad_(True)
    loss = loss_fn(pred_leaf, target, mask)
    loss.backward(inputs=[pred_leaf])  # only ∂L/∂ŷ: the parameters get theirs per segment
    pred_grad = pred_leaf.grad  # [B, T, H]
    del pred, pred_leaf
    for start in range(0, steps, truncation):
        stop = min(start + truncation, steps)
        segment = model.run_states(x[:, start:stop], states[:, start])  # [B, L+1, S]
        segment_pred = model.window_readout(segment[:, 1:], x[:, start:stop], segment[:, 0])
        segment_pred.backward(pred_grad[:, start:stop].to(segment_pred.dtype))
    return loss.detach()


def compute_gradients(
    method: GradientMethod,
    model: RecurrentForecaster,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    *,
    d: Feedback | None = None,
    truncation: int = 32,
    s0: Tensor | None = None,
    scan: ScanMethod = "chunked",
    corrections: int = 0,
) -> Tensor:
    """Gradients of one batch by `method` into `.grad`; returns the detached loss.

    Args:
        method: `feedback` (needs `d`), `bptt` or `tbptt` (uses `truncation`).
        model: the forecaster.
        x: inputs `[B, T, d]`; target, mask: `[B, T, H]` (mask may be None).
        loss_fn: `(pred, target, mask) -> scalar`, e.g. `ForecastLoss` (computed in float32 at
            least under AMP).
        d: the feedback for `feedback`: a fixed `d` (e.g. `estimate_feedback(...).d`) or
            `PerStepDiagonal` (see `feedback_gradients`).
        truncation: segment length for `tbptt`.
        s0: initial state `[B, S]` (zeros when None).
        scan: reverse-scan method for `feedback`.
        corrections: Jacobian correction sweeps of `feedback` (`corrected_deltas`).

    Raises:
        ModelError: unknown method; `feedback` without `d` or for a model without feedback
            support (LSTM).
    """
    if method == "bptt":
        return bptt_gradients(model, x, target, mask, loss_fn, s0=s0)
    if method == "tbptt":
        return tbptt_gradients(model, x, target, mask, loss_fn, truncation, s0=s0)
    if method == "feedback":
        if d is None:
            raise ModelError(
                "d: method 'feedback' needs the fixed feedback d [S] (see estimate_feedback)",
                field="d",
            )
        return feedback_gradients(
            model, x, target, mask, loss_fn, d, s0=s0, scan=scan, corrections=corrections
        )
    raise ModelError(
        f"train.method: {method!r} is not one of {list(GRADIENT_METHODS)}", field="method"
    )
