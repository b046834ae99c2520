"""Training and reporting losses: the temporally rescaled loss (ALGORITHMS.md §4.2), MSE and MAE.

Forecasts are forking sequences `pred [B, T, H]` (made at step `t` for `y_{t+k}`, `k = 1..H`) with
a validity mask `[B, T, H]` (0 where the target is beyond the data). The training loss is

    L = Σ w_{t,k} · M · ℓ(ŷ, y) / Σ w_{t,k} · M,    w_{t,k} = a_t · c_k,

with `a_t = 0` for `t < t0` (burn-in), `((t − t0 + 1) / (T − t0))^η` after it, and
`c_k = (k / H)^γ`; `ℓ` is squared or absolute. `η = γ = 0, t0 = 0` is plain masked MSE (oracle
O8). Losses are computed in float32 at least (AMP-friendly: half-precision predictions are cast
up first). `mse` and `mae` are the unweighted masked metrics used for reporting (§4.2
"Reporting").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from forecaster.errors import ModelError

if TYPE_CHECKING:
    from forecaster.config import LossConfig

__all__ = [
    "DEFAULT_BURN_IN",
    "ForecastLoss",
    "default_burn_in",
    "mae",
    "mse",
    "rescaled_weights",
    "to_loss_dtype",
    "weighted_loss",
]

# Default burn-in cap t0 = min(DEFAULT_BURN_IN, T // 4) (ALGORITHMS.md §4.2 defaults [O]).
DEFAULT_BURN_IN = 24

LossKind = Literal["squared", "absolute"]


def default_burn_in(steps: int) -> int:
    """The default burn-in `t0 = min(24, T // 4)` for a window of `steps` steps (§4.2)."""
    return min(DEFAULT_BURN_IN, steps // 4)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name}: {value!r} is not a positive integer", field=name)


def rescaled_weights(
    T: int,
    H: int,
    *,
    eta: float,
    gamma: float,
    t0: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Weights `w_{t,k} = a_t · c_k` of the rescaled loss, ALGORITHMS.md §4.2: `[T, H]`.

    Args:
        T: window length (steps `t = 0..T−1`).
        H: horizon (steps `k = 1..H`).
        eta: time-index exponent `η ≥ 0`.
        gamma: horizon exponent `γ ≥ 0`.
        t0: burn-in, `0 ≤ t0 < T`; steps `t < t0` get weight 0.
        device: device of the result.
        dtype: dtype of the result (default float32).

    Raises:
        ModelError: non-positive sizes, negative exponents or a burn-in outside `[0, T)`.
    """
    _check_positive("T", T)
    _check_positive("H", H)
    if eta < 0 or gamma < 0:
        raise ModelError(f"eta, gamma: ({eta}, {gamma}) must both be >= 0", field="eta")
    if isinstance(t0, bool) or not isinstance(t0, int) or not 0 <= t0 < T:
        raise ModelError(
            f"burn_in: {t0!r} leaves no step with loss in a window of T = {T} (need 0 <= t0 < T)",
            field="burn_in",
        )
    dtype = torch.float32 if dtype is None else dtype
    # Powers in float64, then one cast: the weights are exact to the last bit of `dtype`.
    t = torch.arange(T, dtype=torch.float64, device=device)  # [T]
    a = ((t - t0 + 1) / (T - t0)).clamp_min(0.0).pow(eta)  # [T]
    a = torch.where(t < t0, torch.zeros_like(a), a)  # burn-in (also covers 0^0 = 1 at eta = 0)
    k = torch.arange(1, H + 1, dtype=torch.float64, device=device)  # [H]
    c = (k / H).pow(gamma)  # [H]
    return (a.unsqueeze(1) * c.unsqueeze(0)).to(dtype)  # [T, H]


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (AMP), the input's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def to_loss_dtype(pred: Tensor) -> Tensor:
    """Predictions in float32 at least: half precision (AMP) is cast up before any loss."""
    return pred.to(_loss_dtype(pred.dtype))


