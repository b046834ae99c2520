"""The NAB scorer of benchmarks/nab.py on hand-made cases whose scores follow from the rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

nab = load_benchmark("nab")
STANDARD = nab.PROFILES["standard"]
N_ROWS = 1000  # probationary period: 150 rows
WINDOWS = [(300, 349), (600, 699)]


def _file(name: str = "f.csv", n_rows: int = N_ROWS, windows=WINDOWS):
    return nab.label_file(name, n_rows, windows)


def _scores(*rows: int, n_rows: int = N_ROWS, value: float = 1.0) -> np.ndarray:
    score = np.zeros(n_rows)
    score[list(rows)] = value
    return score


def test_probationary_length_follows_nab_rule() -> None:
    assert nab.probationary_length(1000) == 150
    assert nab.probationary_length(4032) == 604
    assert nab.probationary_length(22695) == 750  # capped at 15% of 5,000


def test_scaled_sigmoid_values_from_the_whitepaper() -> None:
    assert float(nab.scaled_sigmoid(-1.0)) == pytest.approx(0.98661, abs=1e-5)
    assert float(nab.scaled_sigmoid(-0.5)) == pytest.approx(0.84828, abs=1e-5)
    assert float(nab.scaled_sigmoid(0.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(nab.scaled_sigmoid(1.0)) == pytest.approx(-0.98661, abs=1e-5)
    assert float(nab.scaled_sigmoid(3.0)) == -1.0


@pytest.mark.parametrize("profile", list(nab.PROFILES))
def test_perfect_detector_scores_100(profile: str) -> None:
    files = [_file("a.csv"), _file("b.csv", windows=[(500, 520)])]
    scores = [_scores(300, 600), _scores(500)]
    result = nab.score_corpus(files, scores)[profile]
    assert result.score == pytest.approx(100.0)
    assert result.raw == pytest.approx(3 * nab.PROFILES[profile].tp)


@pytest.mark.parametrize("profile", list(nab.PROFILES))
def test_null_detector_scores_0(profile: str) -> None:
    files = [_file("a.csv"), _file("b.csv", windows=[(500, 520)])]
    result = nab.score_corpus(files, [np.zeros(N_ROWS), np.zeros(N_ROWS)])[profile]
    assert result.score == pytest.approx(0.0)
    assert result.raw == pytest.approx(-3 * nab.PROFILES[profile].fn)


@pytest.mark.parametrize("profile", list(nab.PROFILES))
def test_single_detection_at_window_start_scores_the_tp_weight(profile: str) -> None:
    weights = nab.PROFILES[profile]
    file = _file(windows=[(300, 349)])
    outcome = nab.file_outcome(file, _scores(300), 0.5, weights)
    assert outcome.raw == pytest.approx(weights.tp)
    assert outcome.detected_windows == 1
    assert outcome.false_positives == 0


def test_only_the_earliest_detection_in_a_window_counts() -> None:
    file = _file(windows=[(300, 349)])
    early = nab.file_outcome(file, _scores(310), 0.5, STANDARD).raw
    both = nab.file_outcome(file, _scores(310, 300 + 45), 0.5, STANDARD).raw
    width = 50
    expected = nab.scaled_sigmoid(-(349 - 310 + 1) / width) / nab.scaled_sigmoid(-1.0)
    assert early == pytest.approx(float(expected))
    assert both == pytest.approx(early)
    assert early < STANDARD.tp


def test_missed_window_costs_the_fn_weight() -> None:
    low_fn = nab.PROFILES["reward_low_FN_rate"]
    file = _file(windows=[(300, 349)])
    assert nab.file_outcome(file, np.zeros(N_ROWS), 0.5, low_fn).raw == pytest.approx(-2.0)


def test_false_positive_far_from_windows_costs_the_fp_weight() -> None:
    file = _file(windows=[(600, 699)])
    for profile in nab.PROFILES.values():
        outcome = nab.file_outcome(file, _scores(200, 600), 0.5, profile)
        assert outcome.false_positives == 1
        assert outcome.raw == pytest.approx(profile.tp - profile.fp)


def test_false_positive_just_after_a_window_costs_less() -> None:
    file = _file(windows=[(300, 349)])
    right_after = nab.file_outcome(file, _scores(300, 355), 0.5, STANDARD).raw - STANDARD.tp
    far_after = nab.file_outcome(file, _scores(300, 900), 0.5, STANDARD).raw - STANDARD.tp
    position = (355 - 349) / (50 - 1)
    assert right_after == pytest.approx(STANDARD.fp * float(nab.scaled_sigmoid(position)))
    assert -STANDARD.fp < right_after < 0
    assert far_after == pytest.approx(-STANDARD.fp)


def test_detections_in_the_probationary_period_are_ignored() -> None:
    file = _file(windows=[(300, 349)])
    outcome = nab.file_outcome(file, _scores(10, 100, 300), 0.5, STANDARD)
    assert outcome.false_positives == 0
    assert outcome.raw == pytest.approx(STANDARD.tp)


def test_window_inside_the_probationary_period_is_not_counted() -> None:
    file = _file(windows=[(20, 40), (300, 349)])
    assert file.scored_windows == [1]
    result = nab.score_corpus([file], [_scores(300)])["standard"]
    assert result.null == pytest.approx(-1.0)
    assert result.score == pytest.approx(100.0)


def test_sweep_matches_scoring_at_every_threshold() -> None:
    rng = np.random.default_rng(0)
    files = [_file("a.csv"), _file("b.csv", windows=[(400, 450), (800, 850)])]
    scores = [np.round(rng.random(N_ROWS), 2) for _ in files]  # ties on purpose
    for profile in nab.PROFILES.values():
        sweep = nab.sweep(files, scores, profile)
        assert sweep.raw_scores[0] == pytest.approx(sweep.null_score)
        for threshold, raw in zip(sweep.thresholds[1:], sweep.raw_scores[1:], strict=True):
            direct = sum(
                nab.file_outcome(f, s, threshold, profile).raw
                for f, s in zip(files, scores, strict=True)
            )
            assert raw == pytest.approx(direct)


def test_one_threshold_is_optimised_over_the_corpus() -> None:
    # File a needs threshold <= 0.6 to find its window; file b has an FP at 0.7. Both at 0.6:
    # 2 windows found, 1 FP (1 + 1 - 0.11) beats 0.7 alone (1 found, 1 missed, 1 FP).
    files = [_file("a.csv", windows=[(300, 349)]), _file("b.csv", windows=[(300, 349)])]
    scores = [_scores(300, value=0.6), _scores(300, 800, value=0.9)]
    scores[1][800] = 0.7
    result = nab.score_corpus(files, scores)["standard"]
    assert result.threshold == pytest.approx(0.6)
    assert result.raw == pytest.approx(2.0 - 0.11)
    expected = 100 * (2.0 - 0.11 + 2.0) / 4.0
    assert result.score == pytest.approx(expected)


def test_windows_must_be_ordered_and_inside_the_file() -> None:
    with pytest.raises(ValueError, match="window 1"):
        nab.label_file("f.csv", N_ROWS, [(300, 349), (320, 400)])
    with pytest.raises(ValueError, match="window 0"):
        nab.label_file("f.csv", N_ROWS, [(900, 1200)])


def test_scores_must_cover_every_row() -> None:
    with pytest.raises(ValueError, match="999 scores for 1000 rows"):
        nab.sweep([_file()], [np.zeros(N_ROWS - 1)], STANDARD)


def test_corpus_files_have_windows_on_their_rows() -> None:
    if not nab.NAB_DIR.is_dir():
        pytest.skip(f"NAB data not found at {nab.NAB_DIR}")
    corpus = nab.load_corpus()
    assert len(corpus) == 25
    assert sum(len(f.scored_windows) for _, f in corpus) == 39
    assert math.isclose(nab.normalised(-39.0 + 1.0 + 1.0, -39.0, 39.0), 100 * 2 / 78, rel_tol=1e-12)


def test_detect_file_scores_every_row_on_rows_and_on_the_time_grid() -> None:
    path = nab.NAB_DIR / "realTraffic" / "speed_7578.csv"  # 1,127 rows with gaps in time
    if not path.is_file():
        pytest.skip(f"NAB data not found at {path}")
    probation = nab.probationary_length(1127)
    for on_grid in (False, True):
        result = nab.detect_file(path, probation, on_grid)
        assert result.score.shape == (1127,)
        assert (result.score[:probation] == 0).all()
        assert np.isfinite(result.score).all()
