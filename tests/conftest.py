"""Shared fixtures: the location of ../shared/data and the GPU marker."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (ETT, NAB); CI lays ../shared beside the clone, so absence is an error."""
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repo)"
        )
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip only when CUDA is absent."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in gpu_items:
        item.add_marker(skip)
