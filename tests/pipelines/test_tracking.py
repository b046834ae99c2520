"""MLflow tracking and registry against a real `mlflow server` on 127.0.0.1 and the embedded store.

No mocks: the module `server` fixture (tests/pipelines/conftest.py) starts `mlflow server`
(sqlite backend, served artifacts) and, while it boots (about 25 s on a busy 2-core machine),
tiny models train and the embedded-store test runs; the first use waits for `/health`, and
teardown always stops the server's process group.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow_server import Server, free_port
from tiny_configs import tiny_config

from forecaster.config import Config
from forecaster.errors import TrackingError
from forecaster.inference import open_session
from forecaster.transform import PreprocessingSpec
from pipelines.prepare import PreparedData, prepare
from pipelines.tracking import (
    CHAMPION,
    FALLBACK,
    LoggedCandidate,
    RetrainRun,
    evaluation_window,
    flatten_config,
    list_versions,
    open_tracking,
    promote,
    resolve_tracking,
    rollback,
    show,
)
from pipelines.train import (
    TrainOutcome,
    evaluate_baselines,
    evaluate_session,
    model_inputs,
    run_training,
    summary,
)

pytestmark = pytest.mark.integration


def _config(out: Path, name: str = "tiny", **train: object) -> Config:
    return tiny_config(
        out,
        name=name,
        train={
            "epochs": 2,
            "batch_size": 64,
            "stride": 2,
            "max_windows": 128,
            "device": "cpu",
            **train,
        },
    )


@dataclass(frozen=True)
class Trained:
    """The tiny config, its prepared data and two models trained on it (good and weak)."""

    config: Config
    prepared: PreparedData
    good: TrainOutcome
    weak: TrainOutcome


def _weak_config(config: Config) -> Config:
    return _config(config.output_dir, epochs=1, lr=1e-6)


@pytest.fixture(scope="module")
def trained(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Trains while the server boots (the `server` argument starts it first)."""
    out = tmp_path_factory.mktemp("trained")
    config = _config(out)
    prepared = prepare(config)
    good = run_training(config, method="feedback", prepared=prepared, resume=False)
    weak = run_training(
        _weak_config(config), method="bptt", prepared=prepared, resume=False, out_dir=out / "weak"
    )
    assert weak.evaluations["test"]["mse"] > good.evaluations["test"]["mse"]
    return Trained(config, prepared, good, weak)


@dataclass(frozen=True)
class Retrain:
    """One retrain logged on the server: parent run, candidates and decisions."""

    uri: str
    parent_id: str
    candidates: dict[str, LoggedCandidate]
    decisions: dict[str, Any]
    config: Config
    prepared: PreparedData


def _train_and_log(
    run: RetrainRun, trained: Trained, config: Config, weak: bool, role: str
) -> LoggedCandidate:
    """A nested run fed by a real training (so epoch events flow), then logged."""
    tracker = run.child(role)
    outcome = run_training(
        _weak_config(config) if weak else config,
        method="bptt" if weak else "feedback",
        prepared=trained.prepared,
        resume=False,
        callbacks=[tracker],
        out_dir=config.output_dir / role,
    )
    return run.log_training(tracker, config, trained.prepared, outcome, role=role)


def _log(run: RetrainRun, trained: Trained, config: Config, weak: bool) -> LoggedCandidate:
    """A nested run for a model trained earlier (no epoch events)."""
    outcome = trained.weak if weak else trained.good
    return run.log_training(
        run.child("feedback"), config, trained.prepared, outcome, role="feedback"
    )


