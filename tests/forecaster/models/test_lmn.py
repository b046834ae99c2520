"""LMN and its linear-autoencoder pretraining: ALGORITHMS.md §3, oracles O5, O6, O7, O13."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch_helpers import ScriptedLoop, assert_cell_gradcheck

from forecaster.errors import ModelError
from forecaster.models import lmn as lmn_module
from forecaster.models.base import RecurrentForecaster
from forecaster.models.lmn import (
    LMN,
    LinearAutoencoder,
    LMNConfig,
    TeacherRNN,
    decode,
    encode,
    fit_linear_autoencoder,
    init_lmn_from_inputs,
    init_lmn_from_teacher,
    pretrain_lmn,
)

F64 = torch.float64
BATCH, STEPS, FEATURES, HIDDEN, HORIZON = 3, 7, 4, 5, 2


def _history_matrix(sequences: list[Tensor], history: int) -> Tensor:
    """Ξ written out row by row as in ALGORITHMS.md §3.2 (independent of the library's helper)."""
    rows = []
    for v in sequences:
        for t in range(v.shape[0]):
            blocks = [v[t - j] if t - j >= 0 else torch.zeros_like(v[0]) for j in range(history)]
            rows.append(torch.cat(blocks))
    return torch.stack(rows)  # [N_rows, L·k]


def _low_rank_sequences(seed: int = 0) -> list[Tensor]:
    """Sequences whose values lie in a 2-D subspace of R^3, so rank Ξ < min(N_rows, L·k)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(3, 2, generator=gen, dtype=F64)
    return [mixing @ torch.randn(2, t, generator=gen, dtype=F64) for t in (7, 7, 5, 6, 4)]


def _as_rows(sequences: list[Tensor]) -> list[Tensor]:
    return [s.T.contiguous() for s in sequences]  # [T_i, k]


def _lmn(memory_size: int = 6, dtype: torch.dtype = F64, **kwargs: object) -> LMN:
    torch.manual_seed(0)
    config = LMNConfig(hidden_size=HIDDEN, memory_size=memory_size, **kwargs)  # type: ignore[arg-type]
    return LMN(config, FEATURES, HORIZON).to(dtype)


def _inputs(dtype: torch.dtype = F64, seed: int = 1) -> Tensor:
    return torch.randn(BATCH, STEPS, FEATURES, generator=torch.Generator().manual_seed(seed)).to(
        dtype
    )


# ---- config and cell ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 0}, r"LMNConfig\.hidden_size: 0 is not a positive integer"),
        ({"memory_size": -3}, r"LMNConfig\.memory_size: -3"),
        ({"memory_size": True}, r"LMNConfig\.memory_size: True"),
        ({"activation": "relu"}, r"LMNConfig\.activation: 'relu' is not one of"),
        ({"lmn_init": "svd"}, r"LMNConfig\.lmn_init: 'svd'"),
        (
            {"lmn_init": "input_laes", "hidden_size": 4, "memory_size": 8},
            r"hidden_size: 4 must equal memory_size \(8\)",
        ),
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        LMNConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_cell_follows_the_lmn_equations(activation: str) -> None:
    model = _lmn(activation=activation)
    act = torch.tanh if activation == "tanh" else torch.sigmoid
    x, m = torch.randn(BATCH, FEATURES, dtype=F64), torch.randn(BATCH, 6, dtype=F64)
    with torch.no_grad():
        model.memory.bias.normal_()
    w_hm, w_mm = model.memory.weight[:, :HIDDEN], model.memory.weight[:, HIDDEN:]
    h = act(x @ model.input_proj.weight.T + model.input_proj.bias + m @ model.memory_to_hidden.T)
    expected = h @ w_hm.T + m @ w_mm.T + model.memory.bias
    torch.testing.assert_close(model.step(x, m), expected, atol=1e-12, rtol=0)
    # The head reads the memory only: ŷ = W^{mo} m + b_o.
    states = model.run_states(_inputs())
    readout = states[:, 1:] @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(_inputs()), readout, atol=1e-12, rtol=0)
    assert model.state_size == 6
    assert model.forecast(_inputs()).shape == (BATCH, HORIZON)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("cls", [LMN, TeacherRNN])
def test_batched_recompute_equals_the_loop(cls: type, dtype: torch.dtype, tol: float) -> None:
    """O13: one batched `recur` call on [B·T] rows reproduces the loop's states."""
    torch.manual_seed(0)
    model = cls(LMNConfig(hidden_size=HIDDEN, memory_size=6), FEATURES, HORIZON).to(dtype)
    x = _inputs(dtype)
    s0 = torch.randn(BATCH, model.state_size, dtype=dtype)
    with torch.no_grad():
        states = model.run_states(x, s0)  # [B, T+1, S]
        recomputed = model.recompute_states(x, states[:, :-1])
    torch.testing.assert_close(recomputed, states[:, 1:], atol=tol, rtol=0)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_folded_loop_equals_the_generic_loop(activation: str, grad: bool) -> None:
    """O13 for LMN's own `run_states` (the folded sigmoid form: eager under autograd, scripted
    without): the generic loop of `recur`'s states, and under autograd the same gradients."""
    model = _lmn(activation=activation)
    with torch.no_grad():
        model.memory.bias.normal_()
    x, s0 = _inputs(), torch.randn(BATCH, 6, dtype=F64)
    with torch.set_grad_enabled(grad):
        ours = model.run_states(x, s0)
        generic = RecurrentForecaster.run_states(model, x, s0)
    torch.testing.assert_close(ours, generic, atol=1e-12, rtol=0)
    if grad:
        grads = [
            torch.autograd.grad(model.readout(s[:, 1:]).square().sum(), list(model.parameters()))
            for s in (ours, generic)
        ]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_feedback_forward_keeps_the_gates(activation: str) -> None:
    """`feedback_forward`: the generic loop's states and gates `u` with `h = c·u − (c − 1)`
    (c = 2 for tanh, 1 for the sigmoid), time-major."""
    model = _lmn(activation=activation)
    x, s0 = _inputs(), torch.randn(BATCH, 6, dtype=F64)
    kept = model.feedback_forward(x, s0)
    assert kept is not None
    states, gates = kept
    with torch.no_grad():
        torch.testing.assert_close(
            states, RecurrentForecaster.run_states(model, x, s0), atol=1e-12, rtol=0
        )
        h = model.functional_states(x, s0)  # [B, T, h]
    c = 2.0 if activation == "tanh" else 1.0
    assert gates.shape == (STEPS, BATCH, HIDDEN)
    torch.testing.assert_close((c * gates - (c - 1)).transpose(0, 1), h, atol=1e-12, rtol=0)


def test_without_the_scripted_loop_the_generic_paths_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the folded loop cannot be scripted, `feedback_forward` declines (the trainer then
    runs the generic loop) and a no-grad `run_states` runs the folded form eagerly."""
    monkeypatch.setattr(lmn_module, "_scripted_sigmoid_states", lambda: None)
    model = _lmn()
    x, s0 = _inputs(), torch.randn(BATCH, 6, dtype=F64)
    assert model.feedback_forward(x, s0) is None
    with torch.no_grad():
        torch.testing.assert_close(
            model.run_states(x, s0),
            RecurrentForecaster.run_states(model, x, s0),
            atol=1e-12,
            rtol=0,
        )


@pytest.mark.parametrize("cls", [LMN, TeacherRNN])
def test_cell_passes_gradcheck(cls: type) -> None:
    torch.manual_seed(0)
    model = cls(LMNConfig(hidden_size=3, memory_size=4), 2, HORIZON).double()
    with torch.no_grad():
        if isinstance(model, LMN):
            model.memory.bias.normal_()
    assert_cell_gradcheck(model, features=2)


def test_cell_scripts_and_matches_forecast() -> None:
    model = _lmn()
    scripted = torch.jit.script(ScriptedLoop(model))
    x = _inputs()
    out = scripted(x.transpose(0, 1).contiguous(), model.initial_state(BATCH))
    torch.testing.assert_close(out, model.forecast(x), atol=1e-12, rtol=0)


# ---- linear autoencoder (§3.2) -----------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_autoencoder_is_exact_at_full_rank(center: bool, method: str) -> None:
    """O5: with p = rank Ξ, m_t = U_pᵀ ξ_t at every step and m_T decodes every v_t."""
    sequences = _as_rows(_low_rank_sequences())
    mean = torch.cat(sequences).mean(0) if center else torch.zeros(3, dtype=F64)
    xi = _history_matrix([s - mean for s in sequences], history=7)  # [29, 21]
    rank = int(torch.linalg.matrix_rank(xi))
    assert rank < min(xi.shape)  # a real truncation, not a square orthogonal basis
    ae = fit_linear_autoencoder(sequences, memory_size=rank, center=center, method=method)
    assert ae.A.shape == (rank, 3)
    assert ae.B.shape == (rank, rank)
    assert ae.explained_energy == pytest.approx(1.0, abs=1e-12)
    row = 0
    for v in sequences:
        memory = encode(ae, v)  # [T, p]
        for t in range(v.shape[0]):
            torch.testing.assert_close(memory[t], ae.components.T @ xi[row], atol=1e-8, rtol=0)
            row += 1
        torch.testing.assert_close(decode(ae, memory[-1], v.shape[0]), v, atol=1e-8, rtol=0)


def test_autoencoder_below_rank_does_not_decode_exactly() -> None:
    sequences = _as_rows(_low_rank_sequences())
    rank = int(torch.linalg.matrix_rank(_history_matrix(sequences, history=7)))
    ae = fit_linear_autoencoder(sequences, memory_size=rank - 2)
    errors = [(decode(ae, encode(ae, v)[-1], v.shape[0]) - v).abs().max() for v in sequences]
    assert max(errors) > 1e-3


def test_autoencoder_memory_beyond_the_row_width_stays_exact() -> None:
    """p > L·k: the basis is completed / zero-padded and decoding stays exact."""
    sequences = _as_rows(_low_rank_sequences())
    for memory_size in (22, 30):  # L·k = 21
        ae = fit_linear_autoencoder(sequences, memory_size=memory_size)
        assert ae.A.shape == (memory_size, 3)
        for v in sequences:
            decoded = decode(ae, encode(ae, v)[-1], v.shape[0])
            torch.testing.assert_close(decoded, v, atol=1e-8, rtol=0)


def test_autoencoder_reconstruction_error_is_monotone_in_memory_size() -> None:
    """O6: one-step reconstruction error of Ξ U_p U_pᵀ is non-increasing in p, 0 at rank Ξ."""
    sequences = _as_rows(_low_rank_sequences(seed=3))
    xi = _history_matrix(sequences, history=7)
    rank = int(torch.linalg.matrix_rank(xi))
    singular = torch.linalg.svdvals(xi)
    errors = []
    for p in range(1, rank + 3):
        basis = fit_linear_autoencoder(sequences, memory_size=p).components  # [L·k, p]
        error = float((xi - xi @ basis @ basis.T).square().sum(1).mean())
        # Eckart–Young: the discarded energy, per row.
        assert error == pytest.approx(float(singular[p:].square().sum()) / xi.shape[0], abs=1e-10)
        errors.append(error)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[rank - 2] > 1e-6
    assert max(errors[rank - 1 :]) < 1e-10


def test_autoencoder_picks_memory_size_from_the_energy() -> None:
    sequences = [torch.randn(20, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ae = fit_linear_autoencoder(sequences, history=5)
    share = ae.singular_values.square().cumsum(0) / ae.singular_values.square().sum()
    p = ae.memory_size
    assert share[p - 1] >= 0.999
    assert p == 1 or share[p - 2] < 0.999
    assert ae.explained_energy == pytest.approx(float(share[p - 1]))
    capped = fit_linear_autoencoder(sequences, history=5, max_memory_size=4)
    assert capped.memory_size == 4
    assert capped.explained_energy < 0.999
    assert isinstance(capped, LinearAutoencoder)
    assert capped.history == 5


def test_autoencoder_truncated_history_encodes_recent_steps() -> None:
    """With L < T, the memory still decodes the last L steps of every prefix it has seen."""
    sequences = _as_rows(_low_rank_sequences(seed=5))
    ae = fit_linear_autoencoder(sequences, memory_size=6, history=3)  # rank ≤ 2·3
    for v in sequences:
        memory = encode(ae, v)
        for t in range(v.shape[0]):
            torch.testing.assert_close(
                decode(ae, memory[t], 1)[0], v[t], atol=1e-8, rtol=0
            )  # one-step decode exact for every t


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: fit_linear_autoencoder([]), r"sequences: no sequences given"),
        (
            lambda: fit_linear_autoencoder([torch.ones(4, 2), torch.ones(4, 3)]),
            r"sequences\[1\]: shape \(4, 3\)",
        ),
        (lambda: fit_linear_autoencoder(torch.ones(2, 2, 2, 2)), r"sequences: shape"),
        (lambda: fit_linear_autoencoder([torch.zeros(4, 2)]), r"every value is zero"),
        (
            lambda: fit_linear_autoencoder([torch.tensor([[1.0], [float("nan")]])]),
            r"sequences\[0\]: contains NaN",
        ),
        (lambda: fit_linear_autoencoder([torch.ones(4, 2)], memory_size=0), r"memory_size: 0"),
        (lambda: fit_linear_autoencoder([torch.ones(4, 2)], energy=1.5), r"energy: 1.5"),
        (lambda: fit_linear_autoencoder([torch.ones(4, 2)], method="qr"), r"method: 'qr'"),
        (
            lambda: fit_linear_autoencoder([torch.ones(5000, 2)]),
            r"history: L·k = 5000·2 = 10000 exceeds 8192",
        ),
    ],
)
def test_autoencoder_rejects_bad_arguments(call: object, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        call()  # type: ignore[operator]


def test_encode_and_decode_reject_wrong_widths() -> None:
    ae = fit_linear_autoencoder(_as_rows(_low_rank_sequences()), memory_size=4)
    with pytest.raises(ModelError, match=r"sequence: shape \(7, 2\)"):
        encode(ae, torch.ones(7, 2))
    with pytest.raises(ModelError, match=r"memory: shape \(5,\)"):
        decode(ae, torch.ones(5), 2)
    with pytest.raises(ModelError, match=r"decode\.steps: 0"):
        decode(ae, torch.ones(4), 0)


# ---- pretraining (§3.3) ------------------------------------------------------------------------


def _teacher(activation: str = "tanh") -> TeacherRNN:
    torch.manual_seed(2)
    config = LMNConfig(hidden_size=HIDDEN, activation=activation)  # type: ignore[arg-type]
    teacher = TeacherRNN(config, FEATURES, HORIZON).double()
    with torch.no_grad():
        teacher.recurrent_weight.mul_(2.0)  # livelier dynamics than the ±1/√h init
    return teacher


def _teacher_states_rank(teacher: TeacherRNN, x: Tensor, history: int) -> int:
    with torch.no_grad():
        states = list(teacher.run_states(x)[:, 1:].unbind(0))
    return int(torch.linalg.matrix_rank(_history_matrix(states, history)))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize(("history", "extra"), [(None, 0), (None, 4), (2, 0)])
def test_teacher_init_reproduces_the_teacher(
    activation: str, history: int | None, extra: int
) -> None:
    """O7: with p ≥ rank Ξ of the teacher's states, the LMN starts equal to the teacher."""
    teacher, x = _teacher(activation), _inputs()
    rank = _teacher_states_rank(teacher, x, STEPS if history is None else history)
    lmn = _lmn(memory_size=rank + extra, activation=activation)
    ae = init_lmn_from_teacher(lmn, teacher, x, history=history)
    assert ae.memory_size == rank + extra
    with torch.no_grad():
        teacher_h = teacher.run_states(x)[:, 1:]
        torch.testing.assert_close(lmn.functional_states(x), teacher_h, atol=1e-6, rtol=0)
        torch.testing.assert_close(lmn(x), teacher(x), atol=1e-6, rtol=0)


def test_teacher_init_accepts_windows_of_different_lengths() -> None:
    teacher = _teacher()
    windows = [_inputs()[0], _inputs()[1, :4]]
    lmn = _lmn(memory_size=11)  # rank Ξ ≤ 7 + 4 rows
    init_lmn_from_teacher(lmn, teacher, windows)
    with torch.no_grad():
        for window in windows:
            x = window.unsqueeze(0)
            torch.testing.assert_close(lmn(x), teacher(x), atol=1e-6, rtol=0)


def test_teacher_init_below_rank_is_only_approximate() -> None:
    teacher, x = _teacher(), _inputs()
    rank = _teacher_states_rank(teacher, x, STEPS)
    lmn = _lmn(memory_size=rank - 6)
    init_lmn_from_teacher(lmn, teacher, x)
    with torch.no_grad():
        assert float((lmn(x) - teacher(x)).abs().max()) > 1e-4


def test_teacher_init_rejects_a_mismatched_teacher() -> None:
    lmn = _lmn(activation="sigmoid")
    with pytest.raises(ModelError, match=r"teacher\.activation: 'tanh' differs"):
        init_lmn_from_teacher(lmn, _teacher("tanh"), _inputs())
    wide = TeacherRNN(LMNConfig(hidden_size=HIDDEN + 1), FEATURES, HORIZON).double()
    with pytest.raises(ModelError, match=r"teacher\.hidden_size: 6 differs"):
        init_lmn_from_teacher(_lmn(), wide, _inputs())
    with pytest.raises(ModelError, match=r"inputs: shape \(3, 7, 2\)"):
        init_lmn_from_teacher(_lmn(), _teacher(), torch.ones(3, 7, 2, dtype=F64))


def _input_laes_lmn() -> LMN:
    torch.manual_seed(0)
    config = LMNConfig(hidden_size=6, memory_size=6, lmn_init="input_laes")
    return LMN(config, FEATURES, HORIZON).double()


def test_input_laes_sets_the_memory_and_fits_the_head_by_least_squares() -> None:
    lmn, x = _input_laes_lmn(), _inputs()
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(BATCH, STEPS, HORIZON, generator=gen, dtype=F64)
    mask = (torch.rand(BATCH, STEPS, HORIZON, generator=gen) > 0.3).to(F64)
    ae = pretrain_lmn(lmn, x, y, mask)
    assert ae is not None
    eye = torch.eye(6, dtype=F64)
    assert torch.equal(lmn.input_proj.weight, ae.A)
    torch.testing.assert_close(lmn.input_proj.bias, -(ae.A @ ae.mean), atol=1e-15, rtol=0)
    assert torch.equal(lmn.memory_to_hidden, torch.zeros(6, 6, dtype=F64))
    assert torch.equal(lmn.memory.weight, torch.cat([eye, ae.B], dim=1))
    # Least squares: the masked squared error is stationary in the head's parameters.
    loss = ((lmn(x) - y).square() * mask).sum()
    grads = torch.autograd.grad(loss, [lmn.head.weight, lmn.head.bias])
    assert max(float(g.abs().max()) for g in grads) < 1e-9
    # ... and masked entries play no part.
    other = _input_laes_lmn()
    init_lmn_from_inputs(other, x, torch.where(mask > 0, y, 1e6), mask)
    torch.testing.assert_close(other.head.weight, lmn.head.weight, atol=1e-9, rtol=0)


def test_pretrain_dispatches_on_lmn_init() -> None:
    lmn, x = _lmn(), _inputs()
    before = {k: v.clone() for k, v in lmn.state_dict().items()}
    assert pretrain_lmn(lmn, x) is None  # "random": nothing to do
    assert all(torch.equal(v, lmn.state_dict()[k]) for k, v in before.items())

    teacher_lmn = _lmn(memory_size=21, lmn_init="teacher_laes")
    with pytest.raises(ModelError, match=r"teacher: lmn_init 'teacher_laes' needs a trained"):
        pretrain_lmn(teacher_lmn, x)
    teacher = _teacher()
    assert pretrain_lmn(teacher_lmn, x, teacher=teacher) is not None
    with torch.no_grad():
        torch.testing.assert_close(teacher_lmn(x), teacher(x), atol=1e-6, rtol=0)

    with pytest.raises(ModelError, match=r"targets: lmn_init 'input_laes' needs targets"):
        pretrain_lmn(_input_laes_lmn(), x)
    with pytest.raises(ModelError, match=r"targets: shape \(3, 7, 1\)"):
        pretrain_lmn(_input_laes_lmn(), x, torch.ones(3, 7, 1, dtype=F64))
