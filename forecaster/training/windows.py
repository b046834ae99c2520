"""Training, validation and test windows with forking-sequence targets, built by index.

A window starting at row `r` of a series holds the inputs of rows `r .. r+L-1` and, from every
step `t`, the next `H` values: `target[t, k-1] = value[r + t + k]` (DESIGN.md §5, "forking
sequences"), so one window spans `L + H` rows. Each series is stored once, flat; windows are
gathered per batch, never materialised as an `[N, L, H]` tensor (ETTm1: ~34k windows x 336 x 96).

Alignment. Rows are positions in the original series, as in `forecaster.data.Split`. The model
input may start later than row 0: after differencing of order `d`, `Transformed.values[j]` belongs
to row `j + d`, so it is passed with `offset=d`. A window must lie inside its part's rows
(`Split.train`/`val`/`test`) and inside the rows the input covers (`offset .. offset+len-1`); rows
before `offset` have no model input, so a part starting at row 0 loses its first `offset` rows.
`val` and `test` start `lookback` rows early, so the first window's last-step target is the part's
first row of its own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from forecaster.data import Split
from forecaster.errors import DataError

__all__ = ["ForkingWindows", "WindowBatch"]


@dataclass(frozen=True)
class WindowBatch:
    """A batch of windows; `B` windows, look-back `L`, horizon `H`.

    Attributes:
        x: model inputs `[B, L, 1]`.
        target: forking-sequence targets `[B, L, H]`, `target[b, t, k-1]` = value at `t + k`.
        mask: validity of each target `[B, L, H]` (bool), or None: every target is valid —
            always so for `ForkingWindows` batches (a window is cut only where its `L + H`
            values exist), which saves the loss a full pass over `[B, L, H]` per step.
        last_target: the `H` values after each window `[B, H]` (`target[:, -1]`).
        index: which windows these are `[B]` (int64, positions in the window table).
    """

    x: Tensor
    target: Tensor
    mask: Tensor | None
    last_target: Tensor
    index: Tensor


class ForkingWindows:
    """Forking-sequence windows over one or more preprocessed series (a map-style dataset).

    Args:
        series: per series, the 1-D model input (finite floats); not copied into windows.
        lookback: inputs per window `L`.
        horizon: forecast length `H`.
        rows: per series, the row slice the windows must lie in (a `Split` part); default: all
            rows the input covers. One slice applies to every series.
        offset: per series (or one for all), the row of `series[i][0]`: the differencing order
            `d` for `Transformed.values`, 0 for undifferenced input.
        stride: rows between consecutive window starts.
        names: series names used in error messages.
        dtype: floating dtype of the stored values.

    Raises:
        DataError: a series is not 1-D or not finite, a slice reaches past the input, or no
            series yields a window.
    """

    def __init__(
        self,
        series: Sequence[npt.ArrayLike],
        *,
        lookback: int,
        horizon: int,
        rows: Sequence[slice] | slice | None = None,
        offset: int | Sequence[int] = 0,
        stride: int = 1,
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for key, value in (("lookback", lookback), ("horizon", horizon), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"windows: {key} {value!r} is not a positive integer", field=key)
        n_series = len(series)
        if n_series == 0:
            raise DataError("windows: no series given", field="series")
        names = [f"#{i}" for i in range(n_series)] if names is None else list(names)
        offsets = [offset] * n_series if isinstance(offset, int) else list(offset)
        row_slices = rows if isinstance(rows, Sequence) else [rows] * n_series
        for what, items in (("names", names), ("offset", offsets), ("rows", row_slices)):
            if len(items) != n_series:
                raise DataError(
                    f"windows: {len(items)} {what} for {n_series} series", field=str(what)
                )
        self.lookback = lookback
        self.horizon = horizon
        self.stride = stride
        self.names: tuple[str, ...] = tuple(names)
        span = lookback + horizon
        arrays: list[npt.NDArray[np.float64]] = []
        starts: list[npt.NDArray[np.int64]] = []
        series_index: list[npt.NDArray[np.int64]] = []
        start_rows: list[npt.NDArray[np.int64]] = []
        base = 0
        reasons: list[str] = []
        for i, (raw, name, first_row, part) in enumerate(
            zip(series, names, offsets, row_slices, strict=True)
        ):
            values = _as_series(raw, name)
            if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
                raise DataError(
                    f"windows: series '{name}': offset {first_row!r} is not an integer >= 0",
                    field="offset",
                )
            covered = slice(first_row, first_row + values.shape[0])
            lo, hi = _row_range(part, covered, name)
            n_windows = max(0, (hi - lo - span) // stride + 1) if hi - lo >= span else 0
            if n_windows == 0:
                reasons.append(
                    f"series '{name}': rows [{lo}, {hi}) are {max(0, hi - lo)}, fewer than "
                    f"lookback {lookback} + horizon {horizon}"
                )
            first = lo + stride * np.arange(n_windows, dtype=np.int64)  # rows
            starts.append(base + first - first_row)
            series_index.append(np.full(n_windows, i, dtype=np.int64))
            start_rows.append(first)
            arrays.append(values)
            base += values.shape[0]
        self._starts = torch.from_numpy(np.concatenate(starts))  # [N] flat position of row r
        if self._starts.numel() == 0:
            raise DataError(f"windows: no window fits: {'; '.join(reasons)}", field="windows")
        self.series_index = torch.from_numpy(np.concatenate(series_index))  # [N]
        self.start_rows = torch.from_numpy(np.concatenate(start_rows))  # [N]
        self._values = torch.from_numpy(np.concatenate(arrays)).to(dtype)  # [total]
        self._steps = torch.arange(lookback)  # [L]

    # ---- construction from a split ------------------------------------------------------

    @classmethod
    def from_split(
        cls,
        series: Mapping[str, npt.ArrayLike],
        splits: Mapping[str, Split],
        part: Literal["train", "val", "test"],
        *,
        horizon: int,
        lookback: int | None = None,
        offset: int | Mapping[str, int] = 0,
        stride: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> ForkingWindows:
        """Windows of one part of each series' split (`PreparedData.splits`).

        Args:
            series: per series name, the 1-D model input.
            splits: per series name, its `Split`; every series needs one.
            part: which part to window.
            horizon: forecast length `H`.
            lookback: `L`; must equal each split's look-back (the rows `val`/`test` start early).
            offset: the row of each input's first value (the differencing order), one for all or
                per series name.
            stride: rows between window starts (evaluation uses 1: every window).
            dtype: floating dtype of the stored values.

        Raises:
            DataError: a series has no split, or the look-back differs from a split's.
        """
        names = list(series)
        rows: list[slice] = []
        offsets: list[int] = []
        for name in names:
            if name not in splits:
                raise DataError(f"windows: series '{name}' has no split", field="splits")
            split = splits[name]
            if lookback is None:
                lookback = split.lookback
            if split.lookback != lookback:
                raise DataError(
                    f"windows: lookback {lookback} differs from the split's lookback "
                    f"{split.lookback} for series '{name}' (its val/test start that many rows "
                    "early)",
                    field="lookback",
                )
            rows.append(getattr(split, part))
            offsets.append(offset if isinstance(offset, int) else offset[name])
        if lookback is None:
            raise DataError("windows: no series given", field="series")
        return cls(
            [series[name] for name in names],
            lookback=lookback,
            horizon=horizon,
            rows=rows,
            offset=offsets,
            stride=stride,
            names=names,
            dtype=dtype,
        )

    # ---- dataset protocol ---------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts.numel())

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """One window: `x [L, 1]`, `target [L, H]`, `mask [L, H]`."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        batch = self.batch(torch.tensor([i % n]))
        target = batch.target[0]
        return batch.x[0], target, torch.ones(target.shape, dtype=torch.bool, device=self.device)

    @property
    def device(self) -> torch.device:
        """Where the stored values live (batches are gathered there)."""
        return self._values.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the stored values."""
        return self._values.dtype

    def fingerprint(self) -> str:
        """sha256 of what the windows read: sizes, stride, window positions and the stored
        values (bit for bit, as stored). Two window sets with the same fingerprint give the
        same batches; a checkpoint records it so a resume on other data is refused."""
        digest = hashlib.sha256()
        digest.update(f"{self.lookback},{self.horizon},{self.stride},{self.dtype}".encode())
        for tensor in (self._starts, self._values):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def to(self, device: torch.device | str) -> ForkingWindows:
        """The same windows with the stored values on `device` (a shallow copy; self is kept)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(ForkingWindows)
        moved.__dict__.update(self.__dict__)
        moved._values = self._values.to(device)
        moved._starts = self._starts.to(device)
        moved._steps = self._steps.to(device)
        return moved

    # ---- gathering ----------------------------------------------------------------------

    def batch(self, indices: Tensor | npt.ArrayLike) -> WindowBatch:
        """Gather windows by position: a `WindowBatch` of `B = len(indices)` windows."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"window indices outside [0, {len(self)})")
        index_dev = index.to(self.device)
        first = self._starts[index_dev]  # [B]
        positions = first[:, None] + self._steps[None, :]  # [B, L]
        x = self._values[positions].unsqueeze(-1)  # [B, L, 1]
        ahead = self._values.unfold(0, self.horizon, 1)  # [total - H + 1, H], a view
        target = ahead[positions + 1]  # [B, L, H]
        return WindowBatch(x=x, target=target, mask=None, last_target=target[:, -1], index=index)

    def epoch_order(
        self, rng: np.random.Generator | None = None, max_windows: int | None = None
    ) -> npt.NDArray[np.int64]:
        """The window positions of one epoch: a permutation drawn from `rng` (all windows in
        order when `rng` is None), cut to the first `max_windows` when that is smaller."""
        n = len(self)
        order = np.arange(n, dtype=np.int64) if rng is None else rng.permutation(n)
        if max_windows is not None and max_windows < n:
            order = order[:max_windows]
        return order

    def iter_batches(
        self, batch_size: int, order: npt.NDArray[np.int64] | None = None
    ) -> Iterator[WindowBatch]:
        """Batches of `batch_size` windows in `order` (default: all, in order); the last batch
        may be smaller (nothing is dropped)."""
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} is not >= 1", field="batch_size")
        order = self.epoch_order() if order is None else order
        for begin in range(0, len(order), batch_size):
            yield self.batch(order[begin : begin + batch_size])

    def n_batches(self, batch_size: int, max_windows: int | None = None) -> int:
        """Batches per epoch at `batch_size` (after subsampling to `max_windows`)."""
        n = len(self) if max_windows is None else min(len(self), max_windows)
        return math.ceil(n / batch_size)

    def last_step_targets(self) -> Tensor:
        """The `H` values after every window `[N, H]`: what the last-step forecast predicts."""
        ahead = self._values.unfold(0, self.horizon, 1)  # [total - H + 1, H]
        return ahead[self._starts + self.lookback].clone()  # [N, H]

    def __repr__(self) -> str:
        return (
            f"ForkingWindows(n={len(self)}, series={len(self.names)}, lookback={self.lookback}, "
            f"horizon={self.horizon}, stride={self.stride})"
        )


def _as_series(raw: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    values = np.asarray(raw, dtype=np.float64)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DataError(
            f"windows: series '{name}' has shape {values.shape}; expected 1-D values",
            field="series",
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DataError(
            f"windows: series '{name}', input position {int(bad[0])}: value {values[bad[0]]} "
            "is not finite",
            field="series",
        )
    return values


def _row_range(part: slice | None, covered: slice, name: str) -> tuple[int, int]:
    """Rows `[lo, hi)` both the part and the input cover."""
    if part is None:
        return covered.start, covered.stop
    if part.step not in (None, 1) or part.start is None or part.stop is None:
        raise DataError(
            f"windows: series '{name}': rows {part} must have a start, a stop and step 1",
            field="rows",
        )
    if part.stop > covered.stop:
        raise DataError(
            f"windows: series '{name}': rows [{part.start}, {part.stop}) reach past the input, "
            f"which covers rows [{covered.start}, {covered.stop})",
            field="rows",
        )
    return max(part.start, covered.start), part.stop
