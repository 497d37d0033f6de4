"""Shared pytest fixtures (kept minimal; every test makes its own small data)."""

from __future__ import annotations

import os

import pytest

# Keep tests light on the shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _limit_torch_threads() -> None:
    import torch

    torch.set_num_threads(1)
