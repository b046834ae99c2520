"""The data-side stationarity gate: ADF + KPSS per series, then feedback vs remedy vs BPTT.

Implements ALGORITHMS.md §5.5 step 1 (DESIGN.md §4); pinned by the stationarity part of oracle
O15 (white noise and AR(1) -> `stationary`, random walk -> `difference_stationary`, linear trend
plus noise -> `trend_stationary`, over 5 seeds).

`check(x)` runs one ADF (H0: unit root) and two KPSS tests (H0: level-, then trend-stationary)
and reads them jointly:

    ADF rejects,        KPSS(c) does not                    -> stationary
    ADF does not,       KPSS(c) rejects                     -> difference_stationary
    ADF rejects,        KPSS(c) rejects, KPSS(ct) does not  -> trend_stationary
    anything else                                           -> inconclusive

A test "rejects" when its p-value is below `alpha`; a KPSS p-value clipped at the edge of its
table (0.01 or 0.1) that cannot be compared with `alpha` makes the reading `inconclusive`, and so
does a deterministic series (sine, ramp), whose ADF regressions are rank-deficient.

The ADF regression defaults to `"ct"` (constant and trend), not the textbook `"c"`. Its
alternative is "stationary around a linear trend", which contains the level-stationary case, so
it is the right companion for both KPSS readings with a single ADF call. ADF(`c`) has almost no
power against a trend-stationary series: a deterministic trend looks like a unit root with drift,
so linear trend + noise is read as `difference_stationary` (see
`test_adf_with_constant_only_misreads_trend_as_difference_stationary`). The cost of `"ct"` is a
little power against near-unit-root level-stationary series, which is immaterial at the lengths
this gate sees (hundreds to thousands of points).

`gate(series, config)` applies the reading to every preprocessed series of a job and decides the
training method, differencing all series together (one `d` per job) when the remedy allows it.

Warnings raised by statsmodels inside a test (the KPSS table-clipping `InterpolationWarning`,
rank-deficiency warnings of degenerate ADF regressions) are captured and written to the test's
`note`; none leaks. `warnings.catch_warnings` is process-global before Python 3.14, and BLAS runs
single-threaded during a check (`_single_threaded_blas`), so run checks in parallel with
processes, not threads.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt
from scipy.linalg.lapack import dtrcon
from statsmodels.tools.sm_exceptions import InterpolationWarning, SingularMatrixWarning
from statsmodels.tsa.adfvalues import mackinnoncrit, mackinnonp
from statsmodels.tsa.stattools import adfuller, kpss

from forecaster.config import StationarityConfig
from forecaster.errors import DataError
from forecaster.files import atomic_write_text

__all__ = [
    "MIN_OBS",
    "GateDecision",
    "Method",
    "StationarityReport",
    "TestResult",
    "Verdict",
    "check",
    "check_named",
    "gate",
    "save_report",
]

logger = logging.getLogger(__name__)

Verdict = Literal["stationary", "trend_stationary", "difference_stationary", "inconclusive"]
Method = Literal["feedback", "bptt", "refuse"]
Regression = Literal["c", "ct"]
Autolag = Literal["AIC", "BIC", "t-stat"]

# Hard floor below which neither test means anything (ADF with a trend and its default lag search
# leaves barely a dozen regression rows at 20 points); real jobs test thousands of points.
MIN_OBS = 20

SCHEMA_VERSION = 1

# statsmodels >= 0.15 warns unless the tuple return is asked for explicitly; 0.14 lacks the flag.
_TUPLE_RESULT: dict[str, Any] = (
    {"result_object": False} if "result_object" in inspect.signature(kpss).parameters else {}
)

_ORDINALS = {1: "once", 2: "twice"}


@dataclass(frozen=True)
class TestResult:
    """One hypothesis test on one series.

    Attributes:
        name: `"ADF"` or `"KPSS"`.
        regression: deterministic terms, `"c"` (level) or `"ct"` (level and linear trend).
        statistic: the test statistic.
        pvalue: as statsmodels returns it; KPSS p-values are clipped to [0.01, 0.1].
        lags: lags used (ADF: augmentation lags; KPSS: Newey-West bandwidth).
        n_obs: observations used (ADF: rows of its regression; KPSS: series length).
        critical_values: by level, e.g. `{"1%": -3.96, "5%": -3.41, "10%": -3.13}`.
        note: why the p-value or statistic needs care (clipping, degenerate regression), or None.
        pvalue_bound: `"upper"` when the true p-value is below `pvalue` (clipped at 0.01),
            `"lower"` when it is above (clipped at 0.1), None when `pvalue` is the estimate.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    name: Literal["ADF", "KPSS"]
    regression: Regression
    statistic: float
    pvalue: float
    lags: int
    n_obs: int
    critical_values: dict[str, float]
    note: str | None = None
    pvalue_bound: Literal["upper", "lower"] | None = None

    def rejects(self, alpha: float) -> bool | None:
        """Whether H0 is rejected at level `alpha`; None if a clipped p-value cannot tell."""
        if self.pvalue_bound == "upper":  # true p < pvalue
            return True if self.pvalue <= alpha else None
        if self.pvalue_bound == "lower":  # true p > pvalue
            return False if self.pvalue >= alpha else None
        return self.pvalue < alpha

    def format_pvalue(self) -> str:
        """`p=0.412`, or `p<0.01` / `p>0.1` for a clipped p-value."""
        if self.pvalue_bound == "upper":
            return f"p<{self.pvalue:g}"
        if self.pvalue_bound == "lower":
            return f"p>{self.pvalue:g}"
        return f"p={self.pvalue:.3g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (plain floats, ints and strings)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TestResult:
        """Inverse of `to_dict`."""
        _require(data, ("name", "regression", "statistic", "pvalue", "lags", "n_obs"), "test")
        return cls(
            name=data["name"],
            regression=data["regression"],
            statistic=float(data["statistic"]),
            pvalue=float(data["pvalue"]),
            lags=int(data["lags"]),
            n_obs=int(data["n_obs"]),
            critical_values={str(k): float(v) for k, v in data["critical_values"].items()},
            note=data.get("note"),
            pvalue_bound=data.get("pvalue_bound"),
        )


