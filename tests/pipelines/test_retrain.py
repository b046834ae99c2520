"""`forecaster retrain`: lock, budget, idempotence, exit codes and crash safety.

The lock and budget parts run in-process; the job runs as the real `forecaster retrain` command
against a real `mlflow server` (the module `server` fixture of conftest.py), killed with SIGKILL
at named stages through the `FORECASTER_TEST_KILL_AT` hook, stopped with SIGTERM, and run twice
at once for the lock.
Tiny data and models: one job is about 10 s on two busy cores, most of it imports.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime
import pytest
import typer
import yaml
from mlflow import MlflowClient
from mlflow_server import Server
from typer.testing import CliRunner

from forecaster.cli import app
from forecaster.config import load_config
from forecaster.errors import ConfigError, DataError, ExportError, TrackingError
from pipelines.retrain import (
    LOCK_FILE,
    STAGES,
    BudgetExceeded,
    Deadline,
    ExitCode,
    LockHeld,
    LockInfo,
    _DeadlineCallback,
    _read_state,
    _tracking_key,
    exit_code,
    parse_duration,
    retrain_lock,
)
from pipelines.tracking import CHAMPION, FALLBACK, list_versions, show

REPO = Path(__file__).resolve().parents[2]
FORECASTER = Path(sys.executable).with_name("forecaster")
# A tiny job: two synthetic series, a GRU with 8 units, two short epochs.
CONFIG_YAML = """\
name: {name}
output_dir: {output_dir}
data:
  source: synthetic
  synthetic: {{n_series: 2, length: 720, seed: 1}}
  split: {{val_size: 72, test_size: 72}}
window: {{lookback: 24, horizon: 6}}
preprocess: {{trend: linear, seasonality: stl, periods: [24]}}
model: {{name: gru, hidden_size: 8}}
train: {{epochs: 2, batch_size: 64, stride: 2, max_windows: 128, device: cpu}}
"""
# The first champion is weak, so that later (killed) retrains have a better candidate to promote.
WEAK = ["--set", "train.lr=1e-6", "--set", "train.epochs=1"]
KILL_ENV = "FORECASTER_TEST_KILL_AT"


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "seconds"), [("3600", 3600), ("3600s", 3600), ("90m", 5400), ("1h30m", 5400)]
)
def test_parse_duration_reads_scheduler_style_budgets(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "-5s", "0s", "h", "1.5.2s"])
def test_parse_duration_rejects_what_is_not_a_positive_duration(text: str) -> None:
    with pytest.raises(ConfigError, match="--budget: .* is not a positive duration"):
        parse_duration(text)


def test_each_failure_kind_has_its_own_exit_code() -> None:
    codes = [
        exit_code(error)
        for error in (
            LockHeld("x"),
            BudgetExceeded("x"),
            TrackingError("x"),
            ExportError("x"),
            DataError("x"),
            ConfigError("x"),
            RuntimeError("x"),
        )
    ]
    assert codes == [3, 4, 5, 6, 2, 2, 1]
    assert len(set(codes)) == 6


def test_deadline_names_where_the_budget_ran_out() -> None:
    Deadline(None, started=time.monotonic() - 1e6).check("before log")
    Deadline(60.0).check("before log")
    with pytest.raises(BudgetExceeded, match=r"time budget 1 s exceeded before log \(5 s"):
        Deadline(1.0, started=time.monotonic() - 5).check("before log")


def test_budget_stops_training_at_the_first_step_past_it() -> None:
    """Mid-epoch: the trainer's step event checks the budget, not only the epoch end."""
    import numpy as np

    from forecaster.config import TrainConfig
    from forecaster.models.registry import build
    from forecaster.training.trainer import train
    from forecaster.training.windows import ForkingWindows

    series = [np.sin(np.arange(400) / 4.0)]
    train_w = ForkingWindows(series, lookback=16, horizon=4, rows=slice(0, 300))
    val_w = ForkingWindows(series, lookback=16, horizon=4, rows=slice(284, 400))
    model = build("gru", input_size=1, hidden_size=4, horizon=4)
    config = TrainConfig(method="bptt", epochs=3, batch_size=8, device="cpu")
    spent = Deadline(1.0, started=time.monotonic() - 5)
    with pytest.raises(BudgetExceeded, match="during train_bptt at optimiser step 1 "):
        train(model, train_w, val_w, config, callbacks=[_DeadlineCallback(spent, "train_bptt")])


