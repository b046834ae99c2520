"""Helpers shared by the model and training tests (importable because pytest's pythonpath
includes tests/)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

F64 = torch.float64


class StepModule(nn.Module):
    """`model.step` as a module's forward, for `torch.func.functional_call`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return self.model.step(x, s)


class ScriptedLoop(nn.Module):
    """A time-major loop over `recur`, as the exporter scripts it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        a = self.model.project_inputs(x)  # [T, B, P]
        for t in range(a.size(0)):
            s = self.model.recur(a[t], s)
        return self.model.readout(s)


def random_batch(
    batch: int, steps: int, features: int, horizon: int, seed: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 inputs `[B, T, d]`, targets `[B, T, H]` and a mask with ~20% of entries off."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, features, generator=generator, dtype=F64)
    target = torch.randn(batch, steps, horizon, generator=generator, dtype=F64)
    mask = torch.rand(batch, steps, horizon, generator=generator) > 0.2
    return x, target, mask


def parameter_grads(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter's gradient (zeros where there is none)."""
    return {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


def max_grad_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest absolute difference between two gradient dictionaries."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_cell_gradcheck(model: nn.Module, features: int) -> None:
    """`torch.autograd.gradcheck` of `model.step` w.r.t. input, state and every parameter."""
    wrapper = StepModule(model)
    names = [name for name, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())
    x = torch.randn(2, features, dtype=F64, requires_grad=True)
    s = torch.randn(2, model.state_size, dtype=F64, requires_grad=True)

    def cell(x: Tensor, s: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(wrapper, dict(zip(names, ps, strict=True)), (x, s))

    assert torch.autograd.gradcheck(cell, (x, s, *params))