@dataclass(frozen=True)
class StationarityReport:
    """ADF + KPSS(c) + KPSS(ct) on one series and their joint reading."""

    n_obs: int
    alpha: float
    adf: TestResult
    kpss_level: TestResult
    kpss_trend: TestResult
    verdict: Verdict
    reason: str

    @property
    def is_stationary(self) -> bool:
        """True only for the `stationary` verdict."""
        return self.verdict == "stationary"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (plain floats, ints and strings)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StationarityReport:
        """Inverse of `to_dict`."""
        keys = ("n_obs", "alpha", "adf", "kpss_level", "kpss_trend", "verdict", "reason")
        _require(data, keys, "stationarity report")
        if data["verdict"] not in get_args(Verdict):
            raise DataError(
                f"stationarity report: unknown verdict {data['verdict']!r}; "
                f"valid: {', '.join(get_args(Verdict))}",
                field="verdict",
            )
        return cls(
            n_obs=int(data["n_obs"]),
            alpha=float(data["alpha"]),
            adf=TestResult.from_dict(data["adf"]),
            kpss_level=TestResult.from_dict(data["kpss_level"]),
            kpss_trend=TestResult.from_dict(data["kpss_trend"]),
            verdict=data["verdict"],
            reason=str(data["reason"]),
        )


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for a job's series set, and why.

    Attributes:
        method: `feedback` (fixed-feedback training), `bptt` (fallback) or `refuse` (strict).
        differences: order of differencing to train on (0 unless `feedback` after the remedy).
        reason: one human sentence naming what failed and what was done.
        pass_fraction: fraction of series passing at order `differences`.
        reports: per series, one report per differencing order tried (index = order).
        failing: series not passing at order `differences`.
        config: the `StationarityConfig` values that produced the decision.
    """

    method: Method
    differences: int
    reason: str
    pass_fraction: float
    reports: dict[str, list[StationarityReport]]
    failing: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, the content of `stationarity.json`."""
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """Inverse of `to_dict`."""
        keys = ("method", "differences", "reason", "pass_fraction", "reports")
        _require(data, keys, "gate decision")
        if data["method"] not in get_args(Method):
            raise DataError(
                f"gate decision: unknown method {data['method']!r}; "
                f"valid: {', '.join(get_args(Method))}",
                field="method",
            )
        return cls(
            method=data["method"],
            differences=int(data["differences"]),
            reason=str(data["reason"]),
            pass_fraction=float(data["pass_fraction"]),
            reports={
                str(name): [StationarityReport.from_dict(r) for r in reports]
                for name, reports in data["reports"].items()
            },
            failing=[str(name) for name in data.get("failing", [])],
            config=dict(data.get("config", {})),
        )


