"""The training heap: freed blocks are reused while training on CPU and handed back afterwards."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster.config import LossConfig, TrainConfig
from forecaster.models.registry import build
from forecaster.training import heap
from forecaster.training.heap import training_heap
from forecaster.training.trainer import EpochRecord, TrainHistory, train
from forecaster.training.windows import ForkingWindows

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the training heap acts on glibc's malloc")

BLOCK = 64 << 20  # above glibc's largest adaptive mmap threshold (32 MiB): unmapped on free
PAGES = BLOCK // resource.getpagesize()


def _faults_of_block() -> int:
    """Page faults of allocating, touching and freeing one `BLOCK`."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(BLOCK // 4)
    block.fill_(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _settled_faults() -> list[int]:
    """Faults of three more blocks once two blocks in a row were allocated without any (after at
    most eight tries: the heap grows to hold the block, sometimes in two places)."""
    quiet = 0
    for _ in range(8):
        quiet = quiet + 1 if _faults_of_block() < PAGES // 20 else 0
        if quiet == 2:
            break
    return [_faults_of_block() for _ in range(3)]


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@needs_glibc
def test_freed_blocks_are_reused_inside_and_returned_after() -> None:
    with training_heap() as applied:
        assert applied
        reused = _settled_faults()
        kept = _rss()
    returned = _rss()
    # Without the heap each block is mapped afresh: ~PAGES faults (fewer only with huge pages).
    assert max(reused) < PAGES // 20, f"{reused} faults for a {PAGES}-page block"
    assert kept - returned > BLOCK // 2, f"RSS {kept} inside vs {returned} after"


@needs_glibc
def test_nested_uses_restore_only_when_the_last_leaves() -> None:
    with training_heap():
        with training_heap() as inner:
            assert inner
            _settled_faults()
        assert heap._users == 1
        assert max(_settled_faults()) < PAGES // 20  # still kept after the inner one left
    assert heap._users == 0


_AFTER_TRAINING = """
import resource, statistics, torch
from forecaster.losses import ForecastLoss
from forecaster.models.registry import build
from forecaster.training.gradients import compute_gradients
from forecaster.training.heap import training_heap
with training_heap():
    pass
torch.manual_seed(0)
model = build("mi_gru", 1, 32, 24)
x, y, loss = torch.randn(16, 200, 1), torch.randn(16, 200, 24), ForecastLoss()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.zero_grad(set_to_none=True)
    compute_gradients("bptt", model, x, y, None, loss)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]), faults)
"""


@needs_glibc
def test_after_training_the_process_is_not_left_faulting() -> None:
    """Leaving must not fix glibc's initial 128 KiB thresholds: every block above them would be
    mapped and faulted afresh for the rest of the process. Measured in a fresh process (BPTT
    steps of a small MI-GRU after a training_heap): ~2,200 faults per step with the thresholds
    fixed at 128 KiB, a few hundred at most with glibc's defaults or the settled values."""
    done = subprocess.run(
        [sys.executable, "-c", _AFTER_TRAINING], capture_output=True, text=True, check=True
    )
    assert float(done.stdout.split()[0]) < 1000, done.stdout


def test_without_glibc_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with training_heap() as applied:
        assert not applied
    assert heap._users == 0


class _BlockProbe:
    """A callback measuring, inside the training loop, the faults of a re-allocated block."""

    def __init__(self) -> None:
        self.faults: list[int] = []

    def on_epoch_end(self, record: EpochRecord, history: TrainHistory) -> None:
        self.faults.append(max(_settled_faults()))

    def on_train_end(self, history: TrainHistory) -> None:
        pass


@needs_glibc
def test_cpu_training_runs_inside_the_training_heap() -> None:
    values = np.sin(np.arange(120) / 3.0)
    windows = ForkingWindows([values], lookback=12, horizon=3, rows=slice(0, 90))
    val = ForkingWindows([values], lookback=12, horizon=3, rows=slice(78, 120))
    torch.manual_seed(0)
    model = build("gru", input_size=1, hidden_size=4, horizon=3)
    config = TrainConfig(
        method="bptt", epochs=2, batch_size=16, device="cpu", loss=LossConfig(eta=0.0, burn_in=0)
    )
    probe = _BlockProbe()
    train(model, windows, val, config, callbacks=[probe])
    assert len(probe.faults) == 2
    assert max(probe.faults) < PAGES // 20, f"{probe.faults} faults for a {PAGES}-page block"
    assert heap._users == 0, "the heap setting outlived the training run"