def _write_lock(path: Path, **changes: object) -> LockInfo:
    info = LockInfo(
        pid=os.getpid(),
        host=socket.gethostname(),
        started_at="2026-01-01T00:00:00Z",
        started_unix=time.time(),
        config="configs/x.yaml",
        process_started=None,
    )
    info = LockInfo(**{**asdict(info), **changes})  # type: ignore[arg-type]
    path.write_text(json.dumps(asdict(info)))
    return info


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # a password that spells the user and the database (the docker-compose default)
        ("postgresql://mlflow:mlflow@db:5432/mlflow", "postgresql://stage:stage@db:5432/stage"),
        ("http://u:a@ha:5000", "http://u:b@hb:5000"),  # one that spells part of the host
        ("http://u:5000@h:5000", "http://u:6000@h:6000"),  # ... or the port
        ("mongodb://u:p@h/db?authSource=a", "mongodb://u:p@h/db?authSource=b"),
        ("http://u:p@h:5000", "http://v:p@h:5000"),  # another user
    ],
)
def test_different_tracking_stores_have_different_keys(one: str, other: str) -> None:
    assert _tracking_key(one) != _tracking_key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://ops:mlflow@mlflow.internal:5000", "http://ops:rotated@mlflow.internal:5000"),
        ("https://old-token@mlflow.example.com", "https://new-token@mlflow.example.com"),
    ],
)
def test_a_rotated_password_or_token_is_the_same_store(one: str, other: str) -> None:
    assert _tracking_key(one) == _tracking_key(other)


