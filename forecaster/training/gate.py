"""The model-side gate of fixed-feedback training: checks 2-4 of ALGORITHMS.md §5.5.

The data-side gate (check 1, ADF + KPSS) runs on the residuals before training
(`pipelines/stationarity.py`); these checks look at the model on a few validation batches:

2. **Feedback stability**: `max_u |d_u|` of the Jacobian-mean feedback on the gate's batches
   before the `rho_max` clip (whatever feedback kind is configured: it measures the model's
   dynamics; with `jacobian_matrix`, the spectral radius of the mean Jacobian matrix); above 1
   the state dynamics expand (BPTT gradients would explode too).
3. **Jacobian stationarity**: per unit, the coefficient of variation over time of the
   batch-averaged Jacobian diagonal `diag(J_t)` (`jacobian_profile`); its median over units.
4. **Gradient agreement**: the feedback gradient and the BPTT gradient of the same loss at the
   same parameters, on the K batches taken together: their cosine and norm ratio
   `|g_feedback| / |g_bptt|`, over the recurrent parameters (all but the head's). The head's
   gradient is the same under both methods by construction; counted in, it dominates the norms
   and hides a wrong feedback (a linear cell with `d = −0.9` against a true `diag(0.3 .. 0.8)`:
   norm ratio 0.79 with the head, 0.23 without).

`run_model_gate` measures all three and decides on the checks it is asked for: all of them
before training, check 4 alone at the periodic rechecks (§5.5 "On failure"). The trainer
(`forecaster.training.trainer`) switches to BPTT on a failure and records the reports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from forecaster.config import FeedbackConfig
from forecaster.errors import ModelError
from forecaster.models.base import RecurrentForecaster
from forecaster.training.feedback import (
    Feedback,
    LossFn,
    jacobian_mean_matrix,
    jacobian_profile,
    spectral_radius,
)
from forecaster.training.gradients import compute_gradients
from forecaster.training.windows import ForkingWindows, WindowBatch

__all__ = [
    "GATE_CHECKS",
    "GateCheck",
    "GateStage",
    "ModelGateReport",
    "gate_batches",
    "jacobian_cv",
    "run_model_gate",
]

GateCheck = Literal["stability", "jacobian", "gradient"]
GateStage = Literal["init", "recheck"]
GATE_CHECKS: tuple[GateCheck, ...] = ("stability", "jacobian", "gradient")
# Check 2's bound is not a setting: |d_u| >= 1 is where the backward recursion stops contracting.
MAX_SPECTRAL_RADIUS = 1.0
# A unit whose mean Jacobian entry is below this in magnitude has an undefined CV; it is
# measured against this floor (a large, finite CV when the entry varies at all).
_CV_FLOOR = 1e-12


@dataclass(frozen=True)
class ModelGateReport:
    """What one run of the model-side checks measured and decided (ALGORITHMS.md §5.5).

    Attributes:
        stage: `init` (before the first epoch: checks 2-4 decide) or `recheck` (during
            training: check 4 decides).
        epoch: epochs completed when it ran (0: before training).
        batches: validation batches used (K).
        windows: validation windows in them.
        spectral_radius: check 2, the unclipped `max_u |d_u|` of the Jacobian-mean feedback
            on these batches (the mean over time of `diag(J_t)`).
        jacobian_cv: check 3, the median over units of the per-unit coefficient of variation
            over time of the batch-averaged `diag(J_t)`.
        cosine: check 4, cosine between the feedback and BPTT gradients (recurrent parameters).
        norm_ratio: check 4, `|g_feedback| / |g_bptt|`.
        max_spectral_radius: check 2's bound (1).
        max_jacobian_cv: check 3's threshold.
        min_cosine: check 4's least cosine.
        min_norm_ratio: check 4's least norm ratio.
        max_norm_ratio: check 4's largest norm ratio.
        checks: the checks that decide `passed` (all are measured).
        passed: every deciding check passed.
        reason: one line: the measured values, and what failed.
        seconds: wall time of the checks.
    """

    stage: str
    epoch: int
    batches: int
    windows: int
    spectral_radius: float
    jacobian_cv: float
    cosine: float
    norm_ratio: float
    max_spectral_radius: float
    max_jacobian_cv: float
    min_cosine: float
    min_norm_ratio: float
    max_norm_ratio: float
    checks: tuple[str, ...]
    passed: bool
    reason: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and checkpoint-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelGateReport:
        """Inverse of `to_dict` (a JSON round trip turns `checks` into a list)."""
        values = dict(data)
        values["checks"] = tuple(values["checks"])
        return cls(**values)


def gate_batches(windows: ForkingWindows, batches: int, batch_size: int) -> list[WindowBatch]:
    """Up to `batches` batches of `batch_size` validation windows spread evenly over all of them
    (every series and period, not only the first windows); fewer when there are fewer windows.

    Raises:
        DataError: `windows` is empty or `batch_size < 1` (from `ForkingWindows`).
    """
    n = len(windows)
    wanted = min(n, batches * batch_size)
    order = np.unique(np.linspace(0, n - 1, wanted).round().astype(np.int64))
    return list(windows.iter_batches(batch_size, order))


def jacobian_cv(profile: Tensor) -> float:
    """Median over units of the coefficient of variation over time of `profile [T, S]`:
    `std_t / |mean_t|` per unit (population std; a near-zero mean is floored at 1e-12)."""
    if profile.dim() != 2 or profile.shape[0] < 1:
        raise ModelError(
            f"profile: shape {tuple(profile.shape)} is not [T, S] with T >= 1", field="profile"
        )
    p = profile.to(torch.float64)
    mean = p.mean(dim=0)  # [S]
    std = p.std(dim=0, correction=0)  # [S]
    cv = std / mean.abs().clamp_min(_CV_FLOOR)
    return float(np.median(cv.cpu().numpy()))


def _joined_mask(batches: Sequence[WindowBatch]) -> Tensor | None:
    """The batches' masks joined `[K·B, T, H]`; None when every target is valid."""
    if all(batch.mask is None for batch in batches):
        return None
    return torch.cat(
        [
            torch.ones_like(batch.target, dtype=torch.bool) if batch.mask is None else batch.mask
            for batch in batches
        ]
    )


