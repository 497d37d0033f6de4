"""Server-wide app state: the loaded models (a named registry) and the server's folders.

Models are shared by every browser session of one server (loading a 10 MB detector once per
tab would waste memory); each session picks one by name in the model dropdown, so two users can
inspect with different models. The registry remembers the last model picked anywhere as the
``active`` one (the DAGM review tab and ``get_detector`` use it).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "checkpoints" / "demo"
SAMPLES_DIR = REPO_ROOT / "assets" / "samples"
STATE_DIR_ENV = "CCAD_STATE_DIR"


def default_state_dir(given: Optional[str | os.PathLike] = None) -> Path:
    """Where the app keeps its state (training runs, review decisions, per-request uploads): ``given``
    (``--state-dir``), else ``$CCAD_STATE_DIR``, else the user data folder of ``ccad``
    (platformdirs: ``~/.local/share/ccad/app`` on Linux, ``%LOCALAPPDATA%\\ccad\\app`` on Windows).
    Never the checkout, so the app runs from a read-only install or a Space."""
    if given:
        return Path(given).expanduser()
    env = os.environ.get(STATE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_data_dir

        base = Path(user_data_dir("ccad", appauthor=False))
    except ImportError:  # platformdirs is a dependency; this only guards a broken install
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "ccad"
    return base / "app"


@dataclass
class ModelEntry:
    name: str
    detector: Any
    source: str  # where it came from: "bundled demo", "folder /x", "hub user/repo@rev", "bank built from ..."
    folder: Optional[str] = None  # a local folder holding it, if any (for saving / evaluation)
    extra: dict[str, Any] = field(default_factory=dict)


class ModelRegistry:
    """Thread-safe name -> :class:`ModelEntry` map with an insertion order and an active name."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self.active: Optional[str] = None

    def add(self, name: str, detector: Any, source: str, folder: Optional[str] = None,
            activate: bool = True, replace: bool = False, **extra: Any) -> str:
        """Register ``detector`` under ``name`` (made unique with a suffix); returns the final name.
        ``replace=True`` puts it in place of an entry of that name instead (a run trained again)."""
        with self._lock:
            final, i = name, 2
            while not replace and final in self._entries and self._entries[final].detector is not detector:
                final = f"{name} ({i})"
                i += 1
            self._entries[final] = ModelEntry(final, detector, source, folder, dict(extra))
            if activate or self.active is None:
                self.active = final
            return final

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, name: Optional[str]) -> Optional[ModelEntry]:
        with self._lock:
            if name is None:
                return None
            return self._entries.get(name)

    def detector(self, name: Optional[str] = None) -> Optional[Any]:
        """The detector called ``name`` (the active one when ``name`` is None), or None."""
        entry = self.get(name if name is not None else self.active)
        return None if entry is None else entry.detector

    def set_active(self, name: Optional[str]) -> None:
        with self._lock:
            if name in self._entries:
                self.active = name

    def with_bank(self) -> list[str]:
        """Names of the models whose detector holds a feature bank (bank sources for training)."""
        with self._lock:
            return [n for n, e in self._entries.items() if getattr(e.detector, "bank", None) is not None]