def test_a_state_file_with_the_uri_in_clear_is_read_and_rewritten_without_it(
    tmp_path: Path,
) -> None:
    raw = "postgresql://mlflow:s3cret-pw@db:5432/mlflow?token=tok-123"
    record = {
        "data_sha256": "d" * 64,
        "config_hash": "c" * 64,
        "tracking_uri": raw,
        "model_name": "plant",
        "champion_version": "3",
        "fallback_version": "4",
        "run_id": "r1",
        "finished_at": "2026-12-01T00:00:00+00:00",
    }
    path = tmp_path / "state.json"
    path.write_text(json.dumps(record))
    state = _read_state(path)
    assert state is not None
    assert state.tracking_key == _tracking_key(raw)  # still up to date against the same store
    assert (state.champion_version, state.run_id) == ("3", "r1")
    text = path.read_text()
    assert "s3cret-pw" not in text
    assert "tok-123" not in text
    assert json.loads(text)["tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow?token=***"
    assert _read_state(path) == state
    path.write_text("{not json")
    assert _read_state(path) is None


def test_live_lock_refuses_naming_pid_host_and_age(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    with retrain_lock(path, config_label="a.yaml") as held:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        pattern = rf"held by pid {os.getpid()} on {socket.gethostname()} since .* s ago"
        with pytest.raises(LockHeld, match=pattern), retrain_lock(path, config_label="b.yaml"):
            pass
        assert json.loads(path.read_text())["started_at"] == held.started_at
    assert not path.exists()


def test_lock_of_a_dead_or_recycled_pid_is_replaced_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for changes in ({"pid": dead.pid}, {"process_started": 1.0}):
        _write_lock(path, **changes)
        with retrain_lock(path, config_label="a.yaml") as info:
            assert info.pid == os.getpid()
        assert "replacing stale retrain lock" in caplog.text
        caplog.clear()
    assert not path.exists()


def test_lock_from_another_host_is_stale_only_past_the_max_age(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    _write_lock(path, host="other-host", pid=1)
    with (
        pytest.raises(LockHeld, match="pid 1 on other-host"),
        retrain_lock(path, config_label="a.yaml", max_age_s=3600),
    ):
        pass
    _write_lock(path, host="other-host", pid=1, started_unix=time.time() - 7200)
    with retrain_lock(path, config_label="a.yaml", max_age_s=3600) as info:
        assert info.host == socket.gethostname()


def test_lock_appears_with_its_holder_already_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A competing retrain reads the lock the moment it exists, so it must never see it empty:
    the lock's name comes into being by a hard link to a file already holding the holder."""
    path = tmp_path / LOCK_FILE
    real_link = os.link
    seen: list[tuple[bool, dict[str, Any]]] = []  # (lock existed, what the linked file held)

    def link(source: Any, target: Any) -> None:
        seen.append((path.exists(), json.loads(Path(source).read_text())))
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    with retrain_lock(path, config_label="a.yaml") as info:
        assert seen == [(False, asdict(info))]
        assert json.loads(path.read_text()) == asdict(info)
        with (
            pytest.raises(LockHeld, match=f"pid {os.getpid()} on "),
            retrain_lock(path, config_label="b.yaml"),
        ):
            pass
    assert [existed for existed, _ in seen] == [False, True]
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_lock_without_hard_links_is_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(source: Any, target: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / LOCK_FILE
    with retrain_lock(path, config_label="a.yaml") as info:
        assert json.loads(path.read_text()) == asdict(info)
        with (
            pytest.raises(LockHeld, match=f"pid {os.getpid()} on "),
            retrain_lock(path, config_label="b.yaml"),
        ):
            pass
    assert list(tmp_path.iterdir()) == []


def test_unreadable_lock_counts_as_held_while_young_and_stale_when_old(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    path.write_text("")
    with (
        pytest.raises(LockHeld, match="a process that is starting"),
        retrain_lock(path, config_label="a.yaml"),
    ):
        pass
    old = time.time() - 120
    os.utime(path, (old, old))
    with retrain_lock(path, config_label="a.yaml"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


# --------------------------------------------------------------------------- deploy examples


def _cronjob() -> dict[str, Any]:
    manifests = yaml.safe_load_all((REPO / "configs" / "deploy" / "k8s-cronjob.yaml").read_text())
    return next(m for m in manifests if m["kind"] == "CronJob")


def _deploy_commands() -> dict[str, list[str]]:
    """The command each scheduler example runs, as argv."""
    deploy = REPO / "configs" / "deploy"
    cron = [
        line
        for line in (deploy / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(cron) == 1
    cron_argv = shlex.split(cron[0].split(None, 5)[5])
    redirect = next(i for i, a in enumerate(cron_argv) if a.startswith((">", "2>")))
    service = (deploy / "forecaster-retrain.service").read_text().splitlines()
    exec_start = [line.split("=", 1)[1] for line in service if line.startswith("ExecStart=")]
    assert len(exec_start) == 1
    container = _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    rayjob = yaml.safe_load((deploy / "kuberay-rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob"
    return {
        "crontab": cron_argv[:redirect],
        "systemd": shlex.split(exec_start[0]),
        "k8s": [*container["command"], *container.get("args", [])],
        "kuberay": shlex.split(rayjob["spec"]["entrypoint"]),
    }


def test_k8s_cronjob_forbids_overlap_and_keeps_state_on_a_volume() -> None:
    spec = _cronjob()["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "forecaster:latest"
    assert any(env["name"] == "MLFLOW_TRACKING_URI" for env in container["env"])
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert claims
    assert claims <= set(mounted)
    argv = [*container["command"], *container.get("args", [])]
    output_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir="))
    assert any(output_dir.startswith(mounted[name]) for name in claims)


@pytest.mark.parametrize("scheduler", ["crontab", "systemd", "k8s", "kuberay"])
def test_scheduler_examples_run_a_real_retrain_of_a_repo_config(scheduler: str) -> None:
    argv = _deploy_commands()[scheduler]
    start = next(i for i, a in enumerate(argv) if Path(a).name == "forecaster")
    assert "retrain" in argv[start + 1 :]
    options = argv[argv.index("retrain") + 1 :]
    config = Path(options[options.index("--config") + 1])
    in_repo = REPO / "configs" / config.name
    assert config.parts[-2] == "configs"
    assert in_repo.is_file(), config
    options[options.index("--config") + 1] = str(in_repo)
    group = typer.main.get_command(app)
    command = group.commands["retrain"]  # type: ignore[attr-defined]
    context = command.make_context("retrain", options)
    assert context.params["config"] == in_repo
    assert parse_duration(context.params["budget"]) > 0
    config = load_config(in_repo, context.params["overrides"] or [])  # the overrides are valid
    if scheduler == "kuberay":  # the per-series stages go to the Ray cluster
        assert config.execution == "ray"


# --------------------------------------------------------------------------- the real job


def _config_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(CONFIG_YAML.format(name=name, output_dir=folder / "out"))
    return path


def _retrain(
    config: Path, uri: str, *extra: str, kill_at: str | None = None
) -> subprocess.Popen[str]:
    """Start `forecaster retrain` as its own process (SIGKILL must hit only it)."""
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, "MLFLOW_TRACKING_URI")}
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.Popen(
        [str(FORECASTER), "retrain", "--config", str(config), "--tracking-uri", uri, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@dataclass(frozen=True)
class Finished:
    """A finished `forecaster retrain` process."""

    pid: int
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


def _wait(process: subprocess.Popen[str], timeout_s: float = 240) -> Finished:
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"forecaster retrain did not finish in {timeout_s} s: {err[-2000:]}")
    return Finished(process.pid, process.returncode, out, err)


def _run(config: Path, uri: str, *extra: str, kill_at: str | None = None) -> Finished:
    return _wait(_retrain(config, uri, *extra, kill_at=kill_at))


def _assert_loadable(uri: str, name: str, alias: str, folder: Path) -> str:
    """The alias' version is verified, downloads whole, and its ONNX model answers; its version."""
    info = show(name, alias, uri=uri)
    assert info.tags["verified"] == "true", (alias, info.version)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}@{alias}", dst_path=str(folder / f"{alias}_{info.version}")
        )
    )
    session = onnxruntime.InferenceSession(
        str(next(local.rglob("model.onnx"))), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((2, 24, 1)).astype(np.float32)
    (forecast,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
    assert forecast.shape[0] == 2
    assert np.isfinite(forecast).all()
    assert {"model_step.onnx", "preprocessing.json", "metadata.json"} <= {
        p.name for p in local.rglob("*")
    }
    return info.version


@pytest.fixture
def registry_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """`models:/` downloads resolve the registry from the environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", server.uri)
    return server.uri


@dataclass(frozen=True)
class FirstRetrain:
    """The first retrain of the crash-test model: a weak champion and fallback."""

    config: Path
    name: str
    result: Finished


@pytest.fixture(scope="module")
def first(server: Server, tmp_path_factory: pytest.TempPathFactory) -> FirstRetrain:
    config = _config_file(tmp_path_factory.mktemp("crash"), "rt_crash")
    return FirstRetrain(config, "rt_crash", _run(config, server.uri, *WEAK))


@pytest.mark.integration
def test_cli_retrain_logs_registers_and_promotes_both_aliases(
    first: FirstRetrain, server: Server, registry_env: str, tmp_path: Path
) -> None:
    assert first.result.code == 0, first.result.stderr[-2000:]
    assert first.result.last_line.startswith("promoted: champion → v1; fallback → v2")
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    experiment = client.get_experiment_by_name(first.name)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'retrain'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["retrain.outcome"] == "promoted"
    assert {f"stage_seconds.{s}" for s in STAGES} <= set(parent.data.metrics)
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert {run.data.tags["role"] for run in children} == {
        "feedback",
        "bptt",
        "baseline:repeat_last",
        "baseline:seasonal_naive",
    }
    assert all(run.info.status == "FINISHED" for run in children)
    assert _assert_loadable(server.uri, first.name, CHAMPION, tmp_path) == "1"
    assert _assert_loadable(server.uri, first.name, FALLBACK, tmp_path) == "2"
    assert not (first.config.parent / "out" / LOCK_FILE).exists()


# Each point kills the job at a named step (deterministic: no timing).
KILL_POINTS = (
    "train_bptt",  # the feedback model trained, its nested run still open
    "bptt_log_model",  # during the artifact uploads: files uploaded, the ONNX model not yet
    "champion_registered",  # a new version registered, not yet verified
    "champion_verified",  # verified, the alias not yet moved
    "register_fallback",  # the champion decided and maybe moved, the fallback not yet
    "state",  # both aliases decided, the state file not yet written
)


@pytest.mark.integration
def test_sigkill_at_any_stage_leaves_loadable_aliases_and_the_next_run_succeeds(
    first: FirstRetrain, server: Server, registry_env: str, tmp_path: Path
) -> None:
    assert first.result.code == 0, first.result.stderr[-2000:]
    lock = first.config.parent / "out" / LOCK_FILE
    for point in KILL_POINTS:
        killed = _run(first.config, server.uri, kill_at=point)
        assert killed.code == -signal.SIGKILL, (point, killed.code, killed.stderr[-2000:])
        assert json.loads(lock.read_text())["pid"] == killed.pid, point
        for alias in (CHAMPION, FALLBACK):
            _assert_loadable(server.uri, first.name, alias, tmp_path / point)
        if point == "register_fallback":
            # The better champion candidate was promoted; the weak fallback is still in place.
            assert show(first.name, CHAMPION, uri=server.uri).version != "1"
            assert show(first.name, FALLBACK, uri=server.uri).version == "2"
    after = _run(first.config, server.uri)
    assert after.code == 0, after.stderr[-2000:]
    assert f"replacing stale retrain lock {lock}: pid {killed.pid} is not running" in after.stderr
    assert after.last_line.startswith(("promoted:", "kept:"))
    assert not lock.exists()
    assert not list((lock.parent / "retrain").glob(".bundle_*"))
    for alias in (CHAMPION, FALLBACK):
        _assert_loadable(server.uri, first.name, alias, tmp_path / "after")
    # The killed jobs' parent and nested runs were closed as KILLED by the next run.
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(first.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    killed_runs = [r for r in runs if r.info.status == "KILLED"]
    assert killed_runs
    assert all(r.data.tags.get("retrain.closed_by") for r in killed_runs)
    assert "did not end as KILLED" in after.stderr


@pytest.mark.integration
def test_two_concurrent_retrains_one_runs_the_other_exits_with_the_lock_message(
    server: Server, tmp_path: Path
) -> None:
    config = _config_file(tmp_path, "rt_lock")
    uri = server.uri
    both = [_wait(p) for p in [_retrain(config, uri), _retrain(config, uri)]]
    codes = sorted(f.code for f in both)
    assert codes == [ExitCode.OK, ExitCode.LOCKED], [f.stderr[-1500:] for f in both]
    winner = next(f for f in both if f.code == ExitCode.OK)
    loser = next(f for f in both if f.code == ExitCode.LOCKED)
    assert winner.last_line.startswith("promoted: champion → v1; fallback → v2")
    message = loser.stderr.strip().splitlines()
    assert len(message) == 1
    assert f"is held by pid {winner.pid} on {socket.gethostname()} since" in message[0]
    assert "s ago" in message[0]
    assert [v.version for v in list_versions("rt_lock", uri=uri)] == ["2", "1"]


def _cli(*args: str) -> tuple[int, str]:
    """`forecaster retrain` in this process: exit code and stdout (MLflow chatters on stderr)."""
    result = CliRunner().invoke(app, ["retrain", *args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.mark.integration
def test_budget_exceeded_exits_4_and_leaves_the_aliases(
    first: FirstRetrain, server: Server
) -> None:
    assert first.result.code == 0, first.result.stderr[-2000:]
    before = {a: show(first.name, a, uri=server.uri).version for a in (CHAMPION, FALLBACK)}
    versions = len(list_versions(first.name, uri=server.uri))
    code, output = _cli(
        "--config", str(first.config), "--tracking-uri", server.uri, "--budget", "0.2s", "--force"
    )
    assert code == ExitCode.BUDGET, output
    assert "time budget 0.2 s exceeded" in output
    assert "no alias was moved" in output
    after = {a: show(first.name, a, uri=server.uri).version for a in (CHAMPION, FALLBACK)}
    assert after == before
    assert len(list_versions(first.name, uri=server.uri)) == versions
    assert not (first.config.parent / "out" / LOCK_FILE).exists()


@pytest.mark.integration
def test_rerun_on_the_same_data_and_config_is_up_to_date_and_force_retrains(
    server: Server, tmp_path: Path
) -> None:
    # A password in the tracking URI (the server ignores it) never reaches the state file,
    # and a rotated one is still the same store.
    secret_uri = server.uri.replace("http://", "http://ops:s3cret-pw@", 1)
    config = _config_file(tmp_path, "rt_idem")
    code, output = _cli("--config", str(config), "--tracking-uri", secret_uri)
    assert code == 0, output
    assert output.strip().splitlines()[-1].startswith("promoted: champion → v1; fallback → v2")
    state = next((tmp_path / "out").rglob("state.json")).read_text()
    assert "s3cret-pw" not in state
    assert json.loads(state)["tracking_uri"] == secret_uri.replace("s3cret-pw", "***")

    rotated = secret_uri.replace("s3cret-pw", "rotated-pw")
    code, output = _cli("--config", str(config), "--tracking-uri", rotated)
    assert code == 0, output
    assert output.strip().splitlines()[-1].startswith("up to date: data ")
    assert "champion v1, fallback v2" in output
    args = ("--config", str(config), "--tracking-uri", rotated)
    assert len(list_versions("rt_idem", uri=server.uri)) == 2
    # Where the per-series stages run is not part of the job's identity.
    code, output = _cli(*args, "--set", "execution=processes")
    assert output.strip().splitlines()[-1].startswith("up to date: data ")

    # The same data and config train the same models: registered, not better, aliases kept;
    # with the preprocessing and gate on a process pool, bit for bit the same scores too.
    code, output = _cli(*args, "--force", "--set", "execution=processes", "--set", "workers=2")
    assert code == 0, output
    line = output.strip().splitlines()[-1]
    assert line.startswith("kept: champion kept v1 (candidate v3 not better); fallback kept v2")
    assert show("rt_idem", CHAMPION, uri=server.uri).version == "1"
    assert len(list_versions("rt_idem", uri=server.uri)) == 4

    # A change of config is a new job: it retrains without --force.
    code, output = _cli(*args, "--set", "train.epochs=1")
    assert code == 0, output
    assert not output.strip().splitlines()[-1].startswith("up to date")


@pytest.mark.integration
def test_sigterm_releases_the_lock_and_fails_the_run(server: Server, tmp_path: Path) -> None:
    config = _config_file(tmp_path, "rt_term")
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    process = _retrain(config, server.uri)
    deadline = time.monotonic() + 120
    runs: list[mlflow.entities.Run] = []
    while not runs and process.poll() is None and time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("rt_term")
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], "tags.kind = 'retrain'")
        time.sleep(0.2)
    assert runs, "the retrain never started its MLflow run"
    assert (config.parent / "out" / LOCK_FILE).exists()
    process.send_signal(signal.SIGTERM)
    finished = _wait(process)
    assert finished.code == 128 + signal.SIGTERM, finished.stderr[-2000:]
    assert not (config.parent / "out" / LOCK_FILE).exists()
    assert client.get_run(runs[0].info.run_id).info.status == "FAILED"


def test_a_sigterm_during_a_native_import_is_held_until_the_import_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's SIGTERM handler raises; raised inside torch's native initialisation that
    aborted the process with the lock held. The import now completes first."""
    import sys

    from pipelines.retrain import import_holding_sigterm

    (tmp_path / "slow_native.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nfinished = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        module = sys.modules.get("slow_native")
        seen.append(bool(getattr(module, "finished", False)))
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(SystemExit) as caught:
            import_holding_sigterm("slow_native")
        assert signal.getsignal(signal.SIGTERM) is handler  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.modules.pop("slow_native", None)
    assert caught.value.code == 128 + signal.SIGTERM
    assert seen == [True]  # the handler ran once, after the module had finished importing
