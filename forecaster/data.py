"""Data layer: long/wide loaders, validation, the synthetic plant generator, chronological splits.

The internal format is a long frame (the Nixtla convention, DESIGN.md §3): `unique_id` (str),
`ds` (datetime64[ns], either time-zone naive or aware, never mixed), `y` (float64), plus optional
covariate columns.

Row numbers in messages are 0-based data rows of the input, header excluded: for a frame built
in code that is its position (`df.iloc[row]`); the loaders keep the file's data row as the frame's
index (for a wide file, the row of the wide file, repeated for each sensor) and `validate` reports
an integer index as the row, so `row 5` is the sixth line under the header of the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pandas.tseries.frequencies import to_offset

from forecaster.errors import DataError

if TYPE_CHECKING:
    from forecaster.config import DataConfig, SplitConfig, WindowConfig

__all__ = [
    "ANOMALY_KINDS",
    "ID_COL",
    "TARGET_COL",
    "TIME_COL",
    "TIME_COLUMN_CANDIDATES",
    "EttSplit",
    "PlantData",
    "Split",
    "SplitFrames",
    "ValidatedData",
    "detect_time_column",
    "ett_split",
    "generate_plant",
    "holdout_split",
    "load_data",
    "load_validated",
    "make_split",
    "read_long",
    "read_wide",
    "seasonal_periods",
    "split_frame",
    "validate",
]

logger = logging.getLogger(__name__)

ID_COL = "unique_id"
TIME_COL = "ds"
TARGET_COL = "y"
TIME_COLUMN_CANDIDATES = ("ds", "date", "timestamp", "time", "datetime")
ANOMALY_KINDS = ("spike", "dip", "drift", "level_shift")

# Per kind of row problem, how many are spelled out; the rest are counted in one summary line so a
# file of a million bad rows still yields a readable report.
_MAX_LISTED = 1000
_MAX_NAMED_SERIES = 5
_NS_PER_DAY = 86_400_000_000_000

# ---------------------------------------------------------------------------------------------
# Frequencies


def _fixed_step(freq: str) -> tuple[int, str]:
    """The step of `freq` in nanoseconds and its canonical alias; fixed steps only."""
    try:
        offset = to_offset(freq)
    except ValueError as exc:
        hint = re.search(r"Did you mean [^?]+\?", str(exc))
        raise DataError(
            f"freq '{freq}' is not a pandas offset alias" + (f" ({hint.group(0)})" if hint else ""),
            field="freq",
        ) from None
    if isinstance(offset, pd.offsets.Week):
        step = pd.Timedelta(weeks=offset.n)
    else:
        try:
            step = pd.Timedelta(offset)
        except (TypeError, ValueError):
            raise DataError(
                f"freq '{freq}' is a calendar frequency; only fixed steps are supported "
                "(e.g. s, min, h, D, W)",
                field="freq",
            ) from None
    if step <= pd.Timedelta(0):
        raise DataError(f"freq '{freq}' must be a positive step", field="freq")
    return int(step.value), offset.freqstr


def _freq_alias(step_ns: int) -> str:
    """Pandas offset alias of a fixed step: 'h', '15min', 'D', '7D'."""
    if step_ns % _NS_PER_DAY == 0:
        days = step_ns // _NS_PER_DAY
        return "D" if days == 1 else f"{days}D"
    return str(to_offset(pd.Timedelta(step_ns, unit="ns")).freqstr)


def seasonal_periods(freq: str) -> tuple[int, ...]:
    """Daily and weekly periods in steps of `freq`: 'h' -> (24, 168), '15min' -> (96, 672).

    A period is kept only when it is a whole number of steps and at least 2 ('D' -> (7,)).
    """
    step_ns, _ = _fixed_step(freq)
    periods = []
    for span in (_NS_PER_DAY, 7 * _NS_PER_DAY):
        if span % step_ns == 0 and span // step_ns >= 2:
            periods.append(span // step_ns)
    return tuple(periods)


# ---------------------------------------------------------------------------------------------
# Timestamps


def _format_ts(ns: int, tz: tzinfo | None) -> str:
    stamp = pd.Timestamp(int(ns), unit="ns")
    if tz is not None:
        stamp = stamp.tz_localize("UTC").tz_convert(tz)
    return str(stamp)


_TS_OK, _TS_MISSING, _TS_UNPARSABLE, _TS_MIXED_TZ = 0, 1, 2, 3


def _parse_timestamps(values: pd.Series) -> tuple[pd.Series, npt.NDArray[np.int8], list[str]]:
    """Parse to datetime64[ns] (naive or tz-aware); also return a per-row status and notes.

    Unparsable or missing values come back as NaT with a status explaining why.
    """
    notes: list[str] = []
    status = np.zeros(len(values), dtype=np.int8)
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
        parsed = values.dt.as_unit("ns")
        status[parsed.isna().to_numpy()] = _TS_MISSING
        return parsed, status, notes
    missing = values.isna().to_numpy()
    try:
        parsed = pd.to_datetime(values, errors="coerce")
    except ValueError:  # several UTC offsets in one column
        parsed = pd.to_datetime(values, errors="coerce", utc=True)
        notes.append(
            f"timestamps with several UTC offsets in column '{values.name}' converted to UTC"
        )
    parsed = parsed.dt.as_unit("ns")
    failed = parsed.isna().to_numpy() & ~missing
    if failed.any():
        # The format is inferred from the first value; retry the rest one by one (slow, but rare).
        retry: pd.Series | None
        try:
            retry = pd.to_datetime(values[failed], errors="coerce", format="mixed")
        except ValueError:
            retry = None
        if retry is not None and str(retry.dt.as_unit("ns").dtype) == str(parsed.dtype):
            parsed = parsed.copy()
            parsed[failed] = retry.dt.as_unit("ns").to_numpy()
            still = retry.isna().to_numpy()
            status[np.flatnonzero(failed)[still]] = _TS_UNPARSABLE
        elif retry is not None:
            good = retry.notna().to_numpy()
            status[np.flatnonzero(failed)[good]] = _TS_MIXED_TZ
            status[np.flatnonzero(failed)[~good]] = _TS_UNPARSABLE
        else:
            status[failed] = _TS_UNPARSABLE
    status[missing] = _TS_MISSING
    return parsed, status, notes


def detect_time_column(columns: Iterable[object]) -> str:
    """The time column among `columns`: the first of ds, date, timestamp, time, datetime.

    Matching is case-insensitive; the column's own spelling is returned.

    Raises:
        DataError: none of the candidates is present (the message lists the columns).
    """
    names = [str(c) for c in columns]
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    for candidate in TIME_COLUMN_CANDIDATES:
        if candidate in by_lower:
            return by_lower[candidate]
    raise DataError(
        f"no time column found among columns {', '.join(repr(n) for n in names)}; expected one "
        f"of {', '.join(TIME_COLUMN_CANDIDATES)} (case-insensitive) or pass time_col",
        field="time_col",
    )


# ---------------------------------------------------------------------------------------------
# Loaders


def _read_table(path: Path, *, str_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read CSV or Parquet by suffix, with the file's data rows as a 0-based RangeIndex."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}", field="path")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes[-1:] == [".csv"] or suffixes[-2:-1] == [".csv"]:
            frame = pd.read_csv(path, dtype=dict.fromkeys(str_columns, "str"))
        elif suffixes[-1:] in ([".parquet"], [".pq"]):
            frame = pd.read_parquet(path)
        else:
            raise DataError(
                f"unsupported file type '{path.suffix}' for {path}: use .csv or .parquet",
                field="path",
            )
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}", field="path") from exc
    frame.columns = [str(c) for c in frame.columns]
    return frame.reset_index(drop=True)


def _require_column(name: str, columns: Sequence[str], what: str, path: Path) -> None:
    if name not in columns:
        raise DataError(
            f"{path}: unknown {what} '{name}'; available columns: "
            + ", ".join(repr(c) for c in columns),
            field=what.replace(" ", "_"),
        )


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Parse `ds` and make `y` float64 where every value allows it.

    Otherwise the column is left as read, so that `validate` can name each bad row and value.
    """
    parsed, status, _ = _parse_timestamps(frame[TIME_COL])
    if (status == _TS_OK).all():
        frame[TIME_COL] = parsed
    if pd.api.types.is_numeric_dtype(frame[TARGET_COL]) and not pd.api.types.is_bool_dtype(
        frame[TARGET_COL]
    ):
        frame[TARGET_COL] = frame[TARGET_COL].astype(np.float64)
    return frame


