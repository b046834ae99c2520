"""ONNX export: parity (oracle O15), compactness, step-graph chunked parity, metadata, atomicity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from forecaster import export as export_module
from forecaster.errors import ExportError, ModelError
from forecaster.export import (
    ExportReport,
    _export_proto,
    _loop_to_scan,
    check_parity,
    count_nodes,
    export_onnx,
)
from forecaster.inference import forecast_step, forecast_window, open_session
from forecaster.models.base import RecurrentForecaster
from forecaster.models.registry import _REGISTRY, build, model_names

D, HID, HORIZON, LOOKBACK = 3, 8, 4, 24
NAMES = model_names()
# With a linear readout of the last 5 inputs: the register rides in the carried state.
LAGGED = ["mi_gru+lin5", "lmn+lin5", "scrn+lin5", "gru+lin5"]
RECURRENCE_OPS = {"Loop", "Scan", "GRU", "LSTM"}


def _build(name: str, seed: int = 0) -> RecurrentForecaster:
    torch.manual_seed(seed)
    name, _, lags = name.partition("+lin")
    try:
        model = build(name, D, HID, HORIZON, linear_lags=int(lags or 0))
    except ModelError as exc:
        cause = exc.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name == _REGISTRY[name].module:
            pytest.skip(f"{_REGISTRY[name].module} does not exist yet")
        raise
    with torch.no_grad():  # move MI gates and biases off their initial constants
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], object]:
    """Every model exported once per graph kind (parity checked inside export_onnx)."""
    out: dict[tuple[str, str], object] = {}
    folder = tmp_path_factory.mktemp("onnx")
    for name in [*NAMES, *LAGGED]:
        for graph in ("window", "step"):
            try:
                model = _build(name)
            except pytest.skip.Exception:
                continue
            path = folder / f"{name}_{graph}.onnx"
            report = export_onnx(model, path, lookback=LOOKBACK, freq="h", graph=graph)  # type: ignore[arg-type]
            out[(name, graph)] = (model, report)
    return out


def _get(exported: dict, name: str, graph: str) -> tuple[RecurrentForecaster, ExportReport]:
    if (name, graph) not in exported:
        pytest.skip(f"model {name!r} is not available")
    return exported[(name, graph)]


@pytest.mark.parametrize("name", [*NAMES, *LAGGED])
def test_o15_window_graph_matches_pytorch_at_batch_1_and_17_and_t_1_and_50(
    name: str, exported: dict
) -> None:
    model, report = _get(exported, name, "window")
    assert report.parity_max_abs_diff is not None
    assert report.parity_max_abs_diff <= 1e-4
    session = open_session(report.path, device="cpu")
    generator = torch.Generator().manual_seed(42)
    for batch in (1, 17):
        for length in (1, 50):
            x = torch.randn(batch, length, D, generator=generator)
            with torch.no_grad():
                expected = model.forecast(x).numpy()
            got = forecast_window(session, x.numpy())
            assert got.shape == (batch, HORIZON)
            assert np.max(np.abs(got - expected)) <= 1e-4, (batch, length)


def _matmuls(graph: onnx.GraphProto) -> int:
    return sum(node.op_type in ("MatMul", "Gemm") for node in graph.node)


@pytest.mark.parametrize("name", NAMES)
def test_window_graph_is_compact_and_its_node_count_does_not_grow_with_t(
    name: str, exported: dict
) -> None:
    model, report = _get(exported, name, "window")
    proto = onnx.load(report.path)
    ops = Counter(node.op_type for node in proto.graph.node)
    assert sum(ops[op] for op in RECURRENCE_OPS) == 1, ops  # the recurrence appears once
    assert _matmuls(proto.graph) <= 4, ops  # input projection (≤ 3 pieces) and head, once
    bodies = [a.g for n in proto.graph.node for a in n.attribute if a.type == a.GRAPH]
    for body in bodies:  # one fused recurrent matmul per step (two for LMN: W^mh m, [W^hm W^mm])
        assert 1 <= _matmuls(body) <= 2
    assert report.node_count == count_nodes(proto.graph)
    assert report.node_count < 80
    short = count_nodes(_export_proto(model, "window", example_length=2).graph)
    long = count_nodes(_export_proto(model, "window", example_length=40).graph)
    assert short == long


@pytest.mark.parametrize("name", ["mi_gru", "lmn", "scrn"])
@pytest.mark.parametrize("graph", ["window", "step"])
def test_loop_recurrence_option_keeps_the_exporters_loop_with_parity(
    name: str, graph: str, tmp_path: Path
) -> None:
    model = _build(name)
    report = export_onnx(model, tmp_path / "m.onnx", lookback=8, graph=graph, recurrence="loop")  # type: ignore[arg-type]
    assert report.parity_max_abs_diff is not None
    assert report.parity_max_abs_diff <= 1e-4
    ops = [node.op_type for node in onnx.load(report.path).graph.node]
    assert ops.count("Loop") == 1
    assert "Scan" not in ops


@pytest.mark.parametrize("name", [*NAMES, *LAGGED])
def test_step_graph_fed_in_chunks_equals_window_graph(name: str, exported: dict) -> None:
    _, window = _get(exported, name, "window")
    _, step = _get(exported, name, "step")
    assert step.parity_max_abs_diff is not None
    assert step.parity_max_abs_diff <= 1e-4
    window_session = open_session(window.path, device="cpu")
    step_session = open_session(step.path, device="cpu")
    x = np.random.default_rng(0).standard_normal((17, 50, D)).astype(np.float32)
    expected = forecast_window(window_session, x)
    state = np.zeros((17, int(step_session.get_modelmeta().custom_metadata_map["state_size"])))
    for start, stop in [(0, 1), (1, 5), (5, 12), (12, 50)]:
        result = forecast_step(step_session, x[:, start:stop], state)
        state = result.state
        assert result.forecast.shape == (17, HORIZON)
    assert np.max(np.abs(result.forecast - expected)) <= 1e-4
    # The step graph starting from zeros is also a window graph.
    assert np.max(np.abs(forecast_window(step_session, x) - expected)) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_metadata_describes_the_model(name: str, exported: dict) -> None:
    model, report = _get(exported, name, "step")
    props = {p.key: p.value for p in onnx.load(report.path).metadata_props}
    assert props == {
        "format_version": "1",
        "model": name,
        "graph": "step",
        "lookback": str(LOOKBACK),
        "horizon": str(HORIZON),
        "input_size": str(D),
        "hidden_size": str(HID),
        "state_size": str(model.state_size),
        "recurrence": {"gru": "GRU", "lstm": "LSTM"}.get(name, "Scan"),
        "freq": "h",
    }


def test_native_ops_for_baselines_and_one_scan_for_custom_cells(exported: dict) -> None:
    for name, op in [("gru", "GRU"), ("lstm", "LSTM"), ("mi_gru", "Scan"), ("lmn", "Scan")]:
        for graph in ("window", "step"):
            _, report = _get(exported, name, graph)
            ops = [node.op_type for node in onnx.load(report.path).graph.node]
            assert ops.count(op) == 1, (name, graph, ops)


def test_scan_rewrite_moves_the_mi_gru_input_split_out_and_skips_graphs_without_loop(
    exported: dict,
) -> None:
    _, report = _get(exported, "mi_gru", "window")
    proto = onnx.load(report.path)
    scan = next(node for node in proto.graph.node if node.op_type == "Scan")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in scan.attribute}
    assert attributes["num_scan_inputs"] == 3  # [A | C_rz | C_n] pieces
    body_ops = [node.op_type for node in attributes["body"].node]
    assert "Gather" not in body_ops
    assert body_ops.count("Split") == 2  # gates and units; the input split left the loop
    native = _export_proto(_build("gru"), "window")
    before = native.SerializeToString()
    assert not _loop_to_scan(native)
    assert native.SerializeToString() == before


def test_user_metadata_is_written_and_export_does_not_touch_the_model(tmp_path: Path) -> None:
    model = _build("mi_gru").double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", lookback=5, metadata={"training": "feedback"})
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert props["training"] == "feedback"
    assert props["freq"] == ""
    assert model.training
    assert all(v.dtype == torch.float64 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refuses_a_module_that_is_not_a_recurrent_forecaster(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot export Linear: only RecurrentForecaster"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", lookback=3)  # type: ignore[arg-type]
    assert not (tmp_path / "x.onnx").exists()


def test_refuses_bad_lookback_and_graph(tmp_path: Path) -> None:
    model = _build("gru")
    with pytest.raises(ExportError, match="lookback: 0 is not a positive integer"):
        export_onnx(model, tmp_path / "x.onnx", lookback=0)
    with pytest.raises(ExportError, match="graph: 'scan' is not 'window' or 'step'"):
        export_onnx(model, tmp_path / "x.onnx", lookback=3, graph="scan")  # type: ignore[arg-type]


def test_refuses_a_nonzero_initial_state(tmp_path: Path) -> None:
    model = _build("mi_gru")
    model.initial_state = lambda batch_size, device=None, dtype=None: torch.ones(  # type: ignore[method-assign]
        batch_size, model.state_size
    )
    with pytest.raises(ExportError, match="non-zero initial state"):
        export_onnx(model, tmp_path / "x.onnx", lookback=3)


def test_check_parity_detects_a_graph_that_differs_from_the_model(tmp_path: Path) -> None:
    model = _build("mi_gru")
    path = tmp_path / "m.onnx"
    export_onnx(model, path, lookback=3, check=False)
    assert check_parity(model, path) <= 1e-4
    with torch.no_grad():
        model.cell.alpha.add_(1e-2)
    with pytest.raises(ExportError, match=r"ONNX parity failed for 'mi_gru' \(window graph"):
        check_parity(model, path)


def test_failed_parity_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous version")

    def failing_check(*args: object, **kwargs: object) -> float:
        raise ExportError("ONNX parity failed (simulated)")

    monkeypatch.setattr(export_module, "check_parity", failing_check)
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(_build("mi_gru"), target, lookback=3)
    assert target.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_of_a_float64_model_without_check_reports_no_parity(tmp_path: Path) -> None:
    report = export_onnx(_build("lstm").double(), tmp_path / "l.onnx", lookback=3, check=False)
    assert report.parity_max_abs_diff is None
    assert report.file_size_bytes == (tmp_path / "l.onnx").stat().st_size
    assert report.export_s > 0