@pytest.fixture(scope="module")
def retrain(server: Server, trained: Trained) -> Retrain:
    """A whole retrain against the server: data, both models, baselines, registry."""
    config = trained.config
    tracking = open_tracking(config, uri=server.uri)
    with tracking.start_retrain("retrain-test", system_metrics=False) as run:
        run.log_data(config, trained.prepared)
        candidates = {
            "feedback": _train_and_log(run, trained, config, False, "feedback"),
            "bptt": _train_and_log(run, trained, config, True, "bptt"),
        }
        run.log_baselines(evaluate_baselines(trained.prepared, config.window.horizon))
        horizon = config.window.horizon
        decisions = {
            CHAMPION: run.register_and_promote(
                candidates["feedback"], CHAMPION, trained.prepared, horizon
            ),
            FALLBACK: run.register_and_promote(
                candidates["bptt"], FALLBACK, trained.prepared, horizon
            ),
        }
    return Retrain(server.uri, run.run_id, candidates, decisions, config, trained.prepared)


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found |= _artifacts(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


# --------------------------------------------------------------------------- pure parts


def test_tracking_uri_argument_beats_environment_beats_embedded(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://tracking.example:5000"}
    assert resolve_tracking(tmp_path, "http://x:1", env).uri == "http://x:1"
    assert resolve_tracking(tmp_path, None, env).source == "environment"
    embedded = resolve_tracking(tmp_path, None, {}, experiment="demo")
    assert embedded.uri == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    assert embedded.artifact_location == (tmp_path.resolve() / "mlartifacts" / "demo").as_uri()


def test_flatten_config_uses_dotted_yaml_names(tmp_path: Path) -> None:
    flat = flatten_config(_config(tmp_path))
    assert flat["train.lr"] == "0.001"
    assert flat["model.name"] == "gru"
    assert flat["data.synthetic.n_series"] == "2"
    assert flat["preprocess.periods"] == "[24]"
    assert all(len(v) <= 6000 for v in flat.values())


def test_unreachable_server_is_a_tracking_error_naming_the_uri(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        open_tracking(_config(tmp_path), uri=uri)
    with pytest.raises(TrackingError, match="unreachable"):
        list_versions("tiny", uri=uri)
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- embedded default


def test_embedded_default_tracks_and_registers_beside_the_outputs(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tmp_path / "out", name="tiny_embedded")
    tracking = open_tracking(config)
    assert tracking.uri == f"sqlite:///{(tmp_path / 'out').resolve() / 'mlruns.db'}"
    with tracking.start_retrain(system_metrics=True) as run:
        candidate = _log(run, trained, config, weak=False)
        decision = run.register_and_promote(
            candidate, CHAMPION, trained.prepared, config.window.horizon
        )
    assert decision.promoted
    # A champion scored on other test windows is re-scored on the candidate's, from its
    # registered ONNX model and its own preprocessing.json.
    client = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
    client.set_model_version_tag(config.name, "1", "eval_window", "older-data")
    with tracking.start_retrain() as run:
        weak = _log(run, trained, config, weak=True)
        kept = run.register_and_promote(weak, CHAMPION, trained.prepared, config.window.horizon)
    assert not kept.promoted
    assert kept.previous_version == "1"
    assert kept.previous_score == pytest.approx(candidate.test_mse, rel=1e-6)
    assert (tmp_path / "out" / "mlruns.db").is_file()
    assert any((tmp_path / "out" / "mlartifacts" / "tiny_embedded").rglob("model.onnx"))
    output_dir = config.output_dir
    assert show(config.name, CHAMPION, output_dir=output_dir).version == "1"
    with pytest.raises(TrackingError, match="no earlier version"):
        rollback(config.name, CHAMPION, output_dir=output_dir)


def test_a_series_added_since_the_champion_promotes_the_candidate_that_covers_it(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion's preprocessing knows 2 series, the config now has 3: it cannot be scored
    on the new test windows (that raised a DataError and failed every later retrain); the
    candidate, which forecasts all 3, is promoted and the reason names the new series."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tmp_path / "out", name="tiny_grown")
    tracking = open_tracking(config)
    with tracking.start_retrain() as run:
        first = run.register_and_promote(
            _log(run, trained, config, weak=False), CHAMPION, trained.prepared, 6
        )
    assert first.promoted
    grown = config.model_copy(
        update={
            "data": config.data.model_copy(
                update={"synthetic": config.data.synthetic.model_copy(update={"n_series": 3})}
            )
        }
    )
    prepared = prepare(grown)
    assert len(prepared.splits) == 3
    outcome = run_training(
        _weak_config(grown), method="bptt", prepared=prepared, resume=False, out_dir=tmp_path / "w"
    )
    client = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
    client.set_model_version_tag(config.name, "1", "eval_window", "older-data")
    with tracking.start_retrain() as run:
        candidate = run.log_training(run.child("bptt"), grown, prepared, outcome, role="bptt")
        decision = run.register_and_promote(candidate, CHAMPION, prepared, 6)
    assert decision.promoted
    assert decision.previous_version == "1"
    assert decision.previous_score is None
    unknown = [uid for uid in prepared.splits if uid not in trained.prepared.splits]
    assert unknown
    assert f"cannot forecast series {unknown}" in decision.reason
    assert show(config.name, CHAMPION, output_dir=config.output_dir).version == "2"


def test_the_evaluation_key_changes_with_the_training_values_that_scale_the_mse(
    trained: Trained,
) -> None:
    """Test rows unchanged, training history rescaled (backfilled or corrected): the z-scored
    test MSE changes, so a stored score must not be reused."""
    prepared = trained.prepared
    frame = prepared.data.frame.copy()
    for uid, split in prepared.splits.items():
        rows = frame.index[frame["unique_id"] == uid][split.train]
        frame.loc[rows, "y"] = frame.loc[rows, "y"] * 3.0
    rescaled = PreparedData(
        data=dataclasses.replace(prepared.data, frame=frame),
        splits=prepared.splits,
        spec=prepared.spec,
        decision=prepared.decision,
    )
    same = evaluation_window(prepared, 24, 6)
    assert same == evaluation_window(trained.prepared, 24, 6)
    assert evaluation_window(rescaled, 24, 6) != same


# --------------------------------------------------------------------------- real server


def test_retrain_logs_parent_and_nested_runs(retrain: Retrain) -> None:
    client = _client(retrain.uri)
    parent = client.get_run(retrain.parent_id)
    params = parent.data.params
    assert params["train.lr"] == "0.001"
    assert params["window.lookback"] == "24"
    assert len(params["data.sha256"]) == 64
    assert params["gate.method"] == retrain.prepared.decision.method
    assert params["gate.differences"] == str(retrain.prepared.decision.differences)
    first = next(iter(retrain.prepared.data.rows_per_series))
    assert params[f"data.series.{first}"].startswith("720 rows 2024-01-01T00:00:00..")
    assert parent.data.tags["promotion.champion.promoted"] == "True"
    assert parent.data.tags["promotion.fallback.previous_version"] == "None"
    assert {
        "data_fingerprint.json",
        "stationarity.json",
        "promotions/champion_v1.json",
        "promotions/fallback_v2.json",
    } <= _artifacts(client, retrain.parent_id)

    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{retrain.parent_id}'",
    )
    roles = {run.data.tags["role"]: run for run in children}
    assert set(roles) == {
        "feedback",
        "bptt",
        "baseline:repeat_last",
        "baseline:seasonal_naive",
    }
    assert all(run.info.status == "FINISHED" for run in children)
    for role in ("feedback", "bptt"):
        run = roles[role]
        metrics = run.data.metrics
        for key in ("test_mse", "test_mae", "test_n_windows", "test_mase", "test_smape"):
            assert np.isfinite(metrics[key]), key
        for key in ("test_coverage_80", "test_coverage_95"):
            assert 0 <= metrics[key] <= 1, key
        assert metrics["val_mse"] > 0
        assert metrics["train_wall_seconds"] > 0
        assert metrics["test_n_windows"] == 2 * (72 - 6 + 1)
        assert run.data.tags["method"] in ("feedback", "bptt")
        assert run.data.tags["device"] == "cpu"
        assert run.data.tags["model_name"] == "gru"
        assert run.data.params["method"] == run.data.tags["method"]
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        for key in ("val_loss", "lr", "epoch_seconds", "peak_memory_mb"):
            assert client.get_metric_history(run.info.run_id, key), key
        assert {
            "plots/loss_curve.png",
            "plots/forecast_vs_actual.png",
            "bundle/preprocessing.json",
            "bundle/metadata.json",
            "bundle/calibration.json",
        } <= _artifacts(client, run.info.run_id)
    if roles["feedback"].data.tags["method"] == "feedback":
        assert client.get_metric_history(roles["feedback"].info.run_id, "spectral_radius")
        gate = client.get_metric_history(roles["feedback"].info.run_id, "gate_cosine")
        assert gate
        assert gate[0].step == 0
        assert -1 <= gate[0].value <= 1
    baseline = roles["baseline:seasonal_naive"].data.metrics
    assert baseline["test_n_windows"] == 2 * (72 - 6 + 1)
    assert baseline["test_mse"] > 0
    logged = client.get_logged_model(retrain.candidates["feedback"].model_uri.split("/")[-1])
    assert logged.source_run_id == roles["feedback"].info.run_id


def test_champion_from_the_registry_reproduces_the_logged_test_mse(
    retrain: Retrain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `models:/` downloads resolve the registry from the environment (not `registry_uri`).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", retrain.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", retrain.uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{retrain.config.name}@champion", dst_path=str(tmp_path)
        )
    )
    model_file = next(local.rglob("model.onnx"))
    spec = PreprocessingSpec.load(next(local.rglob("preprocessing.json")))
    prepared = PreparedData(
        retrain.prepared.data, retrain.prepared.splits, spec, retrain.prepared.decision
    )
    score = summary(
        evaluate_session(
            open_session(model_file, device="cpu"),
            prepared,
            model_inputs(prepared),
            retrain.config.window.horizon,
            "test",
        )
    )
    candidate = retrain.candidates["feedback"]
    logged = _client(retrain.uri).get_run(candidate.run_id).data.metrics["test_mse"]
    assert score["mse"] == pytest.approx(logged, rel=1e-6)
    champion = show(retrain.config.name, CHAMPION, uri=retrain.uri)
    assert champion.run_id == candidate.run_id
    assert champion.tags["verified"] == "true"
    assert show(retrain.config.name, FALLBACK, uri=retrain.uri).run_id == (
        retrain.candidates["bptt"].run_id
    )


def test_worse_candidate_keeps_champion_better_moves_it_and_rollback_restores(
    server: Server, trained: Trained
) -> None:
    config = trained.config.model_copy(update={"name": "tiny_promotion"})
    tracking = open_tracking(config, uri=server.uri)
    horizon = config.window.horizon
    with tracking.start_retrain("promotion") as run:
        weak = _log(run, trained, config, weak=True)
        first = run.register_and_promote(weak, CHAMPION, trained.prepared, horizon)
        good = _log(run, trained, config, weak=False)
        better = run.register_and_promote(good, CHAMPION, trained.prepared, horizon)
        worse = run.register_and_promote(weak, CHAMPION, trained.prepared, horizon)
    assert first.promoted
    assert first.previous_version is None
    assert better.promoted
    assert better.previous_version == first.candidate_version
    assert better.previous_score == pytest.approx(weak.test_mse)
    assert not worse.promoted
    assert worse.previous_version == better.candidate_version
    assert worse.candidate_score == pytest.approx(weak.test_mse)
    assert worse.previous_score == pytest.approx(good.test_mse)
    assert show(config.name, CHAMPION, uri=server.uri).version == better.candidate_version

    client = _client(server.uri)
    tags = client.get_run(run.run_id).data.tags
    assert tags["promotion.champion.candidate_score"] == repr(weak.test_mse)
    assert tags["promotion.champion.previous_score"] == repr(good.test_mse)
    assert tags["promotion.champion.promoted"] == "False"
    assert len(_artifacts(client, run.run_id)) == 3  # one record per decision

    restored = rollback(config.name, CHAMPION, uri=server.uri)
    assert restored.version == first.candidate_version
    assert CHAMPION in restored.aliases
    again = promote(config.name, better.candidate_version, CHAMPION, uri=server.uri)
    assert CHAMPION in again.aliases
    versions = list_versions(config.name, uri=server.uri)
    assert [v.version for v in versions] == ["3", "2", "1"]