def read_long(
    path: str | Path,
    *,
    time_col: str | None = None,
    id_col: str = ID_COL,
    target_col: str = TARGET_COL,
) -> pd.DataFrame:
    """Read a long CSV/Parquet file into the long format `unique_id, ds, y, covariates…`.

    A file without the id column (e.g. NAB's `timestamp,value`) is one series named after the file
    stem; its target is `target_col` or else the only non-time column (or the only numeric one).
    The index is the file's 0-based data row. `ds` is parsed unless some values cannot be, in which
    case it is left as text for `validate` to report row by row.

    Raises:
        DataError: missing or unsupported file, unknown column, no detectable time or target column.
    """
    path = Path(path)
    raw = _read_table(path, str_columns=[id_col])
    columns = list(raw.columns)
    if time_col is None:
        time_col = detect_time_column(columns)
    _require_column(time_col, columns, "time column", path)
    if id_col not in columns and id_col != ID_COL:
        _require_column(id_col, columns, "id column", path)
    has_id = id_col in columns
    if target_col not in columns:
        if target_col != TARGET_COL:
            _require_column(target_col, columns, "target column", path)
        others = [c for c in columns if c not in (time_col, id_col)]
        numeric = [c for c in others if pd.api.types.is_numeric_dtype(raw[c])]
        if len(others) == 1:
            target_col = others[0]
        elif len(numeric) == 1:
            target_col = numeric[0]
        else:
            raise DataError(
                f"{path}: no column '{TARGET_COL}' and the target is ambiguous among "
                + ", ".join(repr(c) for c in others)
                + "; pass target_col",
                field="target_col",
            )
    renames = {time_col: TIME_COL, target_col: TARGET_COL}
    if has_id:
        renames[id_col] = ID_COL
    for source, target in renames.items():
        if source != target and target in columns:
            raise DataError(
                f"{path}: column '{source}' would become '{target}', which already exists; "
                f"pass the column to use as {target} explicitly",
                field=target,
            )
    frame = raw.rename(columns=renames)
    if not has_id:
        frame[ID_COL] = path.stem
    frame[ID_COL] = frame[ID_COL].astype("str")
    covariates = [c for c in frame.columns if c not in (ID_COL, TIME_COL, TARGET_COL)]
    frame = _typed(frame[[ID_COL, TIME_COL, TARGET_COL, *covariates]].copy())
    logger.debug("read %d rows (%d series) from %s", len(frame), frame[ID_COL].nunique(), path)
    return frame


