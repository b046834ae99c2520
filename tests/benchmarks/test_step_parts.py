"""benchmarks/step_parts.py times the trainer's step in parts: composed in order, the parts
must give the trainer's own gradients, or the breakdown describes some other step."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

step_parts = load_benchmark("step_parts")
train_speed = load_benchmark("train_speed")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mi_gru", "lmn"])
@pytest.mark.parametrize("method", ["bptt", "feedback"])
def test_the_parts_in_order_are_the_trainers_step(name: str, method: str) -> None:
    case = train_speed.make_case(name, 8, 12)
    model = case["model"]
    train_speed.step_fn(method, case)()
    expected = _grads(model)
    assert len(expected) == len(list(model.parameters()))

    model.zero_grad(set_to_none=True)
    parts, kept = step_parts.part_fns(case)
    for part in ("forward", "head", "recursion", "scan"):
        parts[part]()
    if method == "feedback":
        kept["delta"] = kept["scan_delta"]
    head = _grads(model)  # the head part's gradients; the cell backward part zeroes first
    parts["cell_backward"]()
    got = _grads(model)
    assert set(got) | set(head) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got.get(key, head.get(key)), value, rtol=1e-5, atol=1e-6)
