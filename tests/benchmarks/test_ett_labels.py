"""The `--methods` labels of benchmarks/ett.py: what each one asks of the trainer, and refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ett = load_benchmark("ett")


@pytest.mark.parametrize(
    ("label", "method", "feedback"),
    [
        ("bptt", "bptt", {}),
        ("feedback", "feedback", {}),
        ("feedback+c2", "feedback", {"corrections": 2}),
        ("feedback-matrix", "feedback", {"kind": "jacobian_matrix"}),
        ("feedback-step", "feedback", {"kind": "per_step_diag"}),
        ("feedback+norecheck", "feedback", {"recheck_every": 0}),
        (
            "feedback-matrix+c1+norecheck",
            "feedback",
            {"kind": "jacobian_matrix", "corrections": 1, "recheck_every": 0},
        ),
    ],
)
def test_method_labels_map_to_trainer_settings(
    label: str, method: str, feedback: dict, tmp_path: Path
) -> None:
    assert ett.method_label(label) == label
    assert ett.split_method(label) == (method, feedback)
    options = {
        "epochs": 2,
        "patience": 1,
        "batch_size": 8,
        "lr": 1e-3,
        "device": "cpu",
        "max_windows": 64,
        "data_dir": str(tmp_path),
        "lookback": 96,
        "hidden": 8,
    }
    config = ett.build_config(options, "ETTh1", 96, "mi_gru", label, 0, tmp_path)
    assert config.train.method == method
    for key, value in feedback.items():
        assert getattr(config.train.feedback, key) == value


@pytest.mark.parametrize(
    "label", ["bptt+norecheck", "feedback+norecheck+c1", "feedback+c0", "feedback-diag", "sgd"]
)
def test_bad_method_labels_are_refused(label: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not 'bptt' or"):
        ett.method_label(label)


def test_every_benchmarked_model_gets_feedback_runs() -> None:
    """The GRU's BPTT runs the fused kernel, but its feedback runs `recur`: the issue's grid
    asks for feedback and BPTT of all four models, LSTM (no feedback path) is not among them."""
    assert {"mi_gru", "lmn", "scrn", "gru"} == ett.FEEDBACK_MODELS
