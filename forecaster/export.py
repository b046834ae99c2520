"""ONNX export of recurrent forecasters: a compact window graph and a stateful step graph.

Two graphs per model (ALGORITHMS.md §7, DESIGN.md §5):

- `window`: input `x [B, T, d]` -> output `forecast [B, H]` (the forecast from the last step),
  dynamic batch and time axes;
- `step`: inputs `x_new [B, k, d]` and `state [B, S]` -> outputs `forecast [B, H]` and
  `state_out [B, S]`, dynamic batch and `k`; serving keeps each known series' state and runs only
  the new points.

Custom cells (MI-GRU, LMN, SCRN) are exported from a `torch.jit.script`-ed loop through the
TorchScript-based exporter (`dynamo=False`): the recurrence becomes ONE ONNX `Loop` whose body
holds one step, the input projections of the whole window are computed before it (one MatMul),
and the loop indexes a time-major tensor. By default that `Loop` is then rewritten as an
equivalent `Scan` (no per-step Gather/condition/counter; a constant-size Split of the projected
input moves out of the recurrence as one MatMul per piece), which measured ~20 % faster at
batch 1 and the same at batch 256; `recurrence="loop"` keeps the exporter's graph.
GRU/LSTM baselines export their `nn.GRU`/`nn.LSTM` as the native ONNX `GRU`/`LSTM` op.
Every export writes a temporary file, checks it (`onnx.checker`, and parity
against PyTorch when asked: oracle O15) and only then renames it into place.
"""

from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from forecaster.errors import ExportError
from forecaster.inference import forecast_step, forecast_window, model_metadata, open_session
from forecaster.models.base import RecurrentForecaster
from forecaster.models.rnn import GRUForecaster, LSTMForecaster

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
OPSET_VERSION = 17
PARITY_TOLERANCE = 1e-4
GraphKind = Literal["window", "step"]


@dataclass(frozen=True)
class ExportReport:
    """What an export produced.

    Attributes:
        path: the written model file.
        graph: `window` or `step`.
        node_count: ONNX nodes, counting those inside `Loop` bodies.
        export_s: seconds spent exporting (without the parity check).
        parity_max_abs_diff: largest |ONNX Runtime − PyTorch| over the parity inputs, or None when
            the check was skipped.
        file_size_bytes: size of the model file.
    """

    path: Path
    graph: GraphKind
    node_count: int
    export_s: float
    parity_max_abs_diff: float | None
    file_size_bytes: int


class _LoopWindow(nn.Module):
    """Scripted window graph: `x [B, T, d] -> forecast [B, H]` with zero initial state."""

    def __init__(self, model: RecurrentForecaster) -> None:
        super().__init__()
        self.model = model
        self.state_size = model.state_size

    def forward(self, x: Tensor) -> Tensor:
        a = self.model.project_inputs(x.transpose(0, 1))  # [T, B, P]: one MatMul for the window
        s = torch.zeros(x.size(0), self.state_size, dtype=x.dtype, device=x.device)  # [B, S]
        for t in range(a.size(0)):
            s = self.model.recur(a[t], s)  # time-major index
        return self.model.readout(s)  # [B, H]