def read_wide(
    path: str | Path,
    *,
    time_col: str | None = None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Read a wide CSV/Parquet file (one time column, one column per sensor, as ETT) as long.

    Each selected column becomes a series whose `unique_id` is the column name, in the order given
    (default: every non-time column in file order). The index is the wide file's 0-based data row.

    Raises:
        DataError: missing or unsupported file, unknown column (the message lists the others).
    """
    path = Path(path)
    raw = _read_table(path)
    available = list(raw.columns)
    if time_col is None:
        time_col = detect_time_column(available)
    _require_column(time_col, available, "time column", path)
    if columns is None:
        columns = [c for c in available if c != time_col]
    else:
        unknown = [c for c in columns if c not in available or c == time_col]
        if unknown:
            raise DataError(
                f"{path}: unknown column{'s' if len(unknown) > 1 else ''} "
                + ", ".join(repr(c) for c in unknown)
                + "; available series columns: "
                + ", ".join(repr(c) for c in available if c != time_col),
                field="columns",
            )
    if not columns:
        raise DataError(f"{path}: no series columns besides the time column", field="columns")
    frame = raw.melt(
        id_vars=[time_col],
        value_vars=columns,
        var_name=ID_COL,
        value_name=TARGET_COL,
        ignore_index=False,
    ).rename(columns={time_col: TIME_COL})
    frame[ID_COL] = frame[ID_COL].astype("str")
    frame = _typed(frame[[ID_COL, TIME_COL, TARGET_COL]].copy())
    logger.debug("read %d rows x %d series from %s", len(raw), len(columns), path)
    return frame


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class ValidatedData:
    """A validated, regular long frame and what validation found.

    Attributes:
        frame: a new frame `unique_id, ds, y, covariates…`, series in order of first appearance,
            each sorted by `ds` on a regular grid, with a fresh RangeIndex.
        freq: pandas offset alias shared by every series ('h', '15min', 'D').
        warnings: what was repaired under the configured policies (sorting, interpolated gaps).
        n_series: number of series.
        rows_per_series: rows per series after regularisation.
    """

    frame: pd.DataFrame
    freq: str
    warnings: list[str]
    n_series: int
    rows_per_series: dict[str, int]


@dataclass
class _Problems:
    """Problems found so far: (field, message), plus how many were counted but not listed."""

    items: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0

    def add(self, field_name: str, message: str) -> None:
        self.items.append((field_name, message))
        self.total += 1

    def add_rows(
        self,
        field_name: str,
        indices: npt.NDArray[np.intp],
        message: Callable[[int], str],
        what: str,
    ) -> None:
        """One message per index, the first `_MAX_LISTED` spelled out and the rest summarised."""
        for i in indices[:_MAX_LISTED]:
            self.items.append((field_name, message(int(i))))
        if len(indices) > _MAX_LISTED:
            self.items.append(
                (field_name, f"… {len(indices) - _MAX_LISTED} more rows where {what}, not listed")
            )
        self.total += len(indices)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first_field, first = self.items[0]
        more = f" (and {self.total - 1} more)" if self.total > 1 else ""
        raise DataError(
            first + more, field=first_field, problems=[message for _, message in self.items]
        )


def _row_labels(df: pd.DataFrame) -> npt.NDArray[np.int64]:
    """Row numbers used in messages: an integer index (as the loaders set), else the position."""
    if pd.api.types.is_integer_dtype(df.index.dtype):
        return df.index.to_numpy(dtype=np.int64)
    return np.arange(len(df), dtype=np.int64)


def _mode_per_group(
    codes: npt.NDArray[np.intp], values: npt.NDArray[np.int64], n_groups: int
) -> npt.NDArray[np.int64]:
    """The most frequent value per group code (ties: the smallest); -1 for groups with none."""
    out = np.full(n_groups, -1, dtype=np.int64)
    if len(codes) == 0:
        return out
    order = np.lexsort((values, codes))
    c, v = codes[order], values[order]
    starts = np.flatnonzero(np.r_[True, (c[1:] != c[:-1]) | (v[1:] != v[:-1])])
    counts = np.diff(np.r_[starts, len(c)])
    run_codes, run_values = c[starts], v[starts]
    best = np.lexsort((run_values, -counts, run_codes))
    first = np.r_[True, run_codes[best][1:] != run_codes[best][:-1]]
    out[run_codes[best][first]] = run_values[best][first]
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _series_list(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_MAX_NAMED_SERIES])
    extra = len(names) - _MAX_NAMED_SERIES
    return shown + (f" and {extra} more" if extra > 0 else "")


def validate(
    df: pd.DataFrame,
    *,
    freq: str | None = None,
    min_length: int = 1,
    min_length_reason: str | None = None,
    gap_policy: Literal["refuse", "interpolate"] = "refuse",
    max_gap: int = 3,
    unsorted: Literal["sort", "refuse"] = "sort",
) -> ValidatedData:
    """Check a long frame against the data contract and return a new, regular, sorted copy.

    Every problem is collected and reported with its series, row and value: missing columns,
    missing ids, unparsable or missing timestamps, non-numeric / NaN / inf `y`, duplicate
    timestamps, unsorted rows (under `unsorted="refuse"`), series with different steps, timestamps
    off the series' grid, gaps (missing steps) not allowed by the gap policy, series shorter than
    `min_length`, constant series. Rows are the 0-based data rows of the input, header excluded: the
    frame's integer index when it has one (the loaders set it to the file's data row), otherwise the
    position. Covariate columns are carried along (interpolated if numeric, else forward-filled
    into filled gaps) but not checked. The caller's frame is never modified.

    Args:
        df: long frame with `unique_id`, `ds`, `y` and optional covariates.
        freq: pandas offset alias of a fixed step ('h', '15min'); inferred when None as the modal
            step of each series, which must agree across series.
        min_length: fewest rows a series needs after regularisation.
        min_length_reason: why, shown in the message, e.g. "lookback 336 + horizon 96".
        gap_policy: "refuse" any missing step, or "interpolate" runs of up to `max_gap` missing
            steps linearly (longer runs are still refused).
        max_gap: longest run of missing steps that "interpolate" fills.
        unsorted: "sort" (with a warning) or "refuse" series whose rows are out of time order.

    Returns:
        The validated frame, its frequency, warnings and per-series row counts.

    Raises:
        DataError: the first problem plus "(and N more)"; `.problems` lists them all.
    """
    if gap_policy not in ("refuse", "interpolate"):
        raise ValueError(f"gap_policy must be 'refuse' or 'interpolate', got {gap_policy!r}")
    if unsorted not in ("sort", "refuse"):
        raise ValueError(f"unsorted must be 'sort' or 'refuse', got {unsorted!r}")
    if max_gap < 1 or min_length < 1:
        raise ValueError(f"max_gap and min_length must be >= 1, got {max_gap} and {min_length}")
    missing_cols = [c for c in (ID_COL, TIME_COL, TARGET_COL) if c not in df.columns]
    if missing_cols:
        raise DataError(
            f"missing required column{'s' if len(missing_cols) > 1 else ''} "
            + ", ".join(repr(c) for c in missing_cols)
            + f"; found {', '.join(repr(str(c)) for c in df.columns)}; "
            f"the long format needs {ID_COL}, {TIME_COL}, {TARGET_COL}",
            field=missing_cols[0],
        )
    if len(df) == 0:
        raise DataError("the data has no rows", field=TARGET_COL)
    if pd.api.types.is_numeric_dtype(df[TIME_COL]) and not pd.api.types.is_bool_dtype(df[TIME_COL]):
        raise DataError(
            f"column '{TIME_COL}' holds numbers ({df[TIME_COL].dtype}), not timestamps; convert "
            "epoch values first, e.g. pd.to_datetime(values, unit='s')",
            field=TIME_COL,
        )
    step_given = _fixed_step(freq) if freq is not None else None
    rows = _row_labels(df)
    problems = _Problems()
    warnings: list[str] = []

    # -- ids
    ids = df[ID_COL]
    id_missing = ids.isna().to_numpy()
    codes, uniques = pd.factorize(ids.astype("str").where(~id_missing), sort=False)
    names = [str(u) for u in uniques]
    n_codes = len(names)
    problems.add_rows(
        ID_COL,
        np.flatnonzero(id_missing),
        lambda i: f"row {rows[i]}: {ID_COL} is missing",
        f"{ID_COL} is missing",
    )

    def where(i: int) -> str:
        return f"series '{names[codes[i]]}', row {rows[i]}"

    # -- timestamps
    parsed, ts_status, notes = _parse_timestamps(df[TIME_COL])
    warnings.extend(notes)
    tz = getattr(parsed.dt, "tz", None)
    ds_ns = pd.DatetimeIndex(parsed).asi8
    raw_ds = df[TIME_COL].to_numpy()
    checks = (
        (_TS_MISSING, "timestamp is missing", "the timestamp is missing"),
        (_TS_UNPARSABLE, "timestamp {!r} cannot be parsed", "the timestamp cannot be parsed"),
        (
            _TS_MIXED_TZ,
            "timestamp {!r} has a time zone unlike the rest of the column",
            "the time zone differs",
        ),
    )
    for code, template, what in checks:
        bad = np.flatnonzero((ts_status == code) & ~id_missing)
        problems.add_rows(
            TIME_COL, bad, lambda i, t=template: f"{where(i)}: {t.format(str(raw_ds[i]))}", what
        )

    # -- values
    raw_y = df[TARGET_COL]
    if pd.api.types.is_bool_dtype(raw_y):
        raw_y = raw_y.astype("float64")
    y = pd.to_numeric(raw_y, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    y_missing = raw_y.isna().to_numpy()
    not_numeric = np.flatnonzero(np.isnan(y) & ~y_missing & ~id_missing)
    raw_y_values = raw_y.to_numpy()
    problems.add_rows(
        TARGET_COL,
        not_numeric,
        lambda i: f"{where(i)}: {TARGET_COL} value {str(raw_y_values[i])!r} is not numeric",
        f"{TARGET_COL} is not numeric",
    )
    problems.add_rows(
        TARGET_COL,
        np.flatnonzero(y_missing & ~id_missing),
        lambda i: f"{where(i)}: {TARGET_COL} is NaN (missing)",
        f"{TARGET_COL} is NaN",
    )
    problems.add_rows(
        TARGET_COL,
        np.flatnonzero(np.isinf(y) & ~id_missing),
        lambda i: f"{where(i)}: {TARGET_COL} is {y[i]}",
        f"{TARGET_COL} is infinite",
    )

    # -- order and duplicates, over rows with an id and a timestamp
    positions = np.flatnonzero(~id_missing & (ts_status == _TS_OK))
    c, t = codes[positions], ds_ns[positions]
    by_series = None if np.all(c[1:] >= c[:-1]) else np.argsort(c, kind="stable")
    cg = c if by_series is None else c[by_series]
    tg = t if by_series is None else t[by_series]
    back = np.flatnonzero((cg[1:] == cg[:-1]) & (tg[1:] < tg[:-1])) + 1
    if len(back):
        grouped_pos = positions if by_series is None else positions[by_series]
        series_of_back, first_idx = np.unique(cg[back], return_index=True)
        counts = np.bincount(cg[back], minlength=n_codes)
        firsts = back[first_idx]
        if unsorted == "refuse":
            for j in firsts:
                p, prev = grouped_pos[j], grouped_pos[j - 1]
                problems.add(
                    TIME_COL,
                    f"{where(p)}: timestamp {_format_ts(ds_ns[p], tz)} is out of order: it "
                    f"follows {_format_ts(ds_ns[prev], tz)} at row {rows[prev]} "
                    f"({counts[codes[p]]} such row(s) in the series; unsorted policy 'refuse')",
                )
        else:
            detail = [
                f"'{names[s]}' (first at row {rows[grouped_pos[j]]})"
                for s, j in zip(series_of_back[:_MAX_NAMED_SERIES], firsts, strict=False)
            ]
            extra = len(firsts) - _MAX_NAMED_SERIES
            warnings.append(
                f"{len(firsts)} series not sorted by {TIME_COL}, now sorted: "
                + ", ".join(detail)
                + (f" and {extra} more" if extra > 0 else "")
            )
        order = np.lexsort((tg, cg))  # stable: duplicates keep their input order
        by_series = order if by_series is None else by_series[order]
    c = c if by_series is None else c[by_series]
    t = t if by_series is None else t[by_series]
    positions = positions if by_series is None else positions[by_series]

    same = np.r_[False, c[1:] == c[:-1]]
    duplicate = same & np.r_[False, t[1:] == t[:-1]]
    if duplicate.any():
        run_start = np.maximum.accumulate(np.where(duplicate, 0, np.arange(len(t))))
        dup_idx = np.flatnonzero(duplicate)
        problems.add_rows(
            TIME_COL,
            dup_idx,
            lambda j: (
                f"{where(positions[j])}: timestamp {_format_ts(t[j], tz)} is duplicated "
                f"(first at row {rows[positions[run_start[j]]]})"
            ),
            "the timestamp is duplicated",
        )
        keep = ~duplicate
        c, t, positions = c[keep], t[keep], positions[keep]
        same = np.r_[False, c[1:] == c[:-1]]

    # -- frequency
    diffs = np.r_[0, t[1:] - t[:-1]]
    if step_given is not None:
        step, alias = step_given
    else:
        modal = _mode_per_group(c[same], diffs[same], n_codes)
        present = modal[modal > 0]
        if len(present) == 0:
            problems.add(
                TIME_COL,
                "cannot infer the frequency: no series has two valid timestamps; pass freq",
            )
            problems.raise_if_any()
        steps, step_counts = np.unique(present, return_counts=True)
        step = int(steps[np.argmax(step_counts)])
        alias = _freq_alias(step)
        odd = (modal > 0) & (modal != step)
        for s in np.flatnonzero(odd):
            problems.add(
                TIME_COL,
                f"series '{names[s]}': its step is {_freq_alias(int(modal[s]))} but most series "
                f"step {alias}; all series must share one frequency (or pass freq)",
            )
        if odd.any():  # their grid and gaps would only repeat the same problem row by row
            kept = ~odd[c]
            c, t, positions = c[kept], t[kept], positions[kept]
            same = np.r_[False, c[1:] == c[:-1]]

    # -- grid: every timestamp on the series' modal phase, then gaps between neighbours
    phase = t % step
    modal_phase = _mode_per_group(c, phase, n_codes)
    off_grid = phase != modal_phase[c]
    problems.add_rows(
        TIME_COL,
        np.flatnonzero(off_grid),
        lambda j: (
            f"{where(positions[j])}: timestamp {_format_ts(t[j], tz)} is off the "
            f"series' {alias} grid"
        ),
        "the timestamp is off the grid",
    )
    if off_grid.any():
        on = ~off_grid
        c, t, positions = c[on], t[on], positions[on]
        same = np.r_[False, c[1:] == c[:-1]]
    n_missing = np.where(same, np.r_[0, (t[1:] - t[:-1]) // step - 1], 0)
    gap_idx = np.flatnonzero(n_missing > 0)
    too_long = gap_idx if gap_policy == "refuse" else gap_idx[n_missing[gap_idx] > max_gap]
    policy_text = (
        "gap policy 'refuse'"
        if gap_policy == "refuse"
        else f"more than max_gap {max_gap} under gap policy 'interpolate'"
    )
    problems.add_rows(
        TIME_COL,
        too_long,
        lambda j: (
            f"{where(positions[j])}: {_plural(int(n_missing[j]), 'missing step')} of {alias} "
            "between "
            f"{_format_ts(t[j - 1], tz)} and {_format_ts(t[j], tz)} ({policy_text})"
        ),
        "steps are missing",
    )
    filled = np.where(n_missing <= max_gap, n_missing, 0) if gap_policy == "interpolate" else None
    if filled is not None and filled.any():
        gaps_per_series = np.bincount(c[filled > 0], minlength=n_codes)
        filled_series = np.flatnonzero(gaps_per_series)
        warnings.append(
            f"interpolated {_plural(int(filled.sum()), 'missing step')} in "
            f"{_plural(int((filled > 0).sum()), 'gap')} (at most {max_gap} each) in "
            f"{len(filled_series)} series: " + _series_list([names[s] for s in filled_series])
        )

    # -- per-series length and constant values
    extra_rows = filled if filled is not None else np.zeros_like(n_missing)
    lengths = np.bincount(c, minlength=n_codes) + np.bincount(
        c, weights=extra_rows, minlength=n_codes
    ).astype(np.int64)
    reason = f" ({min_length_reason})" if min_length_reason else ""
    for s in np.flatnonzero((lengths > 0) & (lengths < min_length)):
        problems.add(
            TARGET_COL,
            f"series '{names[s]}' has {_plural(int(lengths[s]), 'point')}; "
            f"needs at least {min_length}{reason}",
        )
    y_rows = y[positions]
    finite = np.isfinite(y_rows)
    y_max = np.full(n_codes, -np.inf)
    y_min = np.full(n_codes, np.inf)
    np.maximum.at(y_max, c[finite], y_rows[finite])
    np.minimum.at(y_min, c[finite], y_rows[finite])
    n_finite = np.bincount(c[finite], minlength=n_codes)
    for s in np.flatnonzero((n_finite >= 2) & (y_max == y_min)):
        problems.add(
            TARGET_COL,
            f"series '{names[s]}' is constant: all {n_finite[s]} values of {TARGET_COL} "
            f"are {y_max[s]:g}",
        )
    problems.raise_if_any()

    frame = _regular_frame(df, c, t, positions, y_rows, extra_rows, step, names, tz)
    counts_out = np.bincount(c, minlength=n_codes) + np.bincount(
        c, weights=extra_rows, minlength=n_codes
    ).astype(np.int64)
    rows_per_series = {names[s]: int(counts_out[s]) for s in range(n_codes)}
    logger.debug(
        "validated %d rows -> %d series at %s, %d warnings", len(df), n_codes, alias, len(warnings)
    )
    return ValidatedData(
        frame=frame,
        freq=alias,
        warnings=warnings,
        n_series=n_codes,
        rows_per_series=rows_per_series,
    )


def _regular_frame(
    df: pd.DataFrame,
    codes: npt.NDArray[np.intp],
    ds_ns: npt.NDArray[np.int64],
    positions: npt.NDArray[np.intp],
    y: npt.NDArray[np.float64],
    filled: npt.NDArray[np.int64],
    step: int,
    names: list[str],
    tz: tzinfo | None,
) -> pd.DataFrame:
    """Build the output frame from the sorted, unique, on-grid rows, filling allowed gaps."""
    covariates = [c for c in df.columns if c not in (ID_COL, TIME_COL, TARGET_COL)]
    known = np.arange(len(codes)) + np.cumsum(filled)  # output position of every input row
    total = len(codes) + int(filled.sum())
    if total == len(codes):
        out_codes, out_ns, out_y = codes, ds_ns, y
        take = np.arange(len(codes))
    else:
        take = np.searchsorted(known, np.arange(total), side="right") - 1  # previous known row
        out_codes = codes[take]
        out_ns = ds_ns[take] + (np.arange(total) - known[take]) * step
        out_y = np.interp(np.arange(total), known, y)
    stamps = pd.Series(out_ns.astype("datetime64[ns]"))
    if tz is not None:
        stamps = stamps.dt.tz_localize("UTC").dt.tz_convert(tz)
    frame = pd.DataFrame(
        {
            ID_COL: pd.Series(names, dtype="str").take(out_codes).reset_index(drop=True),
            TIME_COL: stamps,
            TARGET_COL: out_y.astype(np.float64),
        }
    )
    for name in covariates:
        values = df[name].iloc[positions].reset_index(drop=True)
        if total != len(codes):
            if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
                values = pd.Series(
                    np.interp(np.arange(total), known, values.to_numpy(dtype=np.float64))
                )
            else:
                values = values.iloc[take].reset_index(drop=True)
        frame[name] = values
    return frame


# ---------------------------------------------------------------------------------------------
# Synthetic plant


@dataclass(frozen=True)
class _Sensor:
    """Ranges the generator draws a sensor's parameters from (units of the sensor)."""

    kind: str
    level: tuple[float, float]
    daily_amplitude: tuple[float, float]
    weekly_amplitude: tuple[float, float]
    trend_per_day: tuple[float, float]
    noise_sd: tuple[float, float]


