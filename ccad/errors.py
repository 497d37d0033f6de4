"""Exceptions shared across layers (below the detector, the hub helpers and the CLI, so none of
them has to import another to raise or catch one)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A saved detector folder is missing files, corrupt, or from an incompatible version."""
