"""Causal anomaly detection from calibrated forecast residuals (numpy only; issue 8).

Forecasts. Every point is forecast from the past only, at each horizon h of the settings, by a
direct linear forecaster of the change `y[t] - y[t-h]` from the recent changes before `t - h` and,
when the series is seasonal, from the median of the same change over the last three seasons
(ridge regression on the fit segment; the season is found by autocorrelation). Forecasting
changes rather than levels re-baselines after a level shift by itself: h points past the shift,
the new level is the normal one. The median over seasons keeps one odd season from echoing.

Calibration. Each horizon's absolute residuals get conformal p-values against a trailing window
of that horizon's past residuals (seeded with the fit segment's out-of-fold residuals, from
forecasters fitted on the other folds, so that the seed is as wide as the errors to come; updated
online after every point), with an exponential tail fitted to the window's largest residuals so that
p-values keep falling past the largest residual seen. One more test, calibrated the same way,
scores the horizons' agreement (the sum of their surprises, Fisher's statistic).

A forecasting model's one-step forecasts (`expected`, e.g. the served recurrent model's, see
serving/detect.py) add one more residual test, calibrated the same way (seeded with the model's
residuals on the fit segment), beside the built-in forecasters rather than instead of them: on
the synthetic plant a trained MI-GRU alone found fewer injected events than with the built-in
tests beside it (benchmarks/results/nab.md).

Distribution change. Residuals catch points the forecasts did not expect, not a change of
behaviour made of unremarkable points (spikes coming more often, a wider spread, a slow excursion
to an unusual level). A second kind of test ranks each value among the `calibration_window`
values before it, turns the rank into a normal score z and scores the last `change_window`
points: `|sum z| / sqrt(k)` (a shift of level) and `(sum z^2 - k) / sqrt(2k)` (a rise of spread or
spike rate). Each statistic gets a conformal p-value against its own past values, the same way
as the residuals; the fit segment seeds the history and the statistics' past. All tests are
combined by Bonferroni, `p = min(1, K min_k p_k)`, so a point is flagged at no more than the
configured false-alarm rate when the series is exchangeable.

Alarms. The surprise `S = -ln p` of a point is kept only when it is news: for `hold` points after
an alarm, only a point at least twice as surprising as the alarm counts (one event, one alarm).
The hold is a refractory period: by default a share (`hold_fraction`) of the fit segment's length,
so it scales with the stream (the fit segment is NAB's probationary period, known at fit time).
A near-alarm (surprise >= `hold_level` times the flag level) starts a hold too, in which points
under the flag level score 0 but flagged points still count: `is_anomaly` is the same as with
flagged points alone starting holds, and a threshold swept a little below 0.5 (NAB's protocol)
does not count the points just under the flag line that follow a near-alarm as more events.
`score = S / (S + S_alpha)` with `S_alpha = -ln(false_alarm_rate)`: in [0, 1), monotone in p,
never saturated (1 - p rounds to 1 once p < 1e-16), and exactly 0.5 at the flag threshold, so
`is_anomaly = score >= 0.5`.

Magnitudes. Any finite values are scored: the detector works on the series divided by a power of
two (exact) that brings its fit segment's largest magnitude within [2**-256, 2**256], so that
squares and sums of squares stay finite (`score` multiplies `expected` and the bounds back; a
bound beyond the float range is then infinite). Residuals beyond 1e300 of those units (a value
far outside the fit segment's range) count as 1e300, and a surprise is at most 2**40 times the
flag level's, so scores stay finite and below 1.

Missing values (NaN) score 0, are never flagged and stay out of the distribution-change history;
inside the forecasts' inputs they are replaced by the one-step forecast of them. Gaps in time are
made missing values by `on_time_grid` (the rows of a regular time grid, `AnomalyResult.take`
brings the result back to the input's rows), so lags and seasons count time, not rows.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections import deque
from dataclasses import dataclass, fields
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from forecaster.calibration import conformal_rank
from forecaster.errors import DataError, ModelError

__all__ = [
    "PROBATION_CAP_ROWS",
    "PROBATION_FRACTION",
    "AnomalyDetector",
    "AnomalyResult",
    "DetectorSettings",
    "detect_on_time_grid",
    "detect_season",
    "on_time_grid",
    "probationary_length",
]

FloatArray = npt.NDArray[np.float64]

_SEASONS = 3  # seasons whose median change feeds the seasonal forecasts
_PERIOD_TOLERANCE = 0.05  # autocorrelation below the best within which a shorter period wins
_RENEW = 2.0  # how many times the last alarm's surprise a point needs to alarm during a hold
_MIN_AGREEMENT = 100  # scored points before the horizons' agreement is tested
_NORMAL = NormalDist()
_CHANGE_WARMUP = 10  # windows' worth of statistics before the change test counts
_MIN_EXTERNAL_SEED = 30  # another model's fit-segment residuals needed to seed its calibration
_SEED_FOLDS = 5  # folds of the fit segment whose out-of-fold residuals seed the calibration
_SAFE_EXPONENT = 256  # |values| below 2**256: squares and sums of squares stay finite
_MAX_RESIDUAL = 1e300  # largest nonconformity score remembered (its windows' sums stay finite)
_MAX_LOG_SURPRISE = 1e290  # largest -ln p of one test (the sum over tests stays finite)
_MAX_SCORE_SURPRISE = 2.0**40  # largest surprise, in flag levels, a score reflects (score < 1)
PROBATION_FRACTION = 0.15
PROBATION_CAP_ROWS = 5000  # NAB caps the probationary period at 15% of 5,000 rows (750)


def probationary_length(n_rows: int, fraction: float = PROBATION_FRACTION) -> int:
    """NAB's probationary period of a stream of `n_rows`: `min(floor(f n), f * 5000)` rows."""
    return int(min(math.floor(fraction * n_rows), fraction * PROBATION_CAP_ROWS))