def check(
    x: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    adf_regression: Regression = "ct",
    autolag: Autolag | None = "AIC",
    max_lag: int | None = None,
) -> StationarityReport:
    """Run ADF and KPSS (level and trend) on one series and read them jointly.

    Runs ADF once (`_adf`: statsmodels' `adfuller`, same values, computed ~50x faster) and `kpss`
    twice (`nlags="auto"`), and nothing else of note.

    Args:
        x: the series, 1-D, finite, at least `MIN_OBS` points, not constant.
        alpha: significance level of every test.
        adf_regression: deterministic terms of the ADF regression; `"ct"` (default) keeps linear
            trend + noise from being read as a unit root (module docstring).
        autolag: ADF lag selection (`None`: use `max_lag` lags).
        max_lag: largest ADF lag; statsmodels' `12 (n/100)^(1/4)` when None.

    Raises:
        DataError: `x` is not 1-D numeric, has NaN/inf, is shorter than `MIN_OBS` or constant.
        ValueError: `alpha`, `adf_regression` or `max_lag` is invalid.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: {alpha} is not in (0, 1)")
    if adf_regression not in get_args(Regression):
        raise ValueError(f"adf_regression: {adf_regression!r} is not 'c' or 'ct'")
    return _check_array(
        _as_series(x, label="series"),
        alpha=alpha,
        adf_regression=adf_regression,
        autolag=autolag,
        max_lag=max_lag,
        label="series",
    )


def gate(series: Mapping[str, npt.ArrayLike], config: StationarityConfig) -> GateDecision:
    """Decide fixed-feedback vs remedy vs BPTT for a job's set of preprocessed series.

    A series passes when its verdict is `stationary` (or `inconclusive` with
    `config.allow_inconclusive`); the set passes when the passing fraction is at least
    `config.min_pass_fraction`. Failing sets are differenced together, one order at a time up to
    `config.d_max` (remedy `difference`), and re-tested. A set that never passes gets `bptt`, or
    `refuse` in `strict` mode.

    Args:
        series: name -> preprocessed residuals (1-D, training window), e.g. `{"pump_1": r}`.
        config: the job's stationarity section.

    Raises:
        DataError: no series, or a series (at some differencing order) that `check` rejects;
            the message names the series and the order.
    """
    if not series:
        raise DataError("the stationarity gate needs at least one series, got none")
    arrays = {
        str(name): _as_series(x, label=f"series '{name}'", field_name=str(name))
        for name, x in series.items()
    }
    reports: dict[str, list[StationarityReport]] = {name: [] for name in arrays}
    for order in range(max_order(config) + 1):  # test order by order; stop once the set passes
        for name, values in arrays.items():
            reports[name].append(_check_named(values, name, order, config.alpha))
        if _set_passes(reports, order, config)[0]:
            break
    return decide(reports, config)


def max_order(config: StationarityConfig) -> int:
    """The highest differencing order the gate tries."""
    return config.d_max if config.remedy == "difference" else 0


def _set_passes(
    reports: Mapping[str, Sequence[StationarityReport]], order: int, config: StationarityConfig
) -> tuple[bool, list[str], float]:
    """(passes, failing series, passing fraction) of the set at differencing `order`."""
    failing = [n for n, rs in reports.items() if not _passes(rs[order], config.allow_inconclusive)]
    fraction = (len(reports) - len(failing)) / len(reports)
    return fraction >= config.min_pass_fraction - 1e-12, failing, fraction


def decide(
    reports: Mapping[str, Sequence[StationarityReport]],
    config: StationarityConfig,
    untestable: Mapping[str, str] | None = None,
) -> GateDecision:
    """The gate's set-level decision from per-series reports at orders `0, 1, …`.

    Each series needs a report at every order up to the first one the set passes at (all of
    `0..d_max` when it never passes); reports beyond that order are dropped, as `gate` never
    computes them. This is the reduction step when the per-series checks ran elsewhere
    (`pipelines.executor`).

    `untestable`: per series whose reports stop early, why the tests rejected it at the next
    order (too short once differenced, constant); raised, as `gate` raises it, only when the
    decision needs that order.

    Raises:
        DataError: no series, or a series missing a report at an order the decision needs
            (its `untestable` reason when given).
    """
    if not reports:
        raise DataError("the stationarity gate needs at least one series, got none")
    clauses: list[str] = []
    failing_by_order: list[list[str]] = []
    fractions: list[float] = []
    passed_at: int | None = None
    for order in range(max_order(config) + 1):
        short = [name for name, rs in reports.items() if len(rs) <= order]
        if short and untestable and short[0] in untestable:
            raise DataError(untestable[short[0]], field=short[0])
        if short:
            raise DataError(
                f"series {short[0]!r}: {len(reports[short[0]])} stationarity report(s), "
                f"the gate needs one at differencing order {order}",
                field=short[0],
            )
        ok, failing, fraction = _set_passes(reports, order, config)
        fractions.append(fraction)
        failing_by_order.append(failing)
        clauses.append(_order_clause(order, reports, failing, fraction, ok, config))
        if ok:
            passed_at = order
            break
    method: Method
    if passed_at is not None:
        method, differences = "feedback", passed_at
        reason = "; ".join(clauses) + f" → feedback with d={differences}"
    else:
        method, differences = ("refuse" if config.strict else "bptt"), 0
        if config.remedy == "none":
            why = "remedy 'none'"
        elif config.d_max == 0:
            why = "d_max=0 allows no differencing"
        else:
            why = f"still failing at d_max={config.d_max}"
        strict = ", strict mode" if config.strict else ""
        reason = "; ".join([*clauses, f"{why}{strict} → {method}"])
    tried = len(fractions)
    (logger.info if method == "feedback" else logger.warning)("stationarity gate: %s", reason)
    return GateDecision(
        method=method,
        differences=differences,
        reason=reason,
        pass_fraction=fractions[differences],
        reports={name: list(rs[:tried]) for name, rs in reports.items()},
        failing=failing_by_order[differences],
        config=config.model_dump(mode="json"),
    )


def save_report(decision: GateDecision, path: str | Path) -> Path:
    """Write `decision` as JSON (e.g. `stationarity.json`) atomically: temp file, then rename.

    Readers never see a partial file; on failure the previous file, if any, is left as it was.
    """
    text = json.dumps(decision.to_dict(), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


# --- helpers ---------------------------------------------------------------------------------


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an optimisation only; the results are the same without it
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run BLAS/LAPACK on one thread (restored on exit; ~30 µs).

    ADF's QR of an n x 30 design is far too small for threads to help, while idle OpenBLAS
    threads spin and, on a busy machine or with one process per core, make each check several
    times slower (measured: 4x the CPU time on 2 shared cores, with statsmodels' ADF).
    Parallelism belongs across series, in processes.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def _as_series(
    x: npt.ArrayLike, *, label: str, field_name: str | None = None
) -> npt.NDArray[np.float64]:
    """`x` as a 1-D float64 array, or a DataError naming what is wrong (no copy when possible)."""
    try:
        values = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{label}: values are not numeric ({exc})", field=field_name) from exc
    if values.ndim != 1:
        raise DataError(
            f"{label}: expected a 1-D series, got shape {values.shape}", field=field_name
        )
    n = values.shape[0]
    if n < MIN_OBS:
        raise DataError(
            f"{label}: too short for ADF/KPSS: {n} points, at least {MIN_OBS} are needed",
            field=field_name,
        )
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        first = int(bad[0])
        kind = "NaN" if np.isnan(values[first]) else "inf"
        raise DataError(
            f"{label}: {bad.size} non-finite value(s), first {kind} at index {first}; "
            "the stationarity tests need finite values",
            field=field_name,
        )
    span = float(np.ptp(values))
    if span <= 1e-12 * float(np.max(np.abs(values))):
        raise DataError(
            f"{label}: constant (all {n} values equal {values[0]:g}); "
            "stationarity tests need a varying series",
            field=field_name,
        )
    return values


def _check_array(
    values: npt.NDArray[np.float64],
    *,
    alpha: float,
    adf_regression: Regression = "ct",
    autolag: Autolag | None = "AIC",
    max_lag: int | None = None,
    label: str,
    field_name: str | None = None,
) -> StationarityReport:
    """`check` on an array `_as_series` already validated; errors start with `label`."""
    n = values.shape[0]
    if max_lag is not None:
        largest = n // 2 - len(adf_regression) - 1
        if not 0 <= max_lag <= largest:
            raise ValueError(f"max_lag: {max_lag} is not in [0, {largest}] for {n} points")
    with _single_threaded_blas():
        adf, deterministic = _run_adf(
            values, adf_regression, autolag, max_lag, label=label, field_name=field_name
        )
        kpss_level = _run_kpss(values, "c")
        kpss_trend = _run_kpss(values, "ct")
    verdict, reason = _read(adf, kpss_level, kpss_trend, alpha, deterministic=deterministic)
    logger.debug("%s: %s on %d points: %s", label, verdict, n, reason)
    return StationarityReport(
        n_obs=int(n),
        alpha=float(alpha),
        adf=adf,
        kpss_level=kpss_level,
        kpss_trend=kpss_trend,
        verdict=verdict,
        reason=reason,
    )


def check_named(values: npt.ArrayLike, name: str, order: int, alpha: float) -> StationarityReport:
    """`check` on series `name`'s residual differenced `order` times, as the gate runs it: its
    errors name the series and the order (`series 'a' differenced once: too short …`)."""
    return _check_named(
        _as_series(values, label=f"series '{name}'", field_name=name), name, order, alpha
    )


def _check_named(
    values: npt.NDArray[np.float64], name: str, order: int, alpha: float
) -> StationarityReport:
    """`check` on `values` differenced `order` times; errors name the series and the order."""
    label = f"series '{name}'" + (f" differenced {_times(order)}" if order else "")
    differenced = (
        _as_series(np.diff(values, n=order), label=label, field_name=name) if order else values
    )
    return _check_array(differenced, alpha=alpha, label=label, field_name=name)


def _passes(report: StationarityReport, allow_inconclusive: bool) -> bool:
    return report.is_stationary or (allow_inconclusive and report.verdict == "inconclusive")


def _capture_warnings(caught: list[warnings.WarningMessage]) -> str | None:
    """Distinct warning messages, with counts, as one note (None if none)."""
    counts: dict[str, int] = {}
    for item in caught:
        text = f"{item.category.__name__}: {str(item.message).splitlines()[0]}"
        counts[text] = counts.get(text, 0) + 1
    if not counts:
        return None
    return "; ".join(f"{text} (x{k})" if k > 1 else text for text, k in counts.items())


def _run_adf(
    values: npt.NDArray[np.float64],
    regression: Regression,
    autolag: Autolag | None,
    max_lag: int | None,
    *,
    label: str,
    field_name: str | None,
) -> tuple[TestResult, bool]:
    """The ADF result, and whether its regressions were rank-deficient (an exact recurrence)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        statistic, pvalue, lags, n_obs, critical, _ = _adf(values, regression, autolag, max_lag)
    if not (math.isfinite(statistic) and math.isfinite(pvalue)):
        raise DataError(
            f"{label}: the ADF regression is degenerate (statistic {statistic}, "
            f"p-value {pvalue}); the series looks deterministic",
            field=field_name,
        )
    note = _capture_warnings(caught)
    if note is not None:
        logger.debug("ADF(%s) warnings: %s", regression, note)
    deterministic = any(issubclass(w.category, SingularMatrixWarning) for w in caught)
    result = TestResult(
        name="ADF",
        regression=regression,
        statistic=float(statistic),
        pvalue=float(pvalue),
        lags=int(lags),
        n_obs=int(n_obs),
        critical_values={str(k): float(v) for k, v in critical.items()},
        note=note,
    )
    return result, deterministic


