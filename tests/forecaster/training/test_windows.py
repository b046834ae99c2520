"""Forking-sequence windows: exact targets, split alignment, differencing offset, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecaster.data import holdout_split
from forecaster.errors import DataError
from forecaster.training.windows import ForkingWindows


def _naive(arrays, rows, offsets, lookback, horizon, stride):
    """Windows built the obvious way: lists of (x [L], target [L, H]) per window."""
    xs, targets = [], []
    for values, part, offset in zip(arrays, rows, offsets, strict=True):
        lo, hi = max(part.start, offset), part.stop
        for r in range(lo, hi - lookback - horizon + 1, stride):
            j = r - offset  # position of row r in the input array
            xs.append(values[j : j + lookback])
            targets.append(
                np.array(
                    [[values[j + t + k] for k in range(1, horizon + 1)] for t in range(lookback)]
                )
            )
    return np.array(xs), np.array(targets)


def test_windows_match_naive_construction_across_series_offsets_and_stride() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=57), rng.normal(size=40), rng.normal(size=33)]
    rows = [slice(0, 56), slice(5, 40), slice(2, 35)]
    offsets = [1, 0, 2]
    lookback, horizon, stride = 7, 3, 2
    windows = ForkingWindows(
        arrays,
        lookback=lookback,
        horizon=horizon,
        rows=rows,
        offset=offsets,
        stride=stride,
        dtype=torch.float64,
    )
    x_ref, target_ref = _naive(arrays, rows, offsets, lookback, horizon, stride)
    assert len(windows) == len(x_ref) > 0
    batch = windows.batch(np.arange(len(windows)))
    assert batch.x.shape == (len(windows), lookback, 1)
    assert batch.target.shape == (len(windows), lookback, horizon)
    assert torch.equal(batch.x[..., 0], torch.from_numpy(x_ref))
    assert torch.equal(batch.target, torch.from_numpy(target_ref))
    assert batch.mask is None  # every target exists (the naive reference cut them all)
    assert torch.equal(windows.last_step_targets(), torch.from_numpy(target_ref[:, -1]))
    assert torch.equal(batch.last_target, batch.target[:, -1])
    x_one, target_one, mask_one = windows[3]
    assert torch.equal(x_one[:, 0], torch.from_numpy(x_ref[3]))
    assert torch.equal(target_one, torch.from_numpy(target_ref[3]))
    assert mask_one.shape == (lookback, horizon)


def test_windows_store_each_series_once() -> None:
    # ETTm1-sized: ~34k windows of 336 x 96 would be ~4 GB materialised.
    values = np.zeros(34_560, dtype=np.float32)
    windows = ForkingWindows([values], lookback=336, horizon=96)
    assert len(windows) == 34_560 - 336 - 96 + 1
    assert windows._values.numel() == 34_560
    assert windows.batch([0, 1]).target.shape == (2, 336, 96)


def test_val_windows_first_target_is_the_val_sets_first_row() -> None:
    length, lookback, horizon = 200, 24, 6
    split = holdout_split(length, val_size=40, test_size=40, lookback=lookback)
    rows = np.arange(length, dtype=np.float64)  # value = row number
    for offset in (0, 1, 2):  # undifferenced, first and second differences
        model_input = rows[offset:]  # Transformed.values[j] belongs to row j + offset
        windows = {
            part: ForkingWindows.from_split(
                {"a": model_input}, {"a": split}, part, horizon=horizon, offset=offset
            )
            for part in ("train", "val", "test")
        }
        val, test, train = windows["val"], windows["test"], windows["train"]
        assert val.last_step_targets()[0, 0] == split.train.stop == split.val.start + lookback
        assert test.last_step_targets()[0, 0] == split.val.stop
        assert test.last_step_targets()[-1, -1] == split.test.stop - 1
        assert len(val) == split.n_windows("val", horizon)
        assert len(test) == split.n_windows("test", horizon)
        # Rows before `offset` have no model input: training loses its first `offset` windows.
        assert len(train) == split.n_windows("train", horizon) - offset
        assert train.batch([0]).x[0, 0, 0] == offset
        assert train.last_step_targets()[-1, -1] == split.train.stop - 1


def test_epoch_order_is_a_seeded_permutation_cut_to_max_windows() -> None:
    windows = ForkingWindows([np.arange(100.0)], lookback=5, horizon=2)
    first = windows.epoch_order(np.random.default_rng(7))
    again = windows.epoch_order(np.random.default_rng(7))
    other = windows.epoch_order(np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.array_equal(np.sort(first), np.arange(len(windows)))
    cut = windows.epoch_order(np.random.default_rng(7), max_windows=10)
    assert np.array_equal(cut, first[:10])
    assert np.array_equal(windows.epoch_order(), np.arange(len(windows)))
    sizes = [len(b.index) for b in windows.iter_batches(16, cut)]
    assert sizes == [10]
    assert [len(b.index) for b in windows.iter_batches(40)] == [40, 40, 14]
    assert windows.n_batches(40) == 3
    assert windows.n_batches(40, max_windows=10) == 1


def test_series_too_short_for_any_window_is_refused() -> None:
    with pytest.raises(DataError, match=r"no window fits: series 'pump': rows \[0, 10\) are 10"):
        ForkingWindows([np.zeros(10)], lookback=8, horizon=4, names=["pump"])


def test_lookback_differing_from_the_split_is_refused() -> None:
    split = holdout_split(200, val_size=40, test_size=40, lookback=24)
    with pytest.raises(DataError, match="lookback 48 differs from the split's lookback 24"):
        ForkingWindows.from_split({"a": np.zeros(200)}, {"a": split}, "val", horizon=4, lookback=48)


def test_rows_past_the_input_are_refused() -> None:
    with pytest.raises(DataError, match=r"rows \[0, 50\) reach past the input.*\[1, 40\)"):
        ForkingWindows([np.zeros(39)], lookback=4, horizon=2, rows=slice(0, 50), offset=1)


def test_non_finite_input_is_refused_with_its_position() -> None:
    values = np.zeros(30)
    values[17] = np.nan
    with pytest.raises(DataError, match="input position 17: value nan is not finite"):
        ForkingWindows([values], lookback=4, horizon=2)


def test_non_positive_sizes_are_refused() -> None:
    with pytest.raises(DataError, match="horizon 0 is not a positive integer"):
        ForkingWindows([np.zeros(30)], lookback=4, horizon=0)
