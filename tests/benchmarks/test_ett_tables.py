"""The 3% target's table in benchmarks/ett.py's markdown, from the summary rows."""

from __future__ import annotations

from benchmark_scripts import load_benchmark

ett = load_benchmark("ett")


def _row(dataset: str, horizon: int, model: str, method: str, mse: float) -> dict:
    return {
        "dataset": dataset,
        "horizon": horizon,
        "model": model,
        "method": method,
        "test_mse_mean": mse,
        "val_mse_mean": mse,
    }


def test_ratio_table_has_a_row_per_variant_and_marks_misses() -> None:
    rows = [
        _row("ETTm1", 96, "gru", "bptt", 0.030),
        _row("ETTm1", 96, "gru", "feedback", 0.032),  # 1.067: missed
        _row("ETTh1", 96, "gru", "bptt", 0.064),
        _row("ETTh1", 96, "gru", "feedback", 0.064),
        _row("ETTh1", 96, "gru", "feedback-matrix", 0.0656),  # 1.025
        _row("ETTh1", 192, "lmn", "feedback", 0.09),  # no BPTT row: no ratio
    ]
    table = ett.ratio_table(ett.targets(rows, {})["feedback_within_3pct_of_bptt"])
    header = next(line for line in table if line.startswith("| variant"))
    assert header == "| variant | ETTh1 96 | ETTm1 96 | within 3% |"
    body = {line.split(" | ")[0].removeprefix("| "): line for line in table if "of" in line}
    assert body["gru"] == "| gru | 1.000 | **1.067** | 1 of 2 |"
    assert body["gru-matrix"] == "| gru-matrix | 1.025 | – | 1 of 1 |"
    assert "lmn" not in body


def test_ratio_table_is_empty_without_pairs() -> None:
    assert ett.ratio_table({}) == []