@dataclass(frozen=True)
class DetectorSettings:
    """Hyper-parameters of `AnomalyDetector` (steps are rows of the series).

    Attributes:
        false_alarm_rate: flag a point when its combined p-value is <= this.
        horizons: forecast horizons whose residuals are scored (1 is the one-step forecast; a
            long one sees slow excursions the short ones follow). A horizon whose forecaster
            needs more points than the fit segment has (`fit_points`) is left out.
        lags: recent changes used as inputs of each forecast.
        season: seasonal period; None detects it on the fit segment, 0 means none.
        max_season: longest period `detect_season` considers.
        calibration_window: past residuals per horizon that calibrate the p-values.
        tail_fraction: share of the window's largest residuals the exponential tail is fitted on.
        hold: points after an alarm during which only a point twice as surprising scores
            (used when `hold_fraction` is None).
        hold_fraction: the hold as a share of the fit segment's length (rounded); None: `hold`.
        hold_level: share of the flag level's surprise `-ln(false_alarm_rate)` at which a point
            starts a hold (1: only flagged points do); flagged points pass a near-alarm's hold.
        max_gap_fill: most missing rows `on_time_grid` puts in one gap of the timestamps.
        change_window: recent points whose ranks in the trailing `calibration_window` values
            the distribution-change test scores (0: no such test).
        ridge: L2 penalty of the forecasters, relative to the feature variance.
    """

    false_alarm_rate: float = 0.001
    horizons: tuple[int, ...] = (1, 8, 32)
    lags: int = 2
    season: int | None = None
    max_season: int = 1000
    calibration_window: int = 6000
    tail_fraction: float = 0.06
    ridge: float = 1e-3
    hold: int = 100
    change_window: int = 32
    hold_fraction: float | None = 0.3
    hold_level: float = 0.9
    max_gap_fill: int = 32

    def fit_points(self, h: int) -> int:
        """Fewest known points the direct forecaster of horizon `h` is fitted on."""
        return 2 * (h + self.lags) + 10

    @property
    def min_fit_points(self) -> int:
        """Fewest known points `AnomalyDetector.fit` accepts with these settings (those of the
        shortest horizon; a longer horizon needing more is left out of a shorter fit)."""
        return self.fit_points(min(self.horizons))

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.false_alarm_rate < 1:
            problems.append(f"false_alarm_rate: {self.false_alarm_rate} is not in (0, 1)")
        if not self.horizons or any(h < 1 for h in self.horizons):
            problems.append(f"horizons: {self.horizons} must be a non-empty tuple of ints >= 1")
        if self.lags < 1:
            problems.append(f"lags: {self.lags} is not >= 1")
        if self.season is not None and (self.season < 0 or self.season == 1):
            problems.append(f"season: {self.season} must be None, 0 or >= 2")
        if self.calibration_window < 10:
            problems.append(f"calibration_window: {self.calibration_window} is not >= 10")
        if not 0 < self.tail_fraction < 0.5:
            problems.append(f"tail_fraction: {self.tail_fraction} is not in (0, 0.5)")
        if self.change_window < 0 or 0 < self.change_window < 2:
            problems.append(f"change_window: {self.change_window} must be 0 or >= 2")
        if self.hold < 0:
            problems.append(f"hold: {self.hold} is not >= 0")
        if self.hold_fraction is not None and not 0 <= self.hold_fraction <= 10:
            problems.append(f"hold_fraction: {self.hold_fraction} is not None or in [0, 10]")
        if not 0 < self.hold_level <= 1:
            problems.append(f"hold_level: {self.hold_level} is not in (0, 1]")
        if self.max_gap_fill < 0:
            problems.append(f"max_gap_fill: {self.max_gap_fill} is not >= 0")
        if self.ridge <= 0:
            problems.append(f"ridge: {self.ridge} is not > 0")
        if problems:
            raise ModelError("anomaly detector settings: " + "; ".join(problems), field="anomaly")


