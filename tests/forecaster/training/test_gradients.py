"""The gradient entry point: BPTT, truncated BPTT and the dispatch to fixed feedback."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torch_helpers import max_grad_diff, parameter_grads, random_batch

from forecaster.config import FeedbackConfig
from forecaster.errors import ModelError
from forecaster.losses import ForecastLoss
from forecaster.models.base import RecurrentForecaster
from forecaster.models.registry import build
from forecaster.training.feedback import (
    estimate_feedback,
    exact_bptt_gradients,
    feedback_gradients,
    feedback_states,
)
from forecaster.training.gradients import (
    autograd_bptt_gradients,
    bptt_gradients,
    compute_gradients,
    hand_written_bptt,
    tbptt_gradients,
)

B, T, D, HID, HORIZON = 3, 7, 4, 5, 2
F64 = torch.float64
MODELS = [
    ("mi_gru", {"mi_init": "mi"}),
    ("gru", {}),
    ("lmn", {"memory_size": 6}),
    ("scrn", {"context_size": 3}),
    ("lstm", {}),
]
MODEL_IDS = [name for name, _ in MODELS]


def _model(name: str, params: dict[str, object], seed: int = 0) -> RecurrentForecaster:
    torch.manual_seed(seed)
    return build(name, D, HID, HORIZON, **params).to(F64)


def _data(steps: int = T, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    return random_batch(B, steps, D, HORIZON, seed)


LOSS = ForecastLoss(eta=1.0, gamma=0.5, burn_in=1)


def _run(method: str, model: RecurrentForecaster, x: Tensor, y: Tensor, m: Tensor, **kw: object):
    model.zero_grad(set_to_none=True)
    loss = compute_gradients(method, model, x, y, m, LOSS, **kw)  # type: ignore[arg-type]
    return loss, parameter_grads(model)


def _segment_reference(model: RecurrentForecaster, x: Tensor, y: Tensor, m: Tensor, length: int):
    """Autograd over the whole window with the state detached at every segment boundary."""
    model.zero_grad(set_to_none=True)
    s = model.initial_state(x.shape[0])
    pieces = []
    for start in range(0, x.shape[1], length):
        states = model.run_states(x[:, start : start + length], s.detach())  # [B, L+1, S]
        pieces.append(states[:, 1:])
        s = states[:, -1]
    loss = LOSS(model.readout(torch.cat(pieces, dim=1)), y, m)
    loss.backward()
    return loss.detach(), parameter_grads(model)


@pytest.mark.parametrize(("name", "params"), MODELS, ids=MODEL_IDS)
def test_bptt_loss_is_the_full_window_loss(name: str, params: dict[str, object]) -> None:
    model = _model(name, params)
    x, y, m = _data()
    s0 = torch.randn(B, model.state_size, dtype=F64)
    loss, grads = _run("bptt", model, x, y, m, s0=s0)
    with torch.no_grad():
        expected = LOSS(model(x, s0), y, m)
    assert abs(loss.item() - expected.item()) <= 1e-14
    assert not loss.requires_grad
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["head.weight"].abs().max().item() > 0


HAND_WRITTEN = [
    ("mi_gru", {"mi_init": "mi"}),
    ("lmn", {"memory_size": 6}),
    ("lmn", {"memory_size": 6, "activation": "sigmoid"}),
    ("scrn", {"context_size": 3}),
    ("scrn", {"context_size": 3, "activation": "tanh"}),
    ("mi_gru", {"mi_init": "mi", "linear_lags": 4}),
    ("lmn", {"memory_size": 6, "linear_lags": 3}),
    ("scrn", {"context_size": 3, "linear_lags": 5}),
]
HAND_WRITTEN_IDS = [
    "mi_gru",
    "lmn",
    "lmn-sigmoid",
    "scrn",
    "scrn-tanh",
    "mi_gru+lin4",
    "lmn+lin3",
    "scrn+lin5",
]
RECURRENT_WEIGHT = {
    "mi_gru": "cell.weight_hh",
    "lmn": "memory_to_hidden",
    "scrn": "recurrent_weight",
}


def _autograd(
    model: RecurrentForecaster, x: Tensor, y: Tensor, m: Tensor, s0: Tensor | None, loss_fn=LOSS
):
    model.zero_grad(set_to_none=True)
    loss = autograd_bptt_gradients(model, x, y, m, loss_fn, s0=s0)
    return loss, parameter_grads(model)


@pytest.mark.parametrize("steps", [1, 2, T, 70])  # 70: across the loops' 32-step blocks
@pytest.mark.parametrize(("name", "params"), HAND_WRITTEN, ids=HAND_WRITTEN_IDS)
def test_bptt_runs_the_hand_written_recursion_and_equals_autograd(
    name: str, params: dict[str, object], steps: int
) -> None:
    model = _model(name, params)
    with torch.no_grad():  # weight on the lag register, so its head gradient is compared
        model.head.weight.normal_(0.0, 0.5)
    x, y, m = _data(steps)
    s0 = torch.randn(B, model.state_size, dtype=F64)
    assert hand_written_bptt(model, x, s0)
    loss_fn = ForecastLoss(eta=1.0, gamma=0.5, burn_in=0)  # every step has loss, T = 1 too
    for start in (None, s0):
        model.zero_grad(set_to_none=True)
        loss = compute_gradients("bptt", model, x, y, m, loss_fn, s0=start)
        grads = parameter_grads(model)
        loss_a, grads_a = _autograd(model, x, y, m, start, loss_fn)
        assert abs(loss.item() - loss_a.item()) <= 1e-14
        assert max_grad_diff(grads, grads_a) <= 1e-12
        assert grads["head.weight"].abs().max().item() > 0
        core = RECURRENT_WEIGHT[name]
        recurrent = grads[core if "linear_lags" not in params else f"inner.{core}"]
        if name == "scrn":  # R, the hidden-to-hidden block (P also feeds the input side)
            recurrent = recurrent[:, params["context_size"] :]  # type: ignore[misc]
        assert (recurrent.abs().max().item() > 0) is (steps > 1 or start is not None)


@pytest.mark.parametrize(("name", "params"), HAND_WRITTEN[:5], ids=HAND_WRITTEN_IDS[:5])
def test_scripted_recursion_equals_the_per_step_state_vjp_loop(
    name: str, params: dict[str, object]
) -> None:
    model = _model(name, params)
    x, _, _ = _data()
    s0 = torch.randn(B, model.state_size, dtype=F64)
    states, aux = feedback_states(model, x, s0)
    assert (aux is None) is (name == "scrn")  # SCRN's slopes come from its stored states
    direct = torch.randn(B, T, model.state_size, dtype=F64)
    scripted = model.exact_deltas(x, states, direct, aux)
    per_step = RecurrentForecaster.exact_deltas(model, x, states, direct, aux)
    without_aux = model.exact_deltas(x, states, direct, None)  # autograd state_vjp per step
    assert (scripted - per_step).abs().max().item() <= 1e-13
    assert (scripted - without_aux).abs().max().item() <= 1e-13
    assert scripted.shape == direct.shape
    assert (scripted[:, -1] == direct[:, -1]).all()  # the last step has only its head


def test_the_base_class_recursion_gives_exact_bptt_for_any_feedback_model() -> None:
    model = _model("gru", {})
    x, y, m = _data()
    assert not hand_written_bptt(model, x)  # no scripted loop: bptt stays the fused kernel
    model.zero_grad(set_to_none=True)
    loss = exact_bptt_gradients(model, x, y, m, LOSS)
    grads = parameter_grads(model)
    loss_a, grads_a = _autograd(model, x, y, m, None)
    assert abs(loss.item() - loss_a.item()) <= 1e-14
    assert max_grad_diff(grads, grads_a) <= 1e-12


@pytest.mark.parametrize(("name", "params"), MODELS, ids=MODEL_IDS)
def test_autograd_runs_where_the_hand_written_path_cannot(
    name: str, params: dict[str, object]
) -> None:
    model = _model(name, params)
    x, _, _ = _data()
    expected = name in ("mi_gru", "lmn", "scrn")
    assert hand_written_bptt(model, x) is expected
    assert not hand_written_bptt(model, x.clone().requires_grad_(True))  # input gradients
    s0 = torch.zeros(B, model.state_size, dtype=F64, requires_grad=True)
    assert not hand_written_bptt(model, x, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not hand_written_bptt(model, x)  # the kept gates are not autocast's


@pytest.mark.parametrize(
    ("name", "module", "weight"), [("mi_gru", "cell", "weight_hh"), ("lmn", "memory", "weight")]
)
def test_hand_written_gradients_reach_a_parametrized_weight_and_run_hooks(
    name: str, module: str, weight: str
) -> None:
    """The closed-form cell backward hands its gradients to autograd, so a weight under a
    parametrization (weight norm) gets them through it, and parameter hooks fire."""
    model = _model(name, {"mi_gru": {"mi_init": "mi"}, "lmn": {"memory_size": 6}}[name])
    weight_norm(model.get_submodule(module), weight)
    x, y, m = _data()
    assert hand_written_bptt(model, x)
    fired: set[str] = set()
    for key, param in model.named_parameters():
        param.register_hook(lambda grad, key=key: fired.add(key))
    loss, grads = _run("bptt", model, x, y, m)
    loss_a, grads_a = _autograd(model, x, y, m, None)
    assert abs(loss.item() - loss_a.item()) <= 1e-14
    assert max_grad_diff(grads, grads_a) <= 1e-12
    originals = [k for k in grads if ".parametrizations." in k]
    assert len(originals) == 2
    assert all(grads[k].abs().max().item() > 0 for k in originals)
    assert fired == set(grads)  # every parameter's hook ran
    d = torch.full((model.state_size,), 0.5, dtype=F64)
    _, grads_f = _run("feedback", model, x, y, m, d=d)
    assert all(grads_f[k].abs().max().item() > 0 for k in originals)


@pytest.mark.parametrize(("name", "params"), HAND_WRITTEN, ids=HAND_WRITTEN_IDS)
@pytest.mark.parametrize("method", ["bptt", "feedback"])
def test_a_frozen_cell_trains_the_head_alone(
    name: str, params: dict[str, object], method: str
) -> None:
    model = _model(name, params)
    for key, param in model.named_parameters():
        param.requires_grad_(key.startswith("head."))
    x, y, m = _data()
    d = torch.full((model.state_size,), 0.5, dtype=F64)
    _, grads = _run(method, model, x, y, m, d=d)
    _, grads_a = _autograd(model, x, y, m, None)
    assert max_grad_diff(grads, grads_a) <= 1e-12  # the head's gradient needs no δ
    assert grads["head.weight"].abs().max().item() > 0
    assert all(p.grad is None for k, p in model.named_parameters() if not k.startswith("head."))


def test_hand_written_bptt_gives_input_gradients_through_autograd() -> None:
    model = _model("lmn", {"memory_size": 6})
    x, y, m = _data()
    x_leaf = x.clone().requires_grad_(True)
    _run("bptt", model, x_leaf, y, m)
    assert x_leaf.grad is not None
    assert x_leaf.grad.abs().max().item() > 0


def test_hand_written_bptt_is_refused_for_a_model_without_feedback() -> None:
    model = _model("lstm", {})
    x, y, m = _data()
    with pytest.raises(ModelError, match=r"'lstm' does not support fixed-feedback training"):
        exact_bptt_gradients(model, x, y, m, LOSS)


@pytest.mark.parametrize("truncation", [T, T + 5])
@pytest.mark.parametrize(("name", "params"), MODELS, ids=MODEL_IDS)
def test_tbptt_with_truncation_at_least_t_equals_bptt(
    name: str, params: dict[str, object], truncation: int
) -> None:
    model = _model(name, params)
    x, y, m = _data()
    loss_t, grads_t = _run("tbptt", model, x, y, m, truncation=truncation)
    loss_b, grads_b = _run("bptt", model, x, y, m)
    assert abs(loss_t.item() - loss_b.item()) <= 1e-14
    assert max_grad_diff(grads_t, grads_b) <= 1e-12


@pytest.mark.parametrize("truncation", [1, 3, 6])
@pytest.mark.parametrize(("name", "params"), MODELS, ids=MODEL_IDS)
def test_tbptt_segments_equal_autograd_with_detached_boundaries(
    name: str, params: dict[str, object], truncation: int
) -> None:
    model = _model(name, params)
    x, y, m = _data()
    loss_t, grads_t = _run("tbptt", model, x, y, m, truncation=truncation)
    loss_r, grads_r = _segment_reference(model, x, y, m, truncation)
    assert abs(loss_t.item() - loss_r.item()) <= 1e-14  # normalised over the whole window
    assert max_grad_diff(grads_t, grads_r) <= 1e-12
    _, grads_b = _run("bptt", model, x, y, m)
    assert max_grad_diff(grads_t, grads_b) > 1e-6  # truncation does change the gradient


def test_tbptt_of_one_step_equals_feedback_with_zero_d() -> None:
    model = _model("mi_gru", {"mi_init": "mi"})
    x, y, m = _data()
    _, grads_t = _run("tbptt", model, x, y, m, truncation=1)
    _, grads_f = _run("feedback", model, x, y, m, d=torch.zeros(HID, dtype=F64))
    assert max_grad_diff(grads_t, grads_f) <= 1e-12


def test_compute_gradients_dispatches_to_each_method() -> None:
    model = _model("mi_gru", {"mi_init": "mi"})
    x, y, m = _data()
    d = torch.full((HID,), 0.5, dtype=F64)
    direct = {}
    for method, call in {
        "bptt": lambda: bptt_gradients(model, x, y, m, LOSS),
        "tbptt": lambda: tbptt_gradients(model, x, y, m, LOSS, 2),
        "feedback": lambda: feedback_gradients(model, x, y, m, LOSS, d),
    }.items():
        model.zero_grad(set_to_none=True)
        call()
        direct[method] = parameter_grads(model)
    assert max_grad_diff(_run("bptt", model, x, y, m)[1], direct["bptt"]) == 0.0
    assert max_grad_diff(_run("tbptt", model, x, y, m, truncation=2)[1], direct["tbptt"]) == 0.0
    assert max_grad_diff(_run("feedback", model, x, y, m, d=d)[1], direct["feedback"]) == 0.0
    assert max_grad_diff(direct["feedback"], direct["bptt"]) > 1e-6  # three different gradients


def test_gradients_accumulate_like_backward() -> None:
    model = _model("mi_gru", {"mi_init": "mi"})
    x, y, m = _data()
    _, once = _run("feedback", model, x, y, m, d=torch.full((HID,), 0.5, dtype=F64))
    compute_gradients("feedback", model, x, y, m, LOSS, d=torch.full((HID,), 0.5, dtype=F64))
    twice = parameter_grads(model)
    assert max((twice[k] - 2 * once[k]).abs().max().item() for k in once) <= 1e-12


def test_unknown_method_is_refused_naming_the_valid_ones() -> None:
    model = _model("gru", {})
    x, y, m = _data()
    with pytest.raises(ModelError, match=r"train.method: 'sgd' is not one of \['feedback', 'bptt'"):
        compute_gradients("sgd", model, x, y, m, LOSS)  # type: ignore[arg-type]


def test_feedback_without_d_is_refused() -> None:
    model = _model("gru", {})
    x, y, m = _data()
    with pytest.raises(ModelError, match=r"method 'feedback' needs the fixed feedback d"):
        compute_gradients("feedback", model, x, y, m, LOSS)


def test_lstm_with_feedback_is_refused_and_trains_with_bptt() -> None:
    model = _model("lstm", {})
    x, y, m = _data()
    with pytest.raises(ModelError, match=r"'lstm' does not support fixed-feedback training.*bptt"):
        compute_gradients("feedback", model, x, y, m, LOSS, d=torch.zeros(2 * HID, dtype=F64))
    loss, grads = _run("bptt", model, x, y, m)
    assert math.isfinite(loss.item())
    assert grads["rnn.weight_hh_l0"].abs().max().item() > 0


def test_truncation_below_one_is_refused() -> None:
    model = _model("gru", {})
    x, y, m = _data()
    with pytest.raises(ModelError, match=r"train.truncation: 0 is not a positive integer"):
        compute_gradients("tbptt", model, x, y, m, LOSS, truncation=0)


@pytest.mark.parametrize("method", ["bptt", "tbptt", "feedback"])
def test_mixed_precision_computes_the_loss_in_float32(method: str) -> None:
    torch.manual_seed(0)
    model = build("mi_gru", D, HID, HORIZON)
    x, y, m = (t.float() if t.is_floating_point() else t for t in _data())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_gradients(method, model, x, y, m, LOSS, d=torch.full((HID,), 0.5))
    assert loss.dtype == torch.float32
    grads = parameter_grads(model)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert grads["cell.weight_hh"].abs().max().item() > 0


def _sine_windows(count: int, steps: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy sines of random phase (period 16): inputs `[count, steps, 1]`, targets `[.., H]`."""
    generator = torch.Generator().manual_seed(seed)
    phase = 2 * math.pi * torch.rand(count, 1, generator=generator)
    t = torch.arange(steps + HORIZON, dtype=torch.float32)[None, :]
    series = torch.sin(2 * math.pi * t / 16 + phase)
    series = series + 0.1 * torch.randn(series.shape, generator=generator)  # [count, T + H]
    index = torch.arange(steps)[:, None] + torch.arange(1, HORIZON + 1)[None, :]  # [T, H]
    return series[:, :steps, None], series[:, index], torch.ones(count, steps, HORIZON)


@pytest.mark.parametrize("method", ["bptt", "feedback"])
def test_both_methods_learn_a_noisy_sine(method: str) -> None:
    torch.manual_seed(0)
    model = build("mi_gru", 1, 16, HORIZON)
    loss_fn = ForecastLoss(eta=1.0, burn_in=4)
    x_val, y_val, m_val = _sine_windows(64, 40, seed=999)
    with torch.no_grad():
        before = loss_fn(model(x_val), y_val, m_val).item()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-2)
    d = None
    for step in range(40):
        x, y, m = _sine_windows(32, 40, seed=step)
        if method == "feedback" and step % 10 == 0:
            d = estimate_feedback(model, [x], FeedbackConfig()).d
        optimiser.zero_grad(set_to_none=True)
        compute_gradients(method, model, x, y, m, loss_fn, d=d)  # type: ignore[arg-type]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    with torch.no_grad():
        after = loss_fn(model(x_val), y_val, m_val).item()
    assert after < 0.3 * before, (before, after)