_SENSORS = (
    _Sensor("temperature_degC", (55.0, 80.0), (2.0, 5.0), (0.5, 2.0), (-0.05, 0.05), (0.3, 0.6)),
    _Sensor("pressure_bar", (4.0, 8.0), (0.1, 0.3), (0.05, 0.15), (-0.003, 0.003), (0.02, 0.05)),
    _Sensor("flow_m3h", (120.0, 220.0), (10.0, 25.0), (5.0, 15.0), (-0.3, 0.3), (2.0, 5.0)),
)


@dataclass(frozen=True)
class PlantData:
    """Synthetic plant series and the labels of what was injected into them.

    Attributes:
        frame: long frame `unique_id, ds, y`.
        anomalies: long frame `unique_id, ds, kind`, one row per anomalous timestamp; kind is one
            of `ANOMALY_KINDS` (a drift labels every row it covers, a level shift its first row).
        freq: the pandas offset alias of the series.
        periods: the daily and weekly periods in steps (see `seasonal_periods`).
    """

    frame: pd.DataFrame
    anomalies: pd.DataFrame
    freq: str
    periods: tuple[int, ...]

    def labels(self, frame: pd.DataFrame | None = None) -> npt.NDArray[np.bool_]:
        """Whether each row of `frame` (default: `self.frame`) is a labelled anomaly."""
        frame = self.frame if frame is None else frame
        keys = pd.MultiIndex.from_frame(frame[[ID_COL, TIME_COL]])
        labelled = pd.MultiIndex.from_frame(self.anomalies[[ID_COL, TIME_COL]])
        return np.asarray(keys.isin(labelled), dtype=bool)


