"""Shared test set-up: one torch thread (the machine has 2 cores shared by
parallel test processes), and the paths of the shared data sets."""
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the pipeline tests do not all need torch
    torch = None
else:
    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the project root (coco-mini, cocoapi-fake, the paper)."""
    if not SHARED.is_dir():
        raise RuntimeError(f"{SHARED} is missing: the tests need ../shared beside the checkout")
    return SHARED
