"""Exceptions shared across layers (below the detector, the hub helpers and the CLI, so none of
them has to import another to raise or catch one)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A saved detector folder is missing files, corrupt, or from an incompatible version."""


class RunFolderExistsError(ValueError):
    """The output folder already holds a run or a model that this call would overwrite."""


class Cancelled(RuntimeError):
    """A long operation was stopped because its ``cancel()`` callable returned True (the project's
    one cancellation exception: bank builds, latent caches, training)."""


class WeightsNotFound(RuntimeError):
    """Pretrained weights for a backbone are not available; the message says how to get them
    (raised by :mod:`ccad.features.backbone`; here so the CLI reports it without importing it)."""