@dataclass(frozen=True)
class AnomalyResult:
    """Per-point output of `AnomalyDetector.score`, each an array of the input's length.

    Attributes:
        score: anomaly score in [0, 1): S / (S + S_alpha) of the surprise S = -ln p that is
            left after the hold (module docstring); 0 where not scored.
        is_anomaly: score >= 0.5, i.e. p <= false_alarm_rate and the point is news.
        p_value: combined p-value before the hold (1 where not scored).
        expected: one-step forecast (NaN where there is not enough past).
        lower: lower bound of the one-step conformal interval at 1 - false_alarm_rate.
        upper: upper bound of that interval.
    """

    score: FloatArray
    is_anomaly: npt.NDArray[np.bool_]
    p_value: FloatArray
    expected: FloatArray
    lower: FloatArray
    upper: FloatArray

    def take(self, rows: npt.ArrayLike) -> AnomalyResult:
        """The result at `rows` only (e.g. the input's rows of a result on a time grid)."""
        index = np.asarray(rows, dtype=np.int64)
        return AnomalyResult(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def on_time_grid(
    values: npt.ArrayLike, timestamps: npt.ArrayLike, max_fill: int
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """`values` placed on a regular time grid, NaN where a step has no value; and each one's row.

    The step is the median time between rows. A gap of k steps becomes k - 1 missing rows (at
    most `max_fill`: a longer outage is not forecast across step by step), so the forecasts'
    lags and seasons count time, not rows. Rows stay in their order: rows closer than a step,
    repeated or going back in time (a clock change) stay consecutive rows.

    Raises:
        DataError: timestamps that are not datetimes or not one per value.
    """
    y = _as_series(values, "values")
    try:
        stamps = np.asarray(timestamps, dtype="datetime64[ns]").astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"timestamps: not datetimes ({exc})", field="timestamps") from exc
    if stamps.shape != y.shape:
        raise DataError(
            f"timestamps: {stamps.size} timestamps for {y.size} values", field="timestamps"
        )
    if max_fill < 0:
        raise DataError(f"max_fill: {max_fill} is not >= 0", field="max_fill")
    steps = np.diff(stamps)
    rows = np.zeros(len(y), dtype=np.int64)
    step = float(np.median(steps)) if steps.size else 0.0
    if step > 0:
        k = np.clip(np.rint(steps / step), 1, max_fill + 1).astype(np.int64)
        rows[1:] = np.cumsum(k)
    else:
        rows = np.arange(len(y), dtype=np.int64)
    grid = np.full(int(rows[-1]) + 1 if rows.size else 0, np.nan)
    grid[rows] = y
    return grid, rows


def _as_series(values: npt.ArrayLike, name: str) -> FloatArray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: values must be numbers ({exc})", field=name) from exc
    if array.ndim != 1:
        raise DataError(f"{name}: expected a 1-d series, got shape {array.shape}", field=name)
    if np.isinf(array).any():
        row = int(np.flatnonzero(np.isinf(array))[0])
        raise DataError(f"{name}, row {row}: value {array[row]} is infinite", field=name)
    return array


def _scale_of(values: FloatArray) -> float:
    """A power of two that brings the largest finite |value| within [2**-256, 2**256) (1.0 when
    it is already there, or there is none); dividing by it is exact."""
    magnitudes = np.abs(values[np.isfinite(values)])
    top = float(magnitudes.max()) if magnitudes.size else 0.0
    if top == 0.0:
        return 1.0
    exponent = math.frexp(top)[1]  # top < 2**exponent
    if exponent > _SAFE_EXPONENT:
        return math.ldexp(1.0, exponent - _SAFE_EXPONENT)
    if exponent < -_SAFE_EXPONENT:
        return math.ldexp(1.0, exponent)
    return 1.0


def _forward_fill(values: FloatArray) -> FloatArray:
    """NaNs replaced by the last known value (leading NaNs by the first known one)."""
    missing = np.isnan(values)
    if not missing.any():
        return values
    known = np.flatnonzero(~missing)
    if known.size == 0:
        return values
    last = np.maximum.accumulate(np.where(missing, 0, np.arange(len(values))))
    filled = values[last]
    filled[: known[0]] = values[known[0]]
    return filled


def detect_season(values: npt.ArrayLike, max_season: int = 1000, min_acf: float = 0.6) -> int:
    """The dominant seasonal period of `values` by autocorrelation, 0 when there is none.

    The period is the lag of the highest local maximum of the (unbiased) autocorrelation of the
    linearly detrended series among lags 4..min(max_season, n // 2), if it reaches `min_acf`.
    """
    y = _forward_fill(_as_series(values, "values"))
    y = y[~np.isnan(y)]
    y = y / _scale_of(y)  # the autocorrelation is scale-free; this keeps y @ y finite
    n = len(y)
    top = min(max_season, n // 2)
    if top < 5:
        return 0
    t = np.arange(n, dtype=np.float64)
    y = y - np.polyval(np.polyfit(t, y, 1), t)
    variance = float(y @ y)
    if variance <= 0:
        return 0
    spectrum = np.fft.rfft(y, 2 * n)
    # Unbiased: each lag's sum over its n - lag pairs, so long periods are not shrunk.
    acf = np.fft.irfft(spectrum * np.conj(spectrum))[: top + 2] / variance
    acf = acf * n / (n - np.arange(top + 2))
    lags = np.arange(4, top + 1)
    peaks = lags[(acf[lags] > acf[lags - 1]) & (acf[lags] >= acf[lags + 1])]
    if peaks.size == 0:
        return 0
    # Multiples of a period correlate as well as it does: the shortest of the near-best wins.
    best = int(peaks[acf[peaks] >= acf[peaks].max() - _PERIOD_TOLERANCE][0])
    return best if acf[best] >= min_acf else 0


class _Calibration:
    """A trailing window of nonconformity scores, sorted, giving conformal p-values."""

    def __init__(self, size: int, tail_fraction: float, resolution: float) -> None:
        self.size = size
        self.tail_fraction = tail_fraction
        self.resolution = resolution
        self.window: list[float] = []
        self.order: deque[float] = deque()

    def __len__(self) -> int:
        return len(self.window)

    def remember(self, a: float) -> None:
        """Add `a`; forget the oldest score once the window is full."""
        bisect.insort(self.window, a)
        self.order.append(a)
        if len(self.order) > self.size:
            old = self.order.popleft()
            del self.window[bisect.bisect_left(self.window, old)]

    def _tail(self) -> tuple[int, float, float]:
        """Tail size m, its threshold u (m-th largest score) and mean excess beta."""
        window, n = self.window, len(self.window)
        m = max(2, math.ceil(self.tail_fraction * n))
        u = window[n - m]
        beta = max(sum(window[n - m :]) / m - u, self.resolution)
        return m, u, beta

    def log_p_value(self, a: float) -> float:
        """Log conformal p-value of `a`, with an exponential tail past the m-th largest score."""
        n = len(self.window)
        at_least = n - bisect.bisect_left(self.window, a)
        if at_least >= max(2, math.ceil(self.tail_fraction * n)) or a <= 0:
            return math.log((at_least + 1) / (n + 1))
        m, u, beta = self._tail()
        return max(math.log((m + 1) / (n + 1)) - (a - u) / beta, -_MAX_LOG_SURPRISE)

    def quantile(self, alpha: float) -> float:
        """Score exceeded with probability `alpha` (conformal, exponential tail beyond)."""
        n = len(self.window)
        m = max(2, math.ceil(self.tail_fraction * n))
        if (m + 1) / (n + 1) <= alpha:
            return self.window[min(conformal_rank(n, 1 - alpha), n) - 1]
        m, u, beta = self._tail()
        return u + beta * math.log((m + 1) / ((n + 1) * alpha))


class _Change:
    """Distribution-change test: do the last k values rank unusually in the trailing history?

    Each value is ranked among the `history` values before it (mid-rank for ties) and turned into
    a normal score z. Two statistics of the last k scores, each calibrated conformally on its own
    past: |sum z| / sqrt(k), a shift of level either way, and (sum z^2 - k) / sqrt(2k), a rise of
    spread or of spike rate (one-sided: a calmer stretch is not news). Under exchangeable values
    sum z / sqrt(k) and the second statistic are about standard normal. Tests start once
    `_CHANGE_WARMUP * k` statistics are known: the tail fit needs more than a few
    (overlapping, hence correlated) windows.
    """

    def __init__(self, k: int, history: int, tail_fraction: float) -> None:
        self.k = k
        self.history = history
        self.sorted: list[float] = []
        self.order: deque[float] = deque()
        self.recent: deque[float] = deque()
        self.sum_z = 0.0
        self.sum_z2 = 0.0
        self.level = _Calibration(history, tail_fraction, 1e-9)
        self.spread = _Calibration(history, tail_fraction, 1e-9)

    def update(self, value: float) -> float:
        """Add `value`; the smaller log p-value of the two statistics (0 while warming up)."""
        n = len(self.sorted)
        log_p = 0.0
        if n >= 2 * self.k:
            below = bisect.bisect_left(self.sorted, value)
            ties = bisect.bisect_right(self.sorted, value) - below
            z = _NORMAL.inv_cdf((below + 0.5 * ties + 0.5) / (n + 1))
            self.recent.append(z)
            self.sum_z += z
            self.sum_z2 += z * z
            if len(self.recent) > self.k:
                old = self.recent.popleft()
                self.sum_z -= old
                self.sum_z2 -= old * old
            if len(self.recent) == self.k:
                level = abs(self.sum_z) / math.sqrt(self.k)
                spread = (self.sum_z2 - self.k) / math.sqrt(2 * self.k)
                # Overlapping windows make the statistics correlated: wait for ~10 disjoint ones.
                if len(self.level) >= _CHANGE_WARMUP * self.k:
                    log_p = min(self.level.log_p_value(level), self.spread.log_p_value(spread))
                self.level.remember(level)
                self.spread.remember(spread)
        bisect.insort(self.sorted, value)
        self.order.append(value)
        if len(self.order) > self.history:
            del self.sorted[bisect.bisect_left(self.sorted, self.order.popleft())]
        return log_p


@dataclass
class _Horizon:
    """A direct forecaster of `y[t] - y[t-h]` and the calibration of its residuals."""

    h: int
    seasonal: bool
    weights: FloatArray
    mean: FloatArray
    scale: FloatArray
    calibration: _Calibration


class AnomalyDetector:
    """Causal forecast-residual anomaly detector: `fit` on a clean start, then `score`."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = settings or DetectorSettings()
        self.season = 0
        self._scale = 1.0  # the series is divided by this (a power of two, see `_scale_of`)
        self._resolution = 0.0
        self._horizons: list[_Horizon] = []
        self._change: _Change | None = None
        self.hold = self.settings.hold

    @property
    def is_fitted(self) -> bool:
        """Whether `fit` has run."""
        return bool(self._horizons)

    def _needed(self, h: int, seasonal: bool) -> int:
        return max(h + self.settings.lags, self.season + h if seasonal else 0)

    def _features(self, y: FloatArray, h: int, seasonal: bool) -> FloatArray:
        """Inputs of the h-step forecast of every t: [n, lags (+1)], NaN where the past is short.

        Row t uses y[t - h - lags .. t - h] and, when seasonal, y[t - 3s - h .. t - s].
        """
        n, s = len(y), self.season
        columns = []
        for j in range(1, self.settings.lags + 1):
            columns.append(_shift(y, h) - _shift(y, h + j))
        if seasonal:
            # The median change over the last seasons: one anomalous season leaves no echo.
            past = np.stack(
                [_shift(y, k * s) - _shift(y, k * s + h) for k in range(1, _SEASONS + 1)]
            )
            known = np.isfinite(past).any(axis=0)
            change = np.full(n, np.nan)
            change[known] = np.nanmedian(past[:, known], axis=0)
            columns.append(change)
        return np.stack(columns, axis=1) if columns else np.empty((n, 0))

    def fit(self, values: npt.ArrayLike, expected: npt.ArrayLike | None = None) -> AnomalyDetector:
        """Fit the forecasters and seed the calibration windows on `values` (a clean start).

        Sets `hold`, the refractory period in points: `hold_fraction` of `len(values)` (the fit
        segment), or the `hold` setting when `hold_fraction` is None.

        Args:
            values: the fit segment [n], NaN where a value is missing.
            expected: optional one-step forecasts [n] of the forecasting model whose forecasts
                `score` will get; with at least `_MIN_EXTERNAL_SEED` of them known, their
                residuals seed that model's calibration (else the built-in one-step
                forecaster's out-of-fold residuals do).

        Raises:
            DataError: bad values or expected, or fewer known points than the forecasts need.
        """
        raw = _as_series(values, "values")
        external = _external(expected, len(raw))
        self._scale = _scale_of(raw)
        raw = raw / self._scale
        if external is not None:
            external = external / self._scale
        y = _forward_fill(raw)
        settings = self.settings
        known = y[~np.isnan(y)]
        if known.size < settings.min_fit_points:
            raise DataError(
                f"values: {known.size} known points are too few to fit the anomaly detector; "
                f"it needs at least {settings.min_fit_points} "
                f"(horizons {settings.horizons}, lags {settings.lags})",
                field="values",
            )
        if settings.season is None:
            self.season = detect_season(y, settings.max_season)
        else:
            self.season = settings.season
        spread = float(np.subtract(*np.percentile(known, [75, 25])))
        if spread <= 0:
            spread = float(np.std(known))
        # Residuals below this are rounding, not signal: a noise-free series must not alarm.
        resolution = 1e-3 * spread
        self._resolution = resolution if resolution > 0 else 1e-9 * (1.0 + abs(float(known[0])))
        if settings.hold_fraction is not None:
            self.hold = round(settings.hold_fraction * len(raw))
        self._horizons = []
        for h in settings.horizons:
            if known.size < settings.fit_points(h):
                continue  # too few points to fit this horizon's forecaster: left out
            seasonal = self.season > 0 and len(y) >= self._needed(h, True) + 3 * (settings.lags + 2)
            horizon = _Horizon(
                h=h,
                seasonal=seasonal,
                weights=np.zeros(0),
                mean=np.zeros(0),
                scale=np.zeros(0),
                calibration=_Calibration(
                    settings.calibration_window, settings.tail_fraction, self._resolution
                ),
            )
            residuals = self._fit_horizon(horizon, y)
            for a in residuals[-settings.calibration_window :]:
                horizon.calibration.remember(self._nonconformity(float(a)))
            self._horizons.append(horizon)
        # A forecasting model's residuals are seeded like the shortest horizon's, or from the
        # model's own fit-segment residuals when there are enough of them.
        self._model = copy.deepcopy(self._horizons[0].calibration)
        if external is not None:
            model_residuals = np.abs(raw - external)
            model_residuals = model_residuals[~np.isnan(model_residuals)]
            if model_residuals.size >= _MIN_EXTERNAL_SEED:
                self._model = _Calibration(
                    settings.calibration_window, settings.tail_fraction, self._resolution
                )
                for a in model_residuals[-settings.calibration_window :]:
                    self._model.remember(self._nonconformity(float(a)))
        self._agreement = _Calibration(settings.calibration_window, settings.tail_fraction, 1e-6)
        self._change = None
        if settings.change_window:
            self._change = _Change(
                settings.change_window, settings.calibration_window, settings.tail_fraction
            )
            for value in raw[~np.isnan(raw)]:
                self._change.update(float(value))
        return self

    def _ridge(self, z: FloatArray, target: FloatArray) -> tuple[float, FloatArray]:
        """Intercept and weights of the ridge regression of `target` on standardised `z`."""
        gram = z.T @ z + self.settings.ridge * len(z) * np.eye(z.shape[1])
        intercept = float(target.mean())
        return intercept, np.linalg.solve(gram, z.T @ (target - intercept))

    def _fit_horizon(self, horizon: _Horizon, y: FloatArray) -> FloatArray:
        """Ridge fit of the horizon's forecaster on `y`; return its out-of-fold |residuals|.

        In-sample residuals are narrower than the errors on new points: each of `_SEED_FOLDS`
        contiguous folds is forecast by a ridge fitted on the rest, less the `h + lags` rows on
        either side whose inputs or targets overlap the fold's.
        """
        x = self._features(y, horizon.h, horizon.seasonal)
        target = y - _shift(y, horizon.h)
        usable = np.isfinite(x).all(axis=1) & np.isfinite(target)
        xs, ts = x[usable], target[usable]
        mean = xs.mean(axis=0)
        scale = xs.std(axis=0)
        scale[scale <= 0] = 1.0
        z = (xs - mean) / scale
        intercept, weights = self._ridge(z, ts)
        horizon.weights = np.concatenate([[intercept], weights])
        horizon.mean, horizon.scale = mean, scale
        residuals = np.abs(ts - intercept - z @ weights)
        gap = horizon.h + self.settings.lags
        for fold in np.array_split(np.arange(len(z)), _SEED_FOLDS):
            train = np.ones(len(z), dtype=bool)
            train[max(fold[0] - gap, 0) : fold[-1] + 1 + gap] = False
            if fold.size and train.sum() > 2 * z.shape[1]:
                b0, b = self._ridge(z[train], ts[train])
                residuals[fold] = np.abs(ts[fold] - b0 - z[fold] @ b)
        return residuals

    def _forecast(self, horizon: _Horizon, y: FloatArray) -> FloatArray:
        """The h-step forecast of every point of `y` (NaN where the past is too short)."""
        x = self._features(y, horizon.h, horizon.seasonal)
        z = (x - horizon.mean) / horizon.scale
        return _shift(y, horizon.h) + horizon.weights[0] + z @ horizon.weights[1:]

    def _impute(self, raw: FloatArray, missing: npt.NDArray[np.bool_]) -> FloatArray:
        """Missing points replaced, in time order, by the shortest horizon's forecast of them.

        A forward fill alone would make the first point after a gap look like a jump.
        """
        y = _forward_fill(raw)
        horizon = min(self._horizons, key=lambda hz: hz.h)
        reach = self._needed(horizon.h, horizon.seasonal) + (_SEASONS - 1) * self.season + 1
        for t in np.flatnonzero(missing):
            if t >= reach:
                local = y[t - reach : t + 1]
                forecast = self._forecast(horizon, local)[-1]
                if math.isfinite(forecast):  # else (overflow past a huge value): forward fill
                    y[t] = forecast
        return y

    @property
    def _alarm_surprise(self) -> float:
        return -math.log(self.settings.false_alarm_rate)

    def _nonconformity(self, absolute_residual: float) -> float:
        return min(max(absolute_residual - self._resolution, 0.0), _MAX_RESIDUAL)

    def score(
        self,
        values: npt.ArrayLike,
        *,
        start: int = 0,
        expected: npt.ArrayLike | None = None,
    ) -> AnomalyResult:
        """Score every point of `values` causally; the calibration windows move on as it goes.

        The detector is a stream: a second call continues from the calibration the first one
        left (fit again to start over).

        Args:
            values: the series [n], NaN where a value is missing.
            start: points before it are history only (score 0, not flagged, not calibrated).
            expected: optional one-step forecasts [n] of a forecasting model (e.g. the served
                one), NaN where it has none: their residuals are one more test beside the
                built-in forecasters', and they are the `expected` value where known.

        Raises:
            ModelError: `score` before `fit`.
            DataError: bad values, start or expected.
        """
        if not self.is_fitted:
            raise ModelError("the anomaly detector must be fitted before score()")
        raw = _as_series(values, "values")
        n = len(raw)
        if not 0 <= start <= n:
            raise DataError(f"start: {start} is not within [0, {n}]", field="start")
        external = _external(expected, n)
        # Values far beyond the fit segment's range may overflow the forecasts: an infinite
        # residual counts as `_MAX_RESIDUAL`, a NaN forecast leaves its test out.
        with np.errstate(over="ignore", invalid="ignore"):
            return self._score(raw / self._scale, start, external, self._scale)

    def _score(
        self, raw: FloatArray, start: int, external: FloatArray | None, scale: float
    ) -> AnomalyResult:
        """`score` on the scaled series; `expected` and the bounds come back unscaled."""
        n = len(raw)
        if external is not None:
            external = external / scale
        missing = np.isnan(raw)
        y = self._impute(raw, missing)
        forecasts = [self._forecast(horizon, y) for horizon in self._horizons]
        log_p = np.zeros(n)
        half_width = np.full(n, np.nan)
        first = self._horizons[0].calibration
        for t in range(start, n):
            half_width[t] = first.quantile(self.settings.false_alarm_rate)
            if not missing[t]:
                log_p[t] = self._log_p_value(t, raw, forecasts, external)

        alarm = self._alarm_surprise
        reported = _hold(-log_p, self.hold, alarm, self.settings.hold_level * alarm)
        # S / (S + S_alpha) never saturates (1 - p is 1.0 in floats once p < 1e-16) and is 0.5
        # exactly at the flag threshold; S capped so that S + S_alpha > S in floats.
        capped = np.minimum(reported, _MAX_SCORE_SURPRISE * alarm)
        score = capped / (capped + alarm) + 0.0  # + 0.0: no -0.0 when p = 1
        one_step = forecasts[0] if self._horizons[0].h == 1 else _shift(y, 1)
        if external is not None:
            one_step = np.where(np.isnan(external), one_step, external)
        half_width += self._resolution
        return AnomalyResult(
            score=score,
            is_anomaly=reported >= self._alarm_surprise,
            p_value=np.exp(log_p),
            expected=one_step * scale,
            lower=(one_step - half_width) * scale,
            upper=(one_step + half_width) * scale,
        )

    def _log_p_value(
        self, t: int, raw: FloatArray, forecasts: list[FloatArray], external: FloatArray | None
    ) -> float:
        """Combined log p-value of point t; its residuals then join the calibration windows."""
        best, total, tests = 0.0, 0.0, len(self._horizons) + 1
        if self._change is not None:
            best, tests = self._change.update(float(raw[t])), tests + 2
        residuals = [
            (horizon.calibration, forecast[t])
            for horizon, forecast in zip(self._horizons, forecasts, strict=True)
        ]
        if external is not None:
            residuals.append((self._model, external[t]))
            tests += 1
        for calibration, forecast in residuals:
            r = abs(raw[t] - forecast)
            if math.isnan(r):
                continue
            a = self._nonconformity(r)
            log_p = calibration.log_p_value(a)
            best, total = min(best, log_p), total - log_p
            calibration.remember(a)
        # The horizons agreeing (Fisher's sum of surprises) is one more test, calibrated as well.
        if len(self._agreement) >= _MIN_AGREEMENT:
            best = min(best, self._agreement.log_p_value(total))
        self._agreement.remember(total)
        return min(0.0, math.log(tests) + best)


def _external(expected: npt.ArrayLike | None, n: int) -> FloatArray | None:
    """Another model's one-step forecasts `[n]` (NaN where it has none), checked."""
    if expected is None:
        return None
    external = _as_series(expected, "expected")
    if external.shape != (n,):
        raise DataError(f"expected: {external.shape[0]} forecasts for {n} values", field="expected")
    return external


def _shift(y: FloatArray, k: int) -> FloatArray:
    """y delayed by k steps: out[t] = y[t - k], NaN for t < k."""
    out = np.full(len(y), np.nan)
    if k < len(y):
        out[k:] = y[: len(y) - k]
    return out


def _hold(surprise: FloatArray, hold: int, alarm: float, start: float | None = None) -> FloatArray:
    """Zero the surprise of the `hold` points after an alarm unless `_RENEW` x as surprising.

    An alarm is a point whose surprise reaches `start` (the hold level, default `alarm`); the
    points after it (below the alarm level too) are the rest of its event, old news. A hold
    started by a near-alarm (below `alarm`) still lets a point at or above `alarm` through.
    """
    start = alarm if start is None else start
    out = surprise.copy()
    last_alarm, alarm_level = -(hold + 1), 0.0
    for t, s in enumerate(surprise):
        held = t - last_alarm <= hold and s < _RENEW * alarm_level
        if held and not (alarm_level < alarm <= s):
            out[t] = 0.0
        elif s >= start:
            last_alarm, alarm_level = t, float(s)
    return out


def detect_on_time_grid(
    values: npt.ArrayLike,
    timestamps: npt.ArrayLike | None,
    settings: DetectorSettings | None = None,
    *,
    fit_rows: int,
    expected: npt.ArrayLike | None = None,
) -> AnomalyResult:
    """Fit on a series' first `fit_rows` rows and score every row, on the time grid of
    `timestamps` (`on_time_grid`; None: the rows are consecutive steps); one entry per input
    row, in input order. `forecaster detect` and the `/anomaly` endpoint both score this way.

    The detector is fitted on the grid steps before row `fit_rows` (those rows' values and the
    missing steps between them) and scores the whole grid; gaps longer than
    `settings.max_gap_fill` steps are shortened. `expected`: a model's one-step forecasts of the
    input rows (NaN where it has none).

    Raises:
        DataError: timestamps that are not datetimes or not one per value; a fit segment too
            short to fit on.
    """
    settings = settings or DetectorSettings()
    y = _as_series(values, "values")
    if timestamps is None:
        grid, rows = y, np.arange(len(y), dtype=np.int64)
    else:
        grid, rows = on_time_grid(y, timestamps, settings.max_gap_fill)
    fit_steps = int(rows[fit_rows]) if fit_rows < len(rows) else len(grid)
    on_grid = None
    if expected is not None:
        on_grid = np.full(len(grid), np.nan)
        on_grid[rows] = np.asarray(expected, dtype=np.float64)
    detector = AnomalyDetector(settings).fit(
        grid[:fit_steps], None if on_grid is None else on_grid[:fit_steps]
    )
    return detector.score(grid, start=fit_steps, expected=on_grid).take(rows)
