"""The app's callbacks as plain methods (testable without a browser); every computation is a call
into ``ccad`` (``fit_detector``, ``train_detector``, ``AnomalyDetector``, ``evaluate``).

Every public method turns a bad input into a :class:`UserError` (or a message) naming the file,
folder or field; nothing a user does can raise out of a callback into the server. The Gradio
wiring in :mod:`app.main` and :mod:`app.tabs` only adapts these results to components.

:class:`AppController` is composed of one mixin per tab (:mod:`app.control`); the engine access is
:mod:`app.engine`, the method settings forms :mod:`app.forms`, a session's results :mod:`app.batch`.
"""
from __future__ import annotations

from .control.bank import BankMixin
from .control.evaluation import EvaluateMixin
from .control.inspection import InspectMixin
from .control.models import ModelsMixin
from .control.training import TrainingMixin
from .engine import Engine
from .errors import UserError

__all__ = ["AppController", "Engine", "UserError"]


class AppController(ModelsMixin, InspectMixin, BankMixin, TrainingMixin, EvaluateMixin):
    """All app callbacks; one instance per server (its registry and job manager are shared)."""
