"""Training: gradients by fixed feedback, BPTT or truncated BPTT, and the trainer loop.

`forecaster.training.gradients.compute_gradients` is the one gradient entry point;
`forecaster.training.feedback` holds the reverse scans and the estimate of the fixed feedback
(ALGORITHMS.md §5). Import-light on purpose: nothing here imports torch until a submodule is used,
so the CLI can ask `launched_by_torchrun()` before paying for torch.
"""

from __future__ import annotations

import os

__all__ = ["launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process group (`torchrun` sets these)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