def _gradient(
    model: RecurrentForecaster,
    method: Literal["feedback", "bptt"],
    batch: tuple[Tensor, Tensor, Tensor | None],
    loss_fn: LossFn,
    d: Feedback | None,
    corrections: int = 0,
) -> Tensor:
    """The recurrent parameters' gradient of the loss on `batch`, flattened to float64 `[P]`."""
    x, target, mask = batch
    model.zero_grad(set_to_none=True)
    compute_gradients(method, model, x, target, mask, loss_fn, d=d, corrections=corrections)
    head = {id(p) for p in model.head.parameters()}
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
        for p in model.parameters()
        if id(p) not in head
    ]
    model.zero_grad(set_to_none=True)
    return torch.cat(parts).to(torch.float64)


def _gradient_agreement(feedback: Tensor, bptt: Tensor) -> tuple[float, float]:
    norm_f, norm_b = float(feedback.norm()), float(bptt.norm())
    if norm_b == 0.0:
        return (math.nan, 1.0 if norm_f == 0.0 else math.inf)
    if norm_f == 0.0:
        return (math.nan, 0.0)
    return float(torch.dot(feedback, bptt)) / (norm_f * norm_b), norm_f / norm_b


def run_model_gate(
    model: RecurrentForecaster,
    batches: Sequence[WindowBatch],
    loss_fn: LossFn,
    config: FeedbackConfig,
    d: Feedback,
    *,
    stage: GateStage = "init",
    epoch: int = 0,
    checks: Sequence[GateCheck] = GATE_CHECKS,
) -> ModelGateReport:
    """Measure checks 2-4 of §5.5 at the model's current parameters and decide on `checks`.

    The model runs in eval mode (no dropout: both gradients see the same network) and in its
    own precision (no autocast); its `.grad` are left cleared and no random state is drawn.

    Args:
        model: a forecaster that supports feedback.
        batches: validation batches (`gate_batches`).
        loss_fn: the training loss.
        config: `train.feedback` (the thresholds).
        d: the feedback in use (`[S]`, `[S, S]` or `PerStepDiagonal`; check 4).
        stage: `init` or `recheck` (recorded).
        epoch: epochs completed (recorded).
        checks: which of `stability`, `jacobian`, `gradient` decide `passed`.

    Raises:
        ModelError: no batch, an unknown check, or a model without feedback support.
    """
    unknown = sorted(set(checks) - set(GATE_CHECKS))
    if unknown:
        raise ModelError(f"checks: {unknown} are not among {list(GATE_CHECKS)}", field="checks")
    if not batches:
        raise ModelError(
            "batches: the model gate needs at least one validation batch", field="batches"
        )
    start = time.perf_counter()
    dtype = next(model.parameters()).dtype
    # The K batches go through as one: the loop overhead of the recurrences is paid once (on
    # the demo, 2x faster BPTT than four calls); cosine and ratio do not see the loss scale.
    joined = (
        torch.cat([batch.x for batch in batches]).to(dtype),  # [K·B, T, d]
        torch.cat([batch.target for batch in batches]).to(dtype),  # [K·B, T, H]
        _joined_mask(batches),  # [K·B, T, H] or None
    )
    was_training = model.training
    model.eval()
    try:
        # Units beyond feedback_units feed only the head (a shift register): not dynamics.
        profile = jacobian_profile(model, [joined[0]])[:, : model.feedback_units]  # [T, w]
        cv = jacobian_cv(profile)
        if config.kind == "jacobian_matrix":
            radius = spectral_radius(jacobian_mean_matrix(model, [joined[0]]))
        else:
            radius = float(profile.mean(dim=0).abs().max())
        g_bptt = _gradient(model, "bptt", joined, loss_fn, None)
        g_feedback = _gradient(model, "feedback", joined, loss_fn, d, config.corrections)
    finally:
        model.train(was_training)
    cosine, ratio = _gradient_agreement(g_feedback, g_bptt)
    failures: dict[str, str] = {}
    if not radius < MAX_SPECTRAL_RADIUS:
        failures["stability"] = (
            f"feedback stability: unclipped max |d_u| {radius:.3f} >= {MAX_SPECTRAL_RADIUS:g} "
            "(expanding state dynamics)"
        )
    if not cv <= config.max_jacobian_cv:
        failures["jacobian"] = (
            f"Jacobian stationarity: median CV over time {cv:.3f} > {config.max_jacobian_cv:g}"
        )
    if not (
        cosine >= config.min_cosine and config.min_norm_ratio <= ratio <= config.max_norm_ratio
    ):
        failures["gradient"] = (
            f"gradient agreement: cosine {cosine:.3f} (>= {config.min_cosine:g} needed), norm "
            f"ratio {ratio:.3f} (in [{config.min_norm_ratio:g}, {config.max_norm_ratio:g}] "
            "needed)"
        )
    deciding = tuple(c for c in GATE_CHECKS if c in checks)
    failed = [failures[c] for c in deciding if c in failures]
    measured = (
        f"cosine {cosine:.3f}, norm ratio {ratio:.3f}, Jacobian CV {cv:.3f}, "
        f"max |d| {radius:.3f} on {len(batches)} validation batches"
    )
    if failed:
        reason = "failed " + "; ".join(failed)
    else:
        reason = f"passed ({', '.join(deciding)}): {measured}"
        ignored = [failures[c] for c in GATE_CHECKS if c in failures and c not in deciding]
        if ignored:
            reason += "; not deciding here: " + "; ".join(ignored)
    return ModelGateReport(
        stage=stage,
        epoch=epoch,
        batches=len(batches),
        windows=sum(int(batch.x.shape[0]) for batch in batches),
        spectral_radius=radius,
        jacobian_cv=cv,
        cosine=cosine,
        norm_ratio=ratio,
        max_spectral_radius=MAX_SPECTRAL_RADIUS,
        max_jacobian_cv=config.max_jacobian_cv,
        min_cosine=config.min_cosine,
        min_norm_ratio=config.min_norm_ratio,
        max_norm_ratio=config.max_norm_ratio,
        checks=deciding,
        passed=not failed,
        reason=reason,
        seconds=time.perf_counter() - start,
    )
