"""The shared front of every job: load → validate → split → preprocess → stationarity gate.

`forecaster preprocess`, the demo and the retrain job all start here, so the training window, the
fitted preprocessing and the gate decision are computed one way only (DESIGN.md §1, §4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from forecaster.bundle import PREPROCESSING_FILE, STATIONARITY_FILE
from forecaster.config import Config
from forecaster.data import ID_COL, Split, ValidatedData, load_validated, make_split
from forecaster.errors import DataError
from forecaster.transform import PreprocessingSpec
from pipelines.preprocess import fit_preprocessor, residuals
from pipelines.stationarity import GateDecision, gate, save_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """Validated data, its split, the fitted preprocessing and the gate decision.

    Attributes:
        data: the validated long frame and what validation repaired.
        splits: per series, the chronological train/val/test row slices.
        spec: the fitted preprocessing; when the gate chose feedback after differencing, its
            differencing order already includes the gate's `differences`.
        decision: the stationarity gate's decision over the training residuals of all series.
    """

    data: ValidatedData
    splits: dict[str, Split]
    spec: PreprocessingSpec
    decision: GateDecision

    def train_frame(self) -> pd.DataFrame:
        """The training rows of every series (a new frame)."""
        return _rows_before(self.data.frame, {k: s.train.stop for k, s in self.splits.items()})

    def write(self, out_dir: Path) -> list[Path]:
        """Write `preprocessing.json` and `stationarity.json` atomically into `out_dir`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            self.spec.save(out_dir / PREPROCESSING_FILE),
            save_report(self.decision, out_dir / STATIONARITY_FILE),
        ]

    def summary_rows(self) -> list[tuple[str, ...]]:
        """One row of strings per series: what was fitted and the verdicts before and after."""
        rows = []
        for uid, series in self.spec.series.items():
            reports = self.decision.reports.get(uid, [])
            periods = ",".join(str(p.period) for p in series.seasonality.profiles) or "-"
            rows.append(
                (
                    uid,
                    str(series.n_train),
                    f"{series.trend.slope:+.3g}",
                    periods,
                    f"{series.scaling.scale:.3g}",
                    reports[0].verdict if reports else "-",
                    f"{reports[-1].verdict} (d={len(reports) - 1})" if reports else "-",
                )
            )
        return rows


def _rows_before(frame: pd.DataFrame, stops: dict[str, int]) -> pd.DataFrame:
    position = frame.groupby(ID_COL, sort=False).cumcount().to_numpy()
    limit = frame[ID_COL].map(stops).to_numpy()
    return frame.loc[position < limit].reset_index(drop=True)


def _differenced(values: npt.NDArray[np.float64], order: int) -> npt.NDArray[np.float64]:
    return np.diff(values, n=order) if order else values


def prepare(config: Config, *, data_path: Path | None = None) -> PreparedData:
    """Run the front of the pipeline for a config.

    Args:
        config: the job's config.
        data_path: read this file instead of `config.data.path` (same layout and columns).

    Raises:
        DataError: the data violates the contract or is too short for the split.
    """
    data_config = config.data
    if data_path is not None:
        data_config = data_config.model_copy(update={"source": "file", "path": data_path})
    data = load_validated(data_config, config.window)
    splits = {
        uid: make_split(data_config.split, length=rows, lookback=config.window.lookback)
        for uid, rows in data.rows_per_series.items()
    }
    train_rows = {uid: split.train.stop for uid, split in splits.items()}
    if config.execution == "local":
        spec, decision = _preprocess_and_gate(data.frame, config, train_rows)
    else:  # the same stages, one series per task (pipelines/executor.py)
        from pipelines.executor import preprocess_and_gate, split_series

        spec, decision = preprocess_and_gate(
            split_series(data.frame),
            config.preprocess,
            config.stationarity,
            train_rows=train_rows,
            execution=config.execution,
            workers=config.workers,
        )
    logger.info("gate: %s (d=%d): %s", decision.method, decision.differences, decision.reason)
    differences = {uid: spec.for_series(uid).difference for uid in splits}
    check_windows_fit(splits, data.rows_per_series, differences, config.window.horizon)
    return PreparedData(data=data, splits=splits, spec=spec, decision=decision)


_PART_FIELDS = {"train": "data.split", "val": "data.split.val_size", "test": "data.split.test_size"}


def check_windows_fit(
    splits: dict[str, Split], rows: dict[str, int], differences: dict[str, int], horizon: int
) -> None:
    """Refuse, before any training, a split whose parts cannot hold one window of
    `lookback + horizon` rows: every series' validation and test parts (each series is scored),
    and the training part of at least one series (training skips a series without windows, as
    `ForkingWindows` does). A differenced series' model input starts `d` rows in.

    Raises:
        DataError: naming the part, its rows, the config keys to change, and every series short.
    """
    short: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for uid, split in splits.items():
        for part in short:
            part_rows: slice = getattr(split, part)
            first = max(part_rows.start, differences.get(uid, 0))
            usable = max(0, min(part_rows.stop, rows[uid]) - first)
            if usable < split.lookback + horizon:
                short[part].append(f"series '{uid}': the {part} part has {usable} usable rows")
    if len(short["train"]) < len(splits):
        short["train"] = []  # some series trains: the others are skipped, as in ForkingWindows
    for part, problems in short.items():
        if problems:
            lookback = next(iter(splits.values())).lookback
            more = f" (and {len(problems) - 1} more series)" if len(problems) > 1 else ""
            raise DataError(
                f"{problems[0]}{more}, fewer than window.lookback {lookback} + window.horizon "
                f"{horizon} for one window: lower window.lookback or window.horizon, or give "
                f"the part more rows ({_PART_FIELDS[part]})",
                field=_PART_FIELDS[part],
                problems=problems,
            )


def _preprocess_and_gate(
    frame: pd.DataFrame, config: Config, train_rows: dict[str, int]
) -> tuple[PreprocessingSpec, GateDecision]:
    """Fit the preprocessing on the training rows, gate the residuals, refit after a remedy."""
    spec = fit_preprocessor(frame, config.preprocess, train_rows=train_rows)
    train = _rows_before(frame, train_rows)
    order = config.preprocess.difference
    tested = {uid: _differenced(r, order) for uid, r in residuals(spec, train).items()}
    decision = gate(tested, config.stationarity)
    if decision.method == "feedback" and decision.differences:
        # The scale is fitted on the differenced residual, so the remedy means a refit.
        remedied = config.preprocess.model_copy(update={"difference": order + decision.differences})
        spec = fit_preprocessor(frame, remedied, train_rows=train_rows)
    return spec, decision