class _LoopStep(nn.Module):
    """Scripted step graph: `x_new [B, k, d], state [B, S] -> (forecast [B, H], state [B, S])`."""

    def __init__(self, model: RecurrentForecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_new: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        a = self.model.project_inputs(x_new.transpose(0, 1))  # [k, B, P]
        s = state
        for t in range(a.size(0)):
            s = self.model.recur(a[t], s)
        return self.model.readout(s), s


class _NativeWindow(nn.Module):
    """GRU/LSTM window graph through the native ONNX recurrent op (zero initial state)."""

    def __init__(self, model: GRUForecaster | LSTMForecaster) -> None:
        super().__init__()
        self.rnn = model.rnn
        self.head = model.head

    def forward(self, x: Tensor) -> Tensor:
        _, final = self.rnn(x)
        h_n = final[0] if isinstance(final, tuple) else final  # [1, B, h]
        return self.head(h_n[0])


class _NativeStep(nn.Module):
    """GRU/LSTM step graph through the native ONNX recurrent op; state `h` or `[h; c]`."""

    def __init__(self, model: GRUForecaster | LSTMForecaster) -> None:
        super().__init__()
        self.rnn = model.rnn
        self.head = model.head
        self.hidden_size = model.hidden_size
        self.is_lstm = isinstance(model, LSTMForecaster)

    def forward(self, x_new: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        hs = self.hidden_size
        if self.is_lstm:
            h0 = state[:, :hs].unsqueeze(0).contiguous()
            c0 = state[:, hs:].unsqueeze(0).contiguous()
            _, (h_n, c_n) = self.rnn(x_new, (h0, c0))
            return self.head(h_n[0]), torch.cat([h_n[0], c_n[0]], dim=1)
        _, h_n = self.rnn(x_new, state.unsqueeze(0).contiguous())
        return self.head(h_n[0]), h_n[0]


def _recurrence_op(graph: onnx.GraphProto) -> str:
    """The op that carries the recurrence (`Scan`, `Loop`, `GRU` or `LSTM`)."""
    ops = [node.op_type for node in graph.node if node.op_type in {"Scan", "Loop", "GRU", "LSTM"}]
    return ops[0] if len(ops) == 1 else ",".join(ops)


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of a graph including those of its subgraphs (`Loop`/`If`/`Scan` bodies)."""
    total = 0
    for node in graph.node:
        total += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attribute.g)
            for subgraph in attribute.graphs:
                total += count_nodes(subgraph)
    return total


def _outer_value(graph: onnx.GraphProto, name: str) -> bool:
    """Whether `name` is a graph input, an initializer or a node output of `graph`."""
    return (
        any(i.name == name for i in graph.input)
        or any(i.name == name for i in graph.initializer)
        or any(name in node.output for node in graph.node)
    )


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((node for node in graph.node if name in node.output), None)


def _loop_to_scan(proto: onnx.ModelProto) -> bool:
    """Rewrite the scripted `for t in range(a.size(0)): s = recur(a[t], s)` Loop as a Scan.

    The TorchScript exporter emits a `Loop` whose body gathers `a[t]` and carries the state. A
    `Scan` over `a` is the same recurrence without the per-step Gather, loop condition and
    iteration counter. When the body's only use of `a[t]` is a constant-size `Split`, that split
    moves out of the recurrence and each piece becomes a scan input (see `_split_projection`).
    Applied only when the pattern is matched exactly (one Loop, trip count `a.size(0)`, a
    constant true condition that the body passes through, no per-step outputs); otherwise the
    Loop is kept. Correctness is then checked by the parity test like any export.

    Returns:
        True when the graph was rewritten.
    """
    graph = proto.graph
    loops = [node for node in graph.node if node.op_type == "Loop"]
    if len(loops) != 1:
        return False
    loop = loops[0]
    body = loop.attribute[0].g
    if len(loop.input) < 3 or len(body.output) != len(loop.input) - 1:
        return False  # scan outputs (per-step results) are not part of the pattern
    initial_condition = _constant_array(graph, loop.input[1])
    if initial_condition is None or initial_condition.size != 1 or not initial_condition.item():
        return False
    iteration, condition = body.input[0].name, body.input[1].name
    gathers = [n for n in body.node if iteration in n.input]
    if len(gathers) != 1 or gathers[0].op_type != "Gather" or gathers[0].input[1] != iteration:
        return False
    gather = gathers[0]
    if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
        return False
    sequence = gather.input[0]  # [T, B, P], an outer value
    if any(sequence in n.output for n in body.node) or not _outer_value(graph, sequence):
        return False
    # The trip count must be sequence.size(0): Gather(Shape(sequence), 0).
    trip = _producer(graph, loop.input[0])
    shape = _producer(graph, trip.input[0]) if trip is not None else None
    if trip is None or trip.op_type != "Gather" or shape is None or shape.op_type != "Shape":
        return False
    if shape.input[0] != sequence or not _is_scalar_zero(graph, trip.input[1]):
        return False
    # The body must never stop early: its condition output is a copy of the (true) input.
    cond_node = _producer(body, body.output[0].name)
    if cond_node is None or cond_node.op_type != "Identity":
        return False
    if cond_node.input[0] not in (condition, loop.input[1]) or any(
        condition in n.input for n in body.node if n is not cond_node
    ):
        return False

    element = gather.output[0]
    users = [n for n in body.node if element in n.input]
    split = users[0] if len(users) == 1 and users[0].op_type == "Split" else None
    scan_inputs, body_scan_inputs, outer_nodes = [sequence], [element], []
    removed = [gather, cond_node]
    if (
        split is not None
        and any(a.name == "axis" and a.i == 1 for a in split.attribute)
        and len(split.input) == 2
        and _outer_value(graph, split.input[1])
    ):
        pieces = [f"{name}__window" for name in split.output]
        outer_nodes = _split_projection(graph, sequence, split.input[1], pieces)
        scan_inputs, body_scan_inputs = pieces, list(split.output)
        removed.append(split)
    body_nodes = [n for n in body.node if all(n is not r for r in removed)]
    elem_type = onnx.TensorProto.FLOAT
    new_body = onnx.helper.make_graph(
        body_nodes,
        f"{body.name}_scan",
        [*body.input[2:]]
        + [onnx.helper.make_tensor_value_info(n, elem_type, None) for n in body_scan_inputs],
        list(body.output[1:]),
        initializer=list(body.initializer),
    )
    scan = onnx.helper.make_node(
        "Scan",
        [*loop.input[2:], *scan_inputs],
        list(loop.output),
        name="/scan/Scan",
        body=new_body,
        num_scan_inputs=len(scan_inputs),
    )
    position = list(graph.node).index(loop)
    graph.node.remove(loop)
    for offset, node in enumerate([*outer_nodes, scan]):
        graph.node.insert(position + offset, node)
    _remove_dead_nodes(graph)
    return True


def _split_projection(
    graph: onnx.GraphProto, sequence: str, sizes_name: str, pieces: list[str]
) -> list[onnx.NodeProto]:
    """Nodes computing the pieces of `sequence` split on its last axis.

    When `sequence = MatMul(X, W) + b` with constant `W`, `b`, each piece gets its own
    `MatMul + Add` on column blocks of `W` and `b` (writing the pieces directly instead of
    copying the whole `[T, B, P]` projection once more); otherwise one `Split`.
    """
    split = [onnx.helper.make_node("Split", [sequence, sizes_name], pieces, axis=2)]
    sizes = _constant_array(graph, sizes_name)
    add = _producer(graph, sequence)
    if sizes is None or add is None or add.op_type != "Add":
        return split
    matmuls = [_producer(graph, name) for name in add.input]
    position = next(
        (i for i, n in enumerate(matmuls) if n is not None and n.op_type == "MatMul"), None
    )
    if position is None:
        return split
    matmul = matmuls[position]
    if matmul is None:
        return split
    weight = _constant_array(graph, matmul.input[1])
    bias = _constant_array(graph, add.input[1 - position])
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[1:]:
        return split
    if int(sizes.sum()) != weight.shape[1]:
        return split
    nodes, start = [], 0
    for size, piece in zip(sizes.tolist(), pieces, strict=True):
        w_name, b_name = f"{piece}__weight", f"{piece}__bias"
        graph.initializer.append(
            onnx.numpy_helper.from_array(
                np.ascontiguousarray(weight[:, start : start + size]), w_name
            )
        )
        graph.initializer.append(
            onnx.numpy_helper.from_array(np.ascontiguousarray(bias[start : start + size]), b_name)
        )
        nodes.append(
            onnx.helper.make_node("MatMul", [matmul.input[0], w_name], [f"{piece}__matmul"])
        )
        nodes.append(onnx.helper.make_node("Add", [f"{piece}__matmul", b_name], [piece]))
        start += size
    return nodes


def _constant_array(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or `Constant` node output, else None."""
    for init in graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    node = _producer(graph, name)
    if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
        return onnx.numpy_helper.to_array(node.attribute[0].t)
    return None


def _is_scalar_zero(graph: onnx.GraphProto, name: str) -> bool:
    value = _constant_array(graph, name)
    return value is not None and value.size == 1 and value.item() == 0


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Names read by the nodes of a graph and of its subgraphs (outer-scope references too)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(attribute.g)
    return used


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop top-level nodes and initializers nothing reads (after a rewrite)."""
    while True:
        needed = _used_names(graph) | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in needed for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    needed = _used_names(graph)
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)


def _export_proto(
    model: RecurrentForecaster, graph: GraphKind, example_length: int = 3
) -> onnx.ModelProto:
    """Export to an in-memory proto; `example_length` is the traced/scripted example's T."""
    d, s = model.input_size, model.state_size
    native = isinstance(model, GRUForecaster | LSTMForecaster)
    if graph == "window":
        module: nn.Module = _NativeWindow(model) if native else _LoopWindow(model)  # type: ignore[arg-type]
        args: tuple[Tensor, ...] = (torch.randn(2, example_length, d),)
        input_names, output_names = ["x"], ["forecast"]
        dynamic_axes = {"x": {0: "batch", 1: "time"}, "forecast": {0: "batch"}}
    else:
        module = _NativeStep(model) if native else _LoopStep(model)  # type: ignore[arg-type]
        args = (torch.randn(2, example_length, d), torch.randn(2, s))
        input_names, output_names = ["x_new", "state"], ["forecast", "state_out"]
        dynamic_axes = {
            "x_new": {0: "batch", 1: "steps"},
            "state": {0: "batch"},
            "forecast": {0: "batch"},
            "state_out": {0: "batch"},
        }
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but 100× faster here (ALGORITHMS.md §7).
        warnings.simplefilter("ignore")
        if not native:
            module = torch.jit.script(module)
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET_VERSION,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _float32_copy(model: RecurrentForecaster) -> RecurrentForecaster:
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()


def export_onnx(
    model: RecurrentForecaster,
    path: str | Path,
    *,
    lookback: int,
    freq: str | None = None,
    metadata: dict[str, str] | None = None,
    graph: GraphKind = "window",
    check: bool = True,
    recurrence: Literal["scan", "loop"] = "scan",
) -> ExportReport:
    """Export a forecaster to ONNX (float32, opset 17), atomically, with metadata.

    Args:
        model: any `RecurrentForecaster` (left unchanged; a float32 CPU copy is exported).
        path: destination `.onnx` file; written to a temporary file first, then renamed.
        lookback: the window length the model was trained for (stored in the metadata).
        freq: sampling frequency of the series (e.g. `"h"`), stored in the metadata.
        metadata: extra `metadata_props` (string keys and values), e.g. the training method.
        graph: `window` (`x [B, T, d] -> forecast [B, H]`) or `step` (`x_new [B, k, d]`,
            `state [B, S] -> forecast [B, H], state_out [B, S]`).
        check: run `check_parity` on the written file before it is moved into place.
        recurrence: for custom cells, `scan` rewrites the scripted `Loop` as a `Scan` (faster
            at small batch, see `_loop_to_scan`); `loop` keeps the exporter's `Loop`. GRU/LSTM
            always use the native op.

    Raises:
        ExportError: not a `RecurrentForecaster`, bad arguments, non-zero initial state, export
            failure, or parity above 1e-4.
    """
    if not isinstance(model, RecurrentForecaster):
        raise ExportError(
            f"cannot export {type(model).__name__}: only RecurrentForecaster models are supported"
        )
    if graph not in ("window", "step"):
        raise ExportError(f"graph: {graph!r} is not 'window' or 'step'", field="graph")
    if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1:
        raise ExportError(f"lookback: {lookback!r} is not a positive integer", field="lookback")
    if recurrence not in ("scan", "loop"):
        raise ExportError(f"recurrence: {recurrence!r} is not 'scan' or 'loop'", field="recurrence")
    reference = _float32_copy(model)
    if bool(reference.initial_state(1).abs().max() > 0):
        raise ExportError(
            f"model {model.name!r} has a non-zero initial state; exported graphs assume zeros"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        proto = _export_proto(reference, graph)
        if recurrence == "scan" and not _loop_to_scan(proto):
            logger.debug(
                "no scripted loop pattern in %s; keeping the graph as exported", model.name
            )
        onnx.checker.check_model(proto)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting model {model.name!r} ({graph} graph) failed: {exc}") from exc
    props = {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "graph": graph,
        "lookback": str(lookback),
        "horizon": str(model.horizon),
        "input_size": str(model.input_size),
        "hidden_size": str(model.hidden_size),
        "state_size": str(model.state_size),
        "recurrence": _recurrence_op(proto.graph),
        "freq": freq or "",
        **(metadata or {}),
    }
    onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in props.items()})
    proto.doc_string = f"forecaster {model.name} {graph} graph"
    tmp_path = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(proto, tmp_path)
        export_s = time.perf_counter() - started
        diff = check_parity(reference, tmp_path, lookback=lookback) if check else None
        tmp_path.replace(path)
    finally:
        tmp_path.unlink(missing_ok=True)
    report = ExportReport(
        path=path,
        graph=graph,
        node_count=count_nodes(proto.graph),
        export_s=export_s,
        parity_max_abs_diff=diff,
        file_size_bytes=path.stat().st_size,
    )
    logger.info(
        "exported %s %s graph to %s: %d nodes, %.2f s, parity %s",
        model.name,
        graph,
        path,
        report.node_count,
        export_s,
        "skipped" if diff is None else f"{diff:.2e}",
    )
    return report


def check_parity(
    model: RecurrentForecaster,
    path: str | Path,
    *,
    lookback: int | None = None,
    batch_sizes: Sequence[int] = (1, 17),
    lengths: Sequence[int] = (1, 50),
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> float:
    """Compare an exported model with PyTorch on random float32 inputs (oracle O15).

    Window graphs: every batch size × length (plus `lookback`) against `model.forecast`. Step
    graphs: a window of the longest length fed in uneven chunks, carrying the state, against the
    PyTorch states and forecasts after each chunk.

    Returns:
        The largest absolute difference seen.

    Raises:
        ExportError: the difference exceeds `tolerance`.
    """
    reference = _float32_copy(model)
    session = open_session(path, device="cpu")
    graph = model_metadata(session).get("graph", "window")
    steps = sorted({*lengths, *([lookback] if lookback else [])})
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        for length in steps:
            x = torch.randn(batch, length, reference.input_size, generator=generator)
            with torch.no_grad():
                states = reference.run_states(x)  # [B, T+1, S]
                expected = reference.readout(states)  # [B, T+1, H]
            if graph == "window":
                got = forecast_window(session, x.numpy())
                worst = max(worst, _max_diff(got, expected[:, -1]))
                continue
            state = states[:, 0].numpy()
            for start, stop in _chunks(length):
                result = forecast_step(session, x[:, start:stop].numpy(), state)
                state = result.state
                worst = max(worst, _max_diff(result.forecast, expected[:, stop]))
                worst = max(worst, _max_diff(result.state, states[:, stop]))
    if not worst <= tolerance:
        raise ExportError(
            f"ONNX parity failed for {model.name!r} ({graph} graph, {path}): "
            f"max |Δ| = {worst:.3e} > {tolerance:.0e}"
        )
    return worst


def _chunks(length: int) -> list[tuple[int, int]]:
    """Uneven chunk boundaries covering `[0, length)`: sizes 1, 2, 3, ... (last one clipped)."""
    bounds, start, size = [], 0, 1
    while start < length:
        stop = min(start + size, length)
        bounds.append((start, stop))
        start, size = stop, size + 1
    return bounds


def _max_diff(got: np.ndarray, expected: Tensor) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - expected.double().numpy())))
