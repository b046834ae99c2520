from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecaster.config import parse_config
from forecaster.errors import DataError
from forecaster.transform import PreprocessingSpec, transform
from pipelines.prepare import PREPROCESSING_FILE, STATIONARITY_FILE, prepare


def _config(tmp_path: Path, **sections: object) -> object:
    raw = {
        "name": "t",
        "output_dir": str(tmp_path),
        "data": {
            "source": "synthetic",
            "synthetic": {"n_series": 2, "length": 24 * 7 * 6, "seed": 3},
            "split": {"val_size": 168, "test_size": 168},
        },
        "window": {"lookback": 48, "horizon": 12},
        "preprocess": {"trend": "linear", "seasonality": "stl", "periods": [24]},
    }
    raw.update(sections)
    return parse_config(raw)


def _write_long(path: Path, values: np.ndarray, uid: str = "s") -> Path:
    ds = pd.date_range("2024-01-01", periods=len(values), freq="h")
    pd.DataFrame({"unique_id": uid, "ds": ds, "y": values}).to_csv(path, index=False)
    return path


def test_fits_on_training_rows_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    prepared = prepare(config)
    for uid, split in prepared.splits.items():
        assert prepared.spec.series[uid].n_train == split.train.stop
        assert split.train.stop == 24 * 7 * 6 - 2 * 168
    train = prepared.train_frame()
    assert train.groupby("unique_id").size().tolist() == [split.train.stop] * 2


def test_gate_remedy_refits_scale_on_the_differenced_series(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(size=1500)) + 100.0
    path = _write_long(tmp_path / "walk.csv", walk)
    config = _config(
        tmp_path,
        data={"source": "file", "path": str(path), "split": {"val_size": 200, "test_size": 200}},
        preprocess={"trend": "none", "seasonality": "none"},
    )
    prepared = prepare(config)
    assert prepared.decision.method == "feedback"
    assert prepared.decision.differences == 1
    spec = prepared.spec.series["s"]
    assert spec.difference == 1
    # The model input on the training rows is unit-scale: scale fitted after differencing.
    z = transform(spec, walk[:1100], pd.date_range("2024-01-01", periods=1100, freq="h")).values
    assert abs(z.mean()) < 1e-9
    assert z.std() == pytest.approx(1.0, rel=1e-9)


def test_strict_gate_refuses_and_no_remedy_means_bptt(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = _write_long(tmp_path / "walk.csv", np.cumsum(rng.normal(size=1500)))
    data = {"source": "file", "path": str(path), "split": {"val_size": 200, "test_size": 200}}
    plain = {"trend": "none", "seasonality": "none"}
    bptt = prepare(_config(tmp_path, data=data, preprocess=plain, stationarity={"d_max": 0}))
    assert bptt.decision.method == "bptt"
    assert bptt.spec.series["s"].difference == 0
    refused = prepare(
        _config(tmp_path, data=data, preprocess=plain, stationarity={"d_max": 0, "strict": True})
    )
    assert refused.decision.method == "refuse"


def test_write_produces_loadable_reports(tmp_path: Path) -> None:
    prepared = prepare(_config(tmp_path))
    paths = prepared.write(tmp_path / "out")
    assert [p.name for p in paths] == [PREPROCESSING_FILE, STATIONARITY_FILE]
    assert PreprocessingSpec.load(paths[0]) == prepared.spec
    report = json.loads(paths[1].read_text())
    assert report["method"] == prepared.decision.method
    assert set(report["reports"]) == set(prepared.spec.series)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_data_path_override_and_too_short_series(tmp_path: Path) -> None:
    path = _write_long(tmp_path / "short.csv", np.sin(np.arange(50.0)))
    with pytest.raises(DataError, match=r"series 's' has 50 points; needs at least 60"):
        prepare(_config(tmp_path), data_path=path)


@pytest.mark.parametrize(
    ("sections", "field", "part"),
    [
        ({"data_split": {"val_size": 168, "test_size": 10}}, "data.split.test_size", "test"),
        ({"data_split": {"val_size": 10, "test_size": 168}}, "data.split.val_size", "val"),
        ({"window": {"lookback": 48, "horizon": 200}}, "data.split.val_size", "val"),
    ],
)
def test_a_part_without_one_window_is_refused_before_training(
    tmp_path: Path, sections: dict[str, object], field: str, part: str
) -> None:
    """Found at prepare time, naming the part and the keys, not after training has run."""
    overrides: dict[str, object] = {}
    if "data_split" in sections:
        overrides["data"] = {
            "source": "synthetic",
            "synthetic": {"n_series": 2, "length": 24 * 7 * 6, "seed": 3},
            "split": sections["data_split"],
        }
    if "window" in sections:
        overrides["window"] = sections["window"]
    with pytest.raises(DataError, match=rf"the {part} part has \d+ usable rows") as caught:
        prepare(_config(tmp_path, **overrides))
    assert caught.value.field == field
    assert "window.lookback" in str(caught.value)
    assert "window.horizon" in str(caught.value)
    assert len(caught.value.problems) == 2  # both series named


def test_the_training_part_counts_the_rows_differencing_removes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(size=400)) + 100.0  # differenced once by the gate's remedy
    path = _write_long(tmp_path / "walk.csv", walk)
    split = {"val_size": 100, "test_size": 100}  # train: 200 rows, 199 after differencing
    base = {"source": "file", "path": str(path), "split": split}
    plain = {"trend": "none", "seasonality": "none"}
    fits = _config(tmp_path, data=base, preprocess=plain, window={"lookback": 100, "horizon": 99})
    assert prepare(fits).decision.differences == 1
    short = _config(tmp_path, data=base, preprocess=plain, window={"lookback": 101, "horizon": 99})
    with pytest.raises(DataError, match=r"the train part has 199 usable rows") as caught:
        prepare(short)
    assert caught.value.field == "data.split"