_AdfResult = tuple[float, float, int, int, dict[str, float], float | None]


def _adf(
    x: npt.NDArray[np.float64], regression: str, autolag: str | None, max_lag: int | None
) -> _AdfResult:
    """ADF test (Dickey & Fuller 1979; lag order by information criterion as statsmodels'
    adfuller), computed from one QR of the largest design.

    Returns what `adfuller(x, max_lag, regression, autolag)` returns, equal to rounding: statistic,
    MacKinnon p-value, lags used, observations, critical values, and the best information
    criterion (None without `autolag`). The lag search fits every lag 0..max_lag on the common
    sample of the largest lag, as statsmodels' `_autolag` does, but from one Householder QR of
    [design | Δx]: the last column of R holds Qᵀ Δx and the residual norm, so the first k columns
    leave ssr_k = Σ_{j≥k} R[j, -1]² (a sum of squares, no cancellation) and every AIC
    (-2 llf + 2 k; BIC: log(nobs) k) comes at once. The chosen lag is refitted on its own, longer
    sample with the level column last, whose t-value is then R[k-1, k] / R[k-1, k-1] over
    sigma / |R[k-1, k-1]|, sigma² = ssr / (nobs - k). statsmodels itself runs for "t-stat", an
    invalid lag, or an ill-posed regression (`_well_posed`), so results and warnings
    (rank deficiency of a deterministic series) there are its own.
    """
    n = x.shape[0]
    ntrend = 0 if regression == "n" else len(regression)
    method = autolag.lower() if autolag else None
    lag = max_lag
    if lag is None:  # Schwert's rule, as statsmodels writes it
        lag = min(int(np.ceil(12.0 * np.power(n / 100.0, 1 / 4.0))), n // 2 - ntrend - 1)
    if method not in (None, "aic", "bic") or not 0 <= lag <= n // 2 - ntrend - 1:
        return _adfuller(x, regression, autolag, max_lag)
    icbest = None
    if method is not None:
        r = np.linalg.qr(_adf_design(x, lag, ntrend, level_last=False), mode="r")
        nobs, k = n - 1 - lag, r.shape[0] - 1
        if not _well_posed(r):
            return _adfuller(x, regression, autolag, max_lag)
        ssr = np.cumsum(r[::-1, k] ** 2)[::-1][ntrend + 1 : k + 1]  # k = ntrend + 1 + lag
        llf = -nobs / 2.0 * np.log(2 * np.pi) - nobs / 2.0 * np.log(ssr / nobs) - nobs / 2.0
        penalty = 2.0 if method == "aic" else math.log(nobs)
        ic = -2.0 * llf + penalty * np.arange(ntrend + 1, k + 1)
        lag = int(np.argmin(ic))  # the first minimum: ties go to the fewer lags, as statsmodels
        icbest = float(ic[lag])
    r = np.linalg.qr(_adf_design(x, lag, ntrend, level_last=True), mode="r")
    nobs, k = n - 1 - lag, r.shape[0] - 1
    if not _well_posed(r):
        return _adfuller(x, regression, autolag, max_lag)
    sigma = abs(r[k, k]) / math.sqrt(nobs - k)
    statistic = float(r[k - 1, k] / r[k - 1, k - 1] / (sigma / abs(r[k - 1, k - 1])))
    pvalue = float(mackinnonp(statistic, regression=regression, N=1))
    critical = mackinnoncrit(N=1, regression=regression, nobs=nobs)
    levels = {"1%": float(critical[0]), "5%": float(critical[1]), "10%": float(critical[2])}
    return statistic, pvalue, lag, nobs, levels, icbest


def _adf_design(
    x: npt.NDArray[np.float64], lags: int, ntrend: int, *, level_last: bool
) -> npt.NDArray[np.float64]:
    """Rows t = lags+1 .. n-1 of [1, t', x_{t-1}, Δx_{t-1} .. Δx_{t-lags}, Δx_t] (t' = 1, 2, ..
    as statsmodels' `add_trend`; `ntrend` of the first two columns; the level last of the
    regressors if `level_last`)."""
    diff = np.diff(x)
    nobs = diff.shape[0] - lags
    deterministic = [np.ones(nobs), np.arange(1.0, nobs + 1.0)][:ntrend]
    lagged = [diff[lags - j : lags - j + nobs] for j in range(1, lags + 1)]
    level = [x[lags : lags + nobs]]
    columns = [*lagged, *level] if level_last else [*level, *lagged]
    return np.column_stack([*deterministic, *columns, diff[lags:]])


def _well_posed(r: npt.NDArray[np.float64]) -> bool:
    """Whether the fast ADF can stand in for statsmodels, from the R of [design | Δx].

    The design's condition number must be below 1e10, far from where statsmodels' SVD-based OLS
    calls it rank-deficient (~1e14) and warns, and below 1e7 with the columns scaled to unit
    length, where a near-recurrence (a noisy sine) would leave the nested fits' AICs to rounding
    (LAPACK's estimates: 1-norm, within a few times the 2-norm one, 6 µs where an SVD takes 50);
    and the residual must be above 1e-6 of Δx, not an exact fit whose t-value is rounding.
    """
    design = r[:-1, :-1]
    if not dtrcon(design, norm="1", uplo="U", diag="N")[0] > 1e-10:
        return False
    scaled = design / np.linalg.norm(design, axis=0)
    return bool(
        dtrcon(scaled, norm="1", uplo="U", diag="N")[0] > 1e-7
        and abs(r[-1, -1]) > 1e-6 * np.linalg.norm(r[:, -1])
    )


def _adfuller(
    x: npt.NDArray[np.float64], regression: str, autolag: str | None, max_lag: int | None
) -> _AdfResult:
    """statsmodels' `adfuller` itself, in `_adf`'s return shape."""
    out = adfuller(x, maxlag=max_lag, regression=regression, autolag=autolag, **_TUPLE_RESULT)
    return out[0], out[1], out[2], out[3], out[4], out[5] if autolag else None


def _run_kpss(values: npt.NDArray[np.float64], regression: Regression) -> TestResult:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        statistic, pvalue, lags, critical = kpss(
            values, regression=regression, nlags="auto", **_TUPLE_RESULT
        )
    notes: list[str] = []
    bound: Literal["upper", "lower"] | None = None
    clipped = [w for w in caught if issubclass(w.category, InterpolationWarning)]
    if clipped:
        message = str(clipped[0].message)
        smaller = "smaller" in message or ("greater" not in message and pvalue <= 0.01)
        bound = "upper" if smaller else "lower"
        notes.append(
            "p-value is outside the table range; actual p-value is "
            f"{'smaller' if smaller else 'greater'} than {pvalue:g}"
        )
    other = _capture_warnings(
        [w for w in caught if not issubclass(w.category, InterpolationWarning)]
    )
    if other is not None:
        notes.append(other)
    return TestResult(
        name="KPSS",
        regression=regression,
        statistic=float(statistic),
        pvalue=float(pvalue),
        lags=int(lags),
        n_obs=int(values.shape[0]),
        critical_values={str(k): float(v) for k, v in critical.items()},
        note="; ".join(notes) or None,
        pvalue_bound=bound,
    )


def _read(
    adf: TestResult,
    kpss_level: TestResult,
    kpss_trend: TestResult,
    alpha: float,
    *,
    deterministic: bool = False,
) -> tuple[Verdict, str]:
    """The joint reading of ALGORITHMS.md §5.5 and one sentence saying how it was reached."""
    adf_rejects = adf.rejects(alpha)
    level_rejects = kpss_level.rejects(alpha)
    trend_rejects = kpss_trend.rejects(alpha)

    def says(result: TestResult, rejects: bool | None, what: str) -> str:
        label = f"{result.name}({result.regression})"
        if rejects is None:
            return f"{label} cannot be compared with alpha={alpha:g} ({result.format_pvalue()})"
        verb = "rejects" if rejects else "does not reject"
        return f"{label} {verb} {what} ({result.format_pvalue()})"

    evidence = ", ".join(
        [
            says(adf, adf_rejects, "a unit root"),
            says(kpss_level, level_rejects, "level stationarity"),
            says(kpss_trend, trend_rejects, "trend stationarity"),
        ]
    )
    if deterministic:
        # An exact linear recurrence (sine, ramp, alternation) makes every ADF t-statistic
        # meaningless (|t| ~ 1e14); the series is not a stochastic process the tests apply to.
        evidence = f"the ADF regression is rank-deficient (series looks deterministic); {evidence}"
    verdict: Verdict
    if deterministic or level_rejects is None:
        verdict = "inconclusive"
    elif adf_rejects and not level_rejects:
        verdict = "stationary"
    elif not adf_rejects and level_rejects:
        verdict = "difference_stationary"
    elif adf_rejects and level_rejects and trend_rejects is False:
        verdict = "trend_stationary"
    else:
        verdict = "inconclusive"
    return verdict, f"{evidence} → {verdict}"


def _times(order: int) -> str:
    return _ORDINALS.get(order, f"{order} times")


def _order_clause(
    order: int,
    reports: Mapping[str, list[StationarityReport]],
    failing: list[str],
    fraction: float,
    ok: bool,
    config: StationarityConfig,
) -> str:
    """What happened at one differencing order, e.g. '2 of 3 series not stationary at d=0 (…)'."""
    total = len(reports)
    counted = sum(
        config.allow_inconclusive and rs[order].verdict == "inconclusive" for rs in reports.values()
    )
    note = f" ({counted} inconclusive counted as passing)" if counted else ""
    if not failing:
        if order == 0:
            verb = "pass" if counted else "stationary"
            return f"all {total} series {verb} at d=0{note}"
        return f"after differencing {_times(order)} all {total} pass{note}"
    shown = failing[:5]
    details = "; ".join(_failure_detail(name, reports[name][order]) for name in shown)
    if len(failing) > len(shown):
        details += f"; and {len(failing) - len(shown)} more"
    if order == 0:
        clause = f"{len(failing)} of {total} series not stationary at d=0 ({details})"
    else:
        clause = (
            f"after differencing {_times(order)} {len(failing)} of {total} still not stationary "
            f"({details})"
        )
    if config.min_pass_fraction < 1.0:
        sign = "≥" if ok else "<"
        clause += (
            f", pass fraction {fraction:.2f} {sign} min_pass_fraction {config.min_pass_fraction:g}"
        )
    if any(reports[name][order].verdict == "trend_stationary" for name in failing):
        clause += " (trend_stationary: a deterministic trend is left, see preprocess.trend)"
    return clause + note


def _failure_detail(name: str, report: StationarityReport) -> str:
    return (
        f"{name}: {report.verdict}, ADF {report.adf.format_pvalue()}, "
        f"KPSS(c) {report.kpss_level.format_pvalue()}, "
        f"KPSS(ct) {report.kpss_trend.format_pvalue()}"
    )


def _require(data: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    if not isinstance(data, Mapping):
        raise DataError(f"{what}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in keys if key not in data]
    if missing:
        raise DataError(f"{what}: missing key(s) {', '.join(missing)}", field=missing[0])
