"""The small synthetic job config the pipeline tests share (2 series x 720 h, L 24, H 6)."""

from __future__ import annotations

from pathlib import Path

from forecaster.config import Config, parse_config


def tiny_config(output_dir: Path, **sections: object) -> Config:
    """A job on 2 synthetic hourly series; `sections` replace whole top-level sections."""
    raw: dict[str, object] = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "data": {
            "synthetic": {"n_series": 2, "length": 720, "seed": 1},
            "split": {"val_size": 72, "test_size": 72},
        },
        "window": {"lookback": 24, "horizon": 6},
        "preprocess": {"trend": "linear", "seasonality": "stl", "periods": [24]},
        "model": {"name": "gru", "hidden_size": 8},
        "train": {"epochs": 2, "batch_size": 64, "stride": 2},
    }
    raw.update(sections)
    return parse_config(raw)
