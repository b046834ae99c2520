"""Tests for pipelines/executor.py: per-series preprocessing + stationarity gate run locally, in a
spawn process pool and on a real local Ray give the artifacts of `pipelines.prepare`, bit for bit.

The reference is `prepare(config)` itself on the embedded synthetic plant (200 series of 300
points); every executor must produce the same `preprocessing.json` and `stationarity.json`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_configs import tiny_config

from forecaster.config import Config, PreprocessConfig, StationarityConfig, parse_config
from forecaster.errors import ConfigError, DataError
from forecaster.transform import PreprocessingSpec
from pipelines.executor import (
    Execution,
    SeriesPrepared,
    WorkerTraceback,
    prepare_series,
    preprocess_and_gate,
    run_per_series,
    split_series,
)
from pipelines.prepare import PreparedData, prepare
from pipelines.stationarity import GateDecision, decide, gate
from pipelines.train import evaluate_baselines

N_SERIES = 200
LENGTH = 300


def _config(tmp_path: Path, **stationarity: object) -> Config:
    return parse_config(
        {
            "name": "executor",
            "output_dir": str(tmp_path),
            "data": {
                "source": "synthetic",
                "synthetic": {"n_series": N_SERIES, "length": LENGTH, "seed": 11},
                "split": {"val_size": 24, "test_size": 24},
            },
            "window": {"lookback": 48, "horizon": 12},
            "preprocess": {"trend": "linear", "seasonality": "stl", "periods": [24]},
            "stationarity": {"d_max": 1, **stationarity},
        }
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, PreparedData]:
    """The local, whole-frame path: `prepare` on 200 synthetic series."""
    config = _config(tmp_path_factory.mktemp("executor"))
    return config, prepare(config)


def _artifacts(spec: PreprocessingSpec, decision: GateDecision) -> tuple[str, str]:
    return spec.model_dump_json(), json.dumps(decision.to_dict(), allow_nan=False)


def _run(
    reference: tuple[Config, PreparedData], execution: Execution, **kwargs: object
) -> tuple[PreprocessingSpec, GateDecision]:
    config, prepared = reference
    return preprocess_and_gate(
        split_series(prepared.data.frame),
        config.preprocess,
        config.stationarity,
        train_rows={uid: split.train.stop for uid, split in prepared.splits.items()},
        execution=execution,
        **kwargs,  # type: ignore[arg-type]
    )


def test_local_executor_reproduces_prepare(reference: tuple[Config, PreparedData]) -> None:
    _, prepared = reference
    spec, decision = _run(reference, "local")
    assert _artifacts(spec, decision) == _artifacts(prepared.spec, prepared.decision)
    assert list(spec.series) == list(prepared.spec.series)  # input order
    assert len(spec.series) == N_SERIES


def test_process_pool_is_bit_identical(reference: tuple[Config, PreparedData]) -> None:
    _, prepared = reference
    spec, decision = _run(reference, "processes", workers=2)
    assert _artifacts(spec, decision) == _artifacts(prepared.spec, prepared.decision)


@pytest.fixture
def local_ray() -> Iterator[object]:
    ray = pytest.importorskip("ray", reason="Ray is the optional extra [ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_local_ray_is_bit_identical(
    reference: tuple[Config, PreparedData], local_ray: object
) -> None:
    _, prepared = reference
    spec, decision = _run(reference, "ray", chunk_size=25)
    assert _artifacts(spec, decision) == _artifacts(prepared.spec, prepared.decision)
    # Per-series evaluation on the same Ray: the baselines' scores equal the local ones.
    assert evaluate_baselines(prepared, 12, execution="ray") == evaluate_baselines(prepared, 12)


def test_baselines_per_series_on_a_process_pool_equal_local(
    reference: tuple[Config, PreparedData],
) -> None:
    _, prepared = reference
    local = evaluate_baselines(prepared, 12)
    assert set(local) == {"repeat_last", "seasonal_naive"}
    assert local["repeat_last"]["n_windows"] > 0
    assert evaluate_baselines(prepared, 12, execution="processes", workers=2) == local


def test_remedy_refit_matches_prepare(tmp_path: Path) -> None:
    """Random walks fail at d=0: the gate differences once and every series is refitted."""
    rng = np.random.default_rng(5)
    ds = pd.date_range("2024-01-01", periods=LENGTH, freq="h")
    frame = pd.concat(
        pd.DataFrame({"unique_id": f"walk_{i}", "ds": ds, "y": np.cumsum(rng.normal(size=LENGTH))})
        for i in range(6)
    )
    path = tmp_path / "walks.csv"
    frame.to_csv(path, index=False)
    config = _config(tmp_path)
    prepared = prepare(config, data_path=path)
    assert (prepared.decision.method, prepared.decision.differences) == ("feedback", 1)
    spec, decision = _run((config, prepared), "processes", workers=2, chunk_size=2)
    assert _artifacts(spec, decision) == _artifacts(prepared.spec, prepared.decision)
    assert all(s.difference == 1 for s in spec.series.values())


def test_results_come_back_in_input_order(reference: tuple[Config, PreparedData]) -> None:
    config, prepared = reference
    frames = split_series(prepared.data.frame)[:12]
    shuffled = [frames[i] for i in np.random.default_rng(0).permutation(len(frames))]
    names = [str(f["unique_id"].iloc[0]) for f in shuffled]
    out = run_per_series(
        _fit_only(config), shuffled, execution="processes", workers=2, chunk_size=5
    )
    assert [p.unique_id for p in out] == names
    assert run_per_series(_fit_only(config), [], execution="processes") == []


def _fit_only(config: Config) -> Callable[[pd.DataFrame], SeriesPrepared]:
    return _stage(config.preprocess, config.stationarity)


def _stage(
    preprocess: PreprocessConfig, stationarity: StationarityConfig
) -> Callable[[pd.DataFrame], SeriesPrepared]:
    """The per-series stage as the pipeline passes it: a picklable partial."""
    return functools.partial(prepare_series, preprocess=preprocess, stationarity=stationarity)


@pytest.mark.parametrize("execution", ["local", "processes"])
def test_failure_names_the_series(tmp_path: Path, execution: Execution) -> None:
    config = _config(tmp_path)
    ds = pd.date_range("2024-01-01", periods=LENGTH, freq="h")
    rng = np.random.default_rng(1)
    frames = [
        pd.DataFrame({"unique_id": "fine", "ds": ds, "y": rng.normal(size=LENGTH)}),
        pd.DataFrame({"unique_id": "pump_7", "ds": ds, "y": np.full(LENGTH, 3.0)}),
    ]
    with pytest.raises(DataError, match="pump_7") as caught:
        run_per_series(_fit_only(config), frames, execution=execution, workers=2)
    assert "fine" not in caught.value.message


def test_unexpected_exception_names_the_series(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bad = pd.DataFrame({"unique_id": ["valve_3"] * 3, "ds": [1, 2, 3], "y": [1.0, 2.0, 3.0]})
    with pytest.raises(DataError, match="valve_3.*datetime64"):
        run_per_series(_fit_only(config), [bad], execution="processes", workers=1)
    with pytest.raises(RuntimeError, match="series 'valve_3' failed under execution 'local'"):
        run_per_series(len_of_missing_column, [bad], execution="local")


def len_of_missing_column(frame: pd.DataFrame) -> int:
    return len(frame["no_such_column"])


def test_decide_equals_gate_on_mixed_series() -> None:
    rng = np.random.default_rng(2)
    series = {f"noise_{i}": rng.normal(size=200) for i in range(4)}
    series["walk"] = np.cumsum(rng.normal(size=200))
    for config in (
        StationarityConfig(),
        StationarityConfig(min_pass_fraction=0.8),
        StationarityConfig(d_max=0, strict=True),
        StationarityConfig(remedy="none"),
    ):
        expected = gate(series, config)
        frames = [
            pd.DataFrame(
                {
                    "unique_id": name,
                    "ds": pd.date_range("2024-01-01", periods=200, freq="h"),
                    "y": values,
                }
            )
            for name, values in series.items()
        ]
        plain = parse_config(
            {"name": "d", "preprocess": {"trend": "none", "seasonality": "none"}}
        ).preprocess
        prepared = run_per_series(_stage(plain, config), frames, execution="local")
        got = decide({p.unique_id: p.reports for p in prepared}, config)
        assert got.method == expected.method
        assert got.differences == expected.differences
        assert got.reason == expected.reason
        assert got.pass_fraction == expected.pass_fraction
        assert got.failing == expected.failing
        assert {k: len(v) for k, v in got.reports.items()} == {
            k: len(v) for k, v in expected.reports.items()
        }


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="execution: 'dask'"):
        run_per_series(len, [], execution="dask")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="workers: 0"):
        run_per_series(len, [], execution="processes", workers=0)
    with pytest.raises(DataError, match="no 'unique_id' column"):
        split_series(pd.DataFrame({"y": [1.0]}))
    with pytest.raises(DataError, match="at least one series"):
        decide({}, StationarityConfig())


def test_ray_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    frames = [pd.DataFrame({"unique_id": ["a"], "ds": [pd.Timestamp(0)], "y": [1.0]})]
    with pytest.raises(ConfigError, match=r"execution: ray.*pip install '\.\[ray\]'"):
        run_per_series(len, frames, execution="ray", workers=1)


def test_train_rows_mapping_without_the_series_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ds = pd.date_range("2024-01-01", periods=LENGTH, freq="h")
    frame = pd.DataFrame({"unique_id": "pump_9", "ds": ds, "y": np.arange(LENGTH) % 24 * 1.0})
    with pytest.raises(DataError, match="train_rows has no entry for series 'pump_9'"):
        prepare_series(
            frame,
            preprocess=config.preprocess,
            stationarity=config.stationarity,
            train_rows={"other": 100},
        )


def test_prepare_with_processes_equals_local(tmp_path: Path) -> None:
    local = tiny_config(tmp_path)
    remote = local.model_copy(update={"execution": "processes", "workers": 2})
    a, b = prepare(local), prepare(remote)
    assert a.spec.model_dump_json() == b.spec.model_dump_json()
    assert json.dumps(a.decision.to_dict()) == json.dumps(b.decision.to_dict())


def _short_series(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ds = pd.date_range("2024-01-01", periods=40, freq="h")
    return pd.DataFrame({"unique_id": "a", "ds": ds, "y": rng.normal(size=40)})


def test_a_series_untestable_at_an_order_the_gate_never_needs_is_accepted_as_locally() -> None:
    """20 training rows pass the tests at d = 0 but are too short for them once differenced:
    the local gate stops at d = 0 and never differences; the per-series stage tested every
    order up front and raised. Where the gate does need that order, both raise the same error."""
    from pipelines.prepare import _preprocess_and_gate

    config = parse_config(
        {
            "name": "short",
            "preprocess": {"trend": "linear", "seasonality": "none"},
            "stationarity": {"d_max": 1},
        }
    )
    train_rows = {"a": 20}
    outcomes: dict[str, int] = {}
    for seed in range(40):
        frame = _short_series(seed)
        local = _outcome(functools.partial(_preprocess_and_gate, frame, config, train_rows))
        spread = _outcome(
            functools.partial(
                preprocess_and_gate,
                [frame],
                config.preprocess,
                config.stationarity,
                train_rows=train_rows,
            )
        )
        assert spread == local, seed
        outcomes[local[0]] = outcomes.get(local[0], 0) + 1
    assert outcomes.get("feedback", 0) > 0  # some seeds pass at d = 0


def _outcome(run: Callable[[], tuple[PreprocessingSpec, GateDecision]]) -> tuple[str, ...]:
    """(method, d, spec JSON, decision JSON) of a gate run, or ("error", message)."""
    try:
        spec, decision = run()
    except DataError as exc:
        return ("error", exc.message)
    return (decision.method, str(decision.differences), *_artifacts(spec, decision))


def _two_problems(frame: pd.DataFrame) -> int:
    raise DataError("series 'a': 2 problems: x; y", field="y", problems=["row 1: x", "row 2: y"])


def test_a_worker_error_keeps_its_problems_and_its_traceback() -> None:
    frame = pd.DataFrame({"unique_id": ["a"], "y": [1.0]})
    with pytest.raises(DataError) as caught:
        run_per_series(_two_problems, [frame], execution="local")
    assert caught.value.problems == ["row 1: x", "row 2: y"]
    assert isinstance(caught.value.__cause__, WorkerTraceback)
    assert "_two_problems" in str(caught.value.__cause__)