def _ar1(innovations: npt.NDArray[np.float64], phi: float, start: float) -> npt.NDArray[np.float64]:
    """x_t = phi x_{t-1} + u_t with x_{-1} = start, as a log-depth prefix scan (no Python loop)."""
    x = innovations.copy()
    shift = 1
    while shift < len(x):
        x[shift:] = x[shift:] + phi**shift * x[:-shift]
        shift *= 2
    return x + start * phi ** np.arange(1, len(x) + 1)


def _place_events(
    rng: np.random.Generator, widths: list[int], length: int, margin: int, guard: int
) -> list[int]:
    """Start of each event: one per equal segment of the interior, never overlapping."""
    if not widths:
        return []
    bounds = np.linspace(margin, length - margin, len(widths) + 1).astype(int)
    starts = []
    for width, lo, hi in zip(widths, bounds[:-1], bounds[1:], strict=True):
        first, last = lo + guard, hi - guard - width
        if last < first:
            raise DataError(
                f"length {length} is too short to place {len(widths)} anomalies and level shifts "
                "away from the edges; use a longer series or fewer events",
                field="length",
            )
        starts.append(int(rng.integers(first, last + 1)))
    return starts


def generate_plant(
    n_series: int = 3,
    length: int = 2016,
    freq: str = "h",
    start: str | pd.Timestamp = "2024-01-01",
    n_anomalies: int = 3,
    n_level_shifts: int = 1,
    seed: int = 0,
) -> PlantData:
    """Generate seeded synthetic plant sensors with labelled anomalies.

    Each series (`plant_000`, `plant_001`, …) is a temperature, pressure or flow sensor in turn:
    level + linear trend + daily and weekly seasonality (periods from `freq`) + AR(1) noise, plus
    `n_level_shifts` level shifts and `n_anomalies` injected spikes, dips and short drifts, placed
    away from the edges and never overlapping. Series i depends only on `seed` and i.

    Args:
        n_series: number of series.
        length: points per series.
        freq: pandas offset alias of a fixed step.
        start: first timestamp.
        n_anomalies: spikes, dips and drifts per series.
        n_level_shifts: level shifts per series (labelled `level_shift` at their first row).
        seed: drives everything; the same seed gives the same data.
    """
    if n_series < 1 or length < 2 or n_anomalies < 0 or n_level_shifts < 0:
        raise ValueError(
            "generate_plant needs n_series >= 1, length >= 2 and non-negative event counts"
        )
    step_ns, alias = _fixed_step(freq)
    periods = seasonal_periods(alias)
    steps_per_day = _NS_PER_DAY / step_ns
    ds = pd.date_range(start=start, periods=length, freq=pd.Timedelta(step_ns, unit="ns"))
    ds = ds.as_unit("ns")
    time = np.arange(length, dtype=np.float64)
    drift_width = int(np.clip(round(steps_per_day / 2), 6, 48))
    margin = min(max(int(periods[0]) if periods else 0, length // 20), length // 10)
    seeds = np.random.SeedSequence(seed).spawn(n_series)

    values, labels = [], []
    for i, seed_seq in enumerate(seeds):
        rng = np.random.default_rng(seed_seq)
        sensor = _SENSORS[i % len(_SENSORS)]
        sd = rng.uniform(*sensor.noise_sd)
        phi = rng.uniform(0.5, 0.85)
        signal = rng.uniform(*sensor.level) + rng.uniform(*sensor.trend_per_day) * (
            time / steps_per_day
        )
        for period, amplitude in zip(
            periods, (sensor.daily_amplitude, sensor.weekly_amplitude), strict=False
        ):
            angle = 2 * np.pi * time / period + rng.uniform(0, 2 * np.pi)
            signal += rng.uniform(*amplitude) * (np.sin(angle) + 0.3 * np.sin(2 * angle))
        innovations = rng.normal(0.0, sd * np.sqrt(1 - phi**2), length)
        noise = _ar1(innovations, phi, start=rng.normal(0.0, sd))
        y = signal + noise

        kinds = [("spike", "dip", "drift")[k % 3] for k in range(n_anomalies)]
        kinds += ["level_shift"] * n_level_shifts
        kinds = [kinds[k] for k in rng.permutation(len(kinds))]
        widths = [drift_width if kind == "drift" else 1 for kind in kinds]
        starts = _place_events(rng, widths, length, margin, guard=2)
        for kind, at, width in zip(kinds, starts, widths, strict=True):
            size = rng.uniform(6.0, 10.0) * sd
            if kind == "spike":
                y[at] += size
            elif kind == "dip":
                y[at] -= size
            elif kind == "drift":
                y[at : at + width] += (
                    rng.choice([-1.0, 1.0]) * size * np.linspace(1 / width, 1, width)
                )
            else:
                y[at:] += rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 8.0) * sd
            labels.append((i, ds[at : at + width], kind))
        values.append(y)

    names = [f"plant_{i:03d}" for i in range(n_series)]
    frame = pd.DataFrame(
        {
            ID_COL: pd.Series(np.repeat(names, length), dtype="str"),
            TIME_COL: np.tile(ds, n_series),
            TARGET_COL: np.concatenate(values),
        }
    )
    anomalies = pd.DataFrame(
        {
            ID_COL: pd.Series([names[i] for i, stamps, _ in labels for _ in stamps], dtype="str"),
            TIME_COL: pd.DatetimeIndex(
                [s for _, stamps, _ in labels for s in stamps], dtype=ds.dtype
            ),
            "kind": pd.Series([k for _, stamps, k in labels for _ in stamps], dtype="str"),
        }
    )
    anomalies = anomalies.sort_values([ID_COL, TIME_COL], ignore_index=True)
    return PlantData(frame=frame, anomalies=anomalies, freq=alias, periods=periods)


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Split:
    """Chronological train/val/test row slices (positions within a series, stop exclusive).

    `val` and `test` start `lookback` rows early so their first target is the set's first row.
    """

    train: slice
    val: slice
    test: slice
    lookback: int

    def n_windows(self, part: Literal["train", "val", "test"], horizon: int) -> int:
        """Windows of `lookback` inputs and `horizon` targets inside `part` at stride 1."""
        rows: slice = getattr(self, part)
        return max(0, rows.stop - rows.start - self.lookback - horizon + 1)


EttSplit = Split

_ETT_MONTH_ROWS = {"ETTh": 30 * 24, "ETTm": 30 * 24 * 4}


def ett_split(n_rows: int, *, dataset: Literal["ETTh", "ETTm"], lookback: int) -> Split:
    """The standard ETT split (../shared/data/README.md §1): 12/4/4 months of 30 days.

    ETTh: train [0, 8640), val [8640 - L, 11520), test [11520 - L, 14400); ETTm: four times those.
    Rows from 14400 / 57600 on are never used.

    Raises:
        DataError: unknown dataset, lookback outside [0, train length], or too few rows.
    """
    if dataset not in _ETT_MONTH_ROWS:
        raise DataError(f"dataset must be 'ETTh' or 'ETTm', got {dataset!r}", field="ett_dataset")
    month = _ETT_MONTH_ROWS[dataset]
    train_end, val_end, test_end = 12 * month, 16 * month, 20 * month
    if not 0 <= lookback <= train_end:
        raise DataError(
            f"lookback {lookback} must be between 0 and {train_end} for the {dataset} split",
            field="lookback",
        )
    if n_rows < test_end:
        raise DataError(
            f"the {dataset} split needs at least {test_end} rows; the data has {n_rows}",
            field="ett_dataset",
        )
    return Split(
        train=slice(0, train_end),
        val=slice(train_end - lookback, val_end),
        test=slice(val_end - lookback, test_end),
        lookback=lookback,
    )


def _size_in_steps(size: float, length: int, name: str) -> int:
    if size >= 1:
        if size != int(size):
            raise DataError(f"{name} {size} must be a whole number of steps (or < 1)", field=name)
        return int(size)
    if size <= 0:
        raise DataError(f"{name} {size} must be > 0", field=name)
    return max(1, round(size * length))


def holdout_split(length: int, val_size: float, test_size: float, lookback: int) -> Split:
    """Keep the last `test_size` rows for test and the `val_size` before them for validation.

    Sizes are steps when >= 1, fractions of `length` when < 1.

    Raises:
        DataError: the series is too short for the sizes and the look-back.
    """
    val = _size_in_steps(val_size, length, "val_size")
    test = _size_in_steps(test_size, length, "test_size")
    train_end = length - val - test
    if lookback < 0 or train_end <= lookback:
        raise DataError(
            f"a series of {length} rows is too short for val {val} + test {test} rows with "
            f"lookback {lookback}: the training part would have {train_end} rows",
            field="split",
        )
    return Split(
        train=slice(0, train_end),
        val=slice(train_end - lookback, train_end + val),
        test=slice(train_end + val - lookback, length),
        lookback=lookback,
    )


def make_split(config: SplitConfig, *, length: int, lookback: int) -> Split:
    """The split a `SplitConfig` asks for, for series of `length` rows."""
    if config.kind == "ett":
        return ett_split(length, dataset=config.ett_dataset, lookback=lookback)
    return holdout_split(length, config.val_size, config.test_size, lookback)


@dataclass(frozen=True)
class SplitFrames:
    """The train/val/test parts of a long frame (val/test include their look-back rows)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def split_frame(df: pd.DataFrame, split: Split) -> SplitFrames:
    """Apply `split` to every series of a long frame sorted by `ds` within each series.

    Raises:
        DataError: a series has fewer rows than the split reaches.
    """
    position = df.groupby(ID_COL, sort=False).cumcount().to_numpy()
    sizes = df.groupby(ID_COL, sort=False).size()
    short = sizes[sizes < split.test.stop]
    if len(short):
        raise DataError(
            f"series '{short.index[0]}' has {short.iloc[0]} rows; the split needs "
            f"{split.test.stop}" + (f" (and {len(short) - 1} more)" if len(short) > 1 else ""),
            field="split",
            problems=[
                f"series '{name}' has {n} rows; the split needs {split.test.stop}"
                for name, n in short.items()
            ],
        )

    def part(rows: slice) -> pd.DataFrame:
        mask = (position >= rows.start) & (position < rows.stop)
        return df.loc[mask].reset_index(drop=True)

    return SplitFrames(train=part(split.train), val=part(split.val), test=part(split.test))


# ---------------------------------------------------------------------------------------------
# Composition from config


def load_data(config: DataConfig) -> pd.DataFrame:
    """The raw long frame a `DataConfig` names: the synthetic plant or a long/wide file."""
    if config.source == "synthetic":
        return generate_plant(**config.synthetic.model_dump()).frame
    if config.path is None:
        raise DataError("data.source 'file' needs data.path", field="path")
    if config.layout == "wide":
        return read_wide(config.path, time_col=config.time_col, columns=config.columns)
    return read_long(
        config.path,
        time_col=config.time_col,
        id_col=config.id_col,
        target_col=config.target_col,
    )


def load_validated(config: DataConfig, window: WindowConfig | None = None) -> ValidatedData:
    """`load_data` then `validate` with the config's policies (and lookback + horizon if given)."""
    min_length, reason = 1, None
    if window is not None:
        min_length = window.lookback + window.horizon
        reason = f"lookback {window.lookback} + horizon {window.horizon}"
    return validate(
        load_data(config),
        freq=config.freq,
        min_length=min_length,
        min_length_reason=reason,
        gap_policy=config.gaps.policy,
        max_gap=config.gaps.max_gap,
        unsorted=config.unsorted,
    )