def _elementwise(kind: LossKind, pred: Tensor, target: Tensor) -> Tensor:
    diff = pred - target
    return diff * diff if kind == "squared" else diff.abs()


def _check_shapes(pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
    if pred.dim() != 3:
        raise ModelError(f"pred: shape {tuple(pred.shape)} is not [B, T, H]", field="pred")
    if target.shape != pred.shape:
        raise ModelError(
            f"target: shape {tuple(target.shape)} differs from pred's {tuple(pred.shape)}",
            field="target",
        )
    if mask is not None and mask.shape != pred.shape:
        raise ModelError(
            f"mask: shape {tuple(mask.shape)} differs from pred's {tuple(pred.shape)}",
            field="mask",
        )


class _WeightedLoss(torch.autograd.Function):
    """`Σ r·(ŷ − y) / total` with `r = w·M·(ŷ − y)` (squared) or `w·M·sign(ŷ − y)` (absolute).

    Hand-written backward (`∂L/∂ŷ = c·r / total`, c = 2 or 1): about half the full-size passes
    of the autograd graph of the same expression, which measured ~20 % of a training step at
    B = 32, T = 720, H = 96 on CPU (every pass over `[B, T, H]` is memory-bound).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        pred: Tensor,
        target: Tensor,
        wm: Tensor,
        total: Tensor,
        squared: bool,
    ) -> Tensor:
        diff = torch.sub(pred, target).contiguous()  # [B, T, H]
        r = diff * wm if squared else torch.sign(diff).mul_(wm)  # [B, T, H]
        numerator = torch.dot(r.reshape(-1), diff.reshape(-1))  # Σ w·M·ℓ without a product tensor
        ctx.save_for_backward(r, total)
        ctx.factor = 2.0 if squared else 1.0  # type: ignore[attr-defined]
        ctx.target_needs_grad = target.requires_grad  # type: ignore[attr-defined]
        return numerator / total

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        r, total = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_pred = r * (ctx.factor * grad / total)  # type: ignore[attr-defined]
        grad_target = -grad_pred if ctx.target_needs_grad else None  # type: ignore[attr-defined]
        return grad_pred, grad_target, None, None, None


def weighted_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None,
    weights: Tensor,
    *,
    kind: LossKind = "squared",
) -> Tensor:
    """`Σ w·M·ℓ(ŷ, y) / Σ w·M` (formula 4.2) for any weights `[T, H]`; a scalar tensor.

    Computed in float32 at least. When every entry has zero weight or mask the result is 0 with
    zero gradient instead of 0/0 = NaN. Multiplying `weights` by a constant changes nothing.
    Differentiable in `pred` and `target` (not in the weights or the mask).

    Args:
        pred, target: `[B, T, H]`.
        mask: validity `[B, T, H]` (bool or 0/1), or None for all valid.
        weights: `w [T, H]`, non-negative.
        kind: `squared` or `absolute`.
    """
    _check_shapes(pred, target, mask)
    if weights.shape != pred.shape[1:]:
        raise ModelError(
            f"weights: shape {tuple(weights.shape)} is not [T, H] = {tuple(pred.shape[1:])}",
            field="weights",
        )
    if kind not in ("squared", "absolute"):
        raise ModelError(f"kind: {kind!r} is not one of ['squared', 'absolute']", field="kind")
    dtype = _loss_dtype(pred.dtype)
    w = weights.to(device=pred.device, dtype=dtype)  # [T, H]
    if mask is None:
        wm = w.expand(pred.shape)  # [B, T, H] view
    elif mask.dtype == torch.bool:
        wm = torch.where(mask, w, 0.0)  # [B, T, H]
    else:
        wm = mask.to(dtype) * w  # [B, T, H]
    total = wm.sum().clamp_min(torch.finfo(dtype).tiny)  # all-zero weight·mask: 0, not NaN
    loss = _WeightedLoss.apply(pred.to(dtype), target.to(dtype), wm, total, kind == "squared")
    return loss  # type: ignore[no-any-return]


class ForecastLoss:
    """The temporally rescaled loss of ALGORITHMS.md §4.2 (formula 4.2); pinned by oracle O8.

    `loss(pred [B, T, H], target [B, T, H], mask [B, T, H] | None) -> scalar`
    `= Σ w·M·ℓ / Σ w·M`. A batch whose entries all have zero weight or mask gives 0 (with zero
    gradient) instead of NaN. Weights are cached per `(T, H, device, dtype)`; a window length other
    than the one the loss was built for is allowed (the default burn-in is then recomputed for it).

    Attributes:
        kind: `squared` (ℓ = (ŷ − y)²) or `absolute` (ℓ = |ŷ − y|).
        eta, gamma: the exponents of `a_t` and `c_k`.
        burn_in: `t0`, or None for the default `min(24, T // 4)`.
    """

    def __init__(
        self,
        *,
        kind: LossKind = "squared",
        eta: float = 1.0,
        gamma: float = 0.0,
        burn_in: int | None = None,
    ) -> None:
        if kind not in ("squared", "absolute"):
            raise ModelError(
                f"loss.kind: {kind!r} is not one of ['squared', 'absolute']", field="kind"
            )
        if eta < 0 or gamma < 0:
            raise ModelError(f"loss.eta, loss.gamma: ({eta}, {gamma}) must be >= 0", field="eta")
        if burn_in is not None and (isinstance(burn_in, bool) or burn_in < 0):
            raise ModelError(f"loss.burn_in: {burn_in!r} is not >= 0", field="burn_in")
        self.kind: LossKind = kind
        self.eta = float(eta)
        self.gamma = float(gamma)
        self.burn_in = burn_in
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_config(cls, config: LossConfig, T: int, H: int) -> ForecastLoss:
        """Build from `train.loss` for windows of `T` steps and horizon `H`.

        Raises:
            ModelError: the burn-in leaves no step with loss (`burn_in >= T`).
        """
        loss = cls(kind=config.kind, eta=config.eta, gamma=config.gamma, burn_in=config.burn_in)
        _check_positive("T", T)
        _check_positive("H", H)
        t0 = loss.t0(T)
        if t0 >= T:
            raise ModelError(
                f"config.train.loss.burn_in: {t0} leaves no step with loss in a window of "
                f"T = {T} steps (need burn_in < T)",
                field="burn_in",
            )
        return loss

    def t0(self, T: int) -> int:
        """The burn-in used for windows of `T` steps."""
        return default_burn_in(T) if self.burn_in is None else self.burn_in

    def weights(
        self,
        T: int,
        H: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The cached weights `w [T, H]` for this loss (see `rescaled_weights`)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (T, H, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            cached = rescaled_weights(
                T, H, eta=self.eta, gamma=self.gamma, t0=self.t0(T), device=device, dtype=dtype
            )
            self._cache[key] = cached
        return cached

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """`Σ w·M·ℓ / Σ w·M` over `[B, T, H]` (float32 at least); a scalar tensor."""
        _check_shapes(pred, target, mask)
        w = self.weights(pred.shape[1], pred.shape[2], pred.device, _loss_dtype(pred.dtype))
        return weighted_loss(pred, target, mask, w, kind=self.kind)

    def __repr__(self) -> str:
        return (
            f"ForecastLoss(kind={self.kind!r}, eta={self.eta}, gamma={self.gamma}, "
            f"burn_in={self.burn_in})"
        )


def _masked_mean(kind: LossKind, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    _check_shapes(pred, target, mask)
    dtype = _loss_dtype(pred.dtype)
    losses = _elementwise(kind, pred.to(dtype), target.to(dtype))  # [B, T, H]
    if mask is None:
        return losses.mean()
    m = mask.to(dtype)  # [B, T, H]
    return (losses * m).sum() / m.sum()  # NaN when no entry is valid: nothing to report


def mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked, unweighted mean squared error over `[B, T, H]` (reporting, §4.2)."""
    return _masked_mean("squared", pred, target, mask)


def mae(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Masked, unweighted mean absolute error over `[B, T, H]` (reporting, §4.2)."""
    return _masked_mean("absolute", pred, target, mask)
