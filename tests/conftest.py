"""Shared pytest fixtures (kept minimal; every test makes its own small data)."""

from __future__ import annotations

import os

import pytest

# Keep tests light on the shared 2-core machine: one thread unless OMP_NUM_THREADS says otherwise
# (the suite must pass with 1 and with 2; float comparisons carry float32 tolerances for that).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _limit_torch_threads() -> None:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip without CUDA (``CCAD_GPU_TESTS_ON_CPU=1`` runs them on the CPU)."""
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if not gpu_items or os.environ.get("CCAD_GPU_TESTS_ON_CPU") == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (set CCAD_GPU_TESTS_ON_CPU=1 to run on the CPU)")
    for it in gpu_items:
        it.add_marker(skip)
