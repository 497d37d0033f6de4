"""The one exception the app's callbacks raise: a problem with what the user asked for."""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for; its message is shown in the UI as is."""
