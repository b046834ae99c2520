"""benchmarks/train_speed.py's thread-count comparison: every variant at each count in one
round-robin, and each method compared at its own fastest count."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from forecaster.training.gradients import hand_written_bptt

train_speed = load_benchmark("train_speed")


def _entry(model: str, threads: int, bptt: float, feedback: float, gru: float) -> dict:
    return {
        "device": "cpu",
        "model": model,
        "hidden": 64,
        "T": 720,
        "threads": threads,
        "rounds": 5,
        "bptt_s": bptt,
        "bptt_min_s": bptt,
        "feedback_s": feedback,
        "feedback_min_s": feedback,
        "speedup": round(bptt / feedback, 3),
        "feedback_matrix_s": feedback,
        "feedback_c1_s": feedback,
        "nn_gru_s": gru,
        "nn_gru_min_s": gru,
    }


def test_each_method_is_compared_at_its_own_fastest_thread_count() -> None:
    # BPTT is slower with 2 threads, feedback faster: the fair speed-up is 0.080 / 0.040,
    # not 0.120 / 0.040 (both at 2) nor 0.080 / 0.050 (both at 1).
    entries = [_entry("lmn", 1, 0.080, 0.050, 0.140), _entry("lmn", 2, 0.120, 0.040, 0.130)]
    (best,) = train_speed.best_of_threads(entries)
    assert (best["bptt_s"], best["bptt_threads"]) == (0.080, 1)
    assert (best["feedback_s"], best["feedback_threads"]) == (0.040, 2)
    assert (best["nn_gru_s"], best["nn_gru_threads"]) == (0.130, 2)
    assert best["speedup"] == 2.0
    targets = train_speed.targets_report([best])
    assert targets["feedback_2x_at_T720_h64_lmn"] == {"speedup": 2.0, "met": True}


def test_markdown_lists_every_count_then_the_best_against_the_best() -> None:
    entries = [_entry("lmn", 1, 0.080, 0.050, 0.140), _entry("lmn", 2, 0.120, 0.040, 0.130)]
    payload = {
        "settings": {
            "batch": 32,
            "horizon": 96,
            "threads": [1, 2],
            "rounds": 5,
            "rounds_t1440_h256": 5,
            "heap": "training_heap",
            "load_average_start": [0.0, 0.0, 0.0],
            "load_average_after_timing": [0.0, 0.0, 0.0],
        },
        "entries": entries,
        "targets": {},
    }
    text = train_speed.markdown_threads(payload)
    assert "| lmn | 64 | 720 | 2 | 0.120 (0.120) | 0.040 (0.040) | 3.00x |" in text
    assert "| lmn | 64 | 720 | 0.080 (1) | 0.040 (2) | 2.00x | 0.130 (2) |" in text


def test_time_sizes_times_every_variant_at_each_thread_count() -> None:
    before = torch.get_num_threads()
    entries: list[dict] = []
    train_speed.time_sizes(entries, "cpu", (4,), (6,), 5, 5, (1, 2))
    assert sorted((e["model"], e["threads"]) for e in entries) == [
        ("lmn", 1),
        ("lmn", 2),
        ("mi_gru", 1),
        ("mi_gru", 2),
    ]
    assert all(e["rounds"] == 5 and e["bptt_s"] > 0 and e["feedback_s"] > 0 for e in entries)
    assert all(e["autograd_bptt_s"] > 0 for e in entries)
    assert torch.get_num_threads() == before  # the round-robin puts the count back


@pytest.mark.parametrize("name", ["mi_gru", "lmn"])
def test_the_timed_bptt_is_the_trainers_and_the_reference_is_autograd(name: str) -> None:
    """The BPTT column times the trainer's hand-written exact BPTT, the autograd column plain
    autograd through the model's loop: both must give the same gradients."""
    case = train_speed.make_case(name, 8, 12)
    model = case["model"]
    assert hand_written_bptt(model, case["x"])
    train_speed.step_fn("autograd_bptt", case)()
    autograd = [p.grad.clone() for p in model.parameters()]
    train_speed.step_fn("bptt", case)()
    for param, reference in zip(model.parameters(), autograd, strict=True):
        assert param.grad is not None
        assert torch.allclose(param.grad, reference, rtol=1e-4, atol=1e-6)


def test_autograd_bptt_is_also_taken_at_its_fastest_count() -> None:
    one, two = _entry("lmn", 1, 0.080, 0.050, 0.140), _entry("lmn", 2, 0.120, 0.040, 0.130)
    one["autograd_bptt_s"], two["autograd_bptt_s"] = 0.060, 0.052
    (best,) = train_speed.best_of_threads([one, two])
    assert (best["autograd_bptt_s"], best["autograd_bptt_threads"]) == (0.052, 2)
    assert best["speedup_vs_autograd"] == 1.3  # 0.052 / 0.040
