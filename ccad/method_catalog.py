"""What the command line says about the built-in methods, without importing them.

``ccad --help``, ``ccad train --help`` and an argument error must answer in well under 2 s on
two loaded cores (issue 20 item 6). Importing a method module imports torch and diffusers
(5-20 s there), so the parser reads this module's snapshot of the built-in methods instead:
``method_catalog.json`` beside this file holds, for every built-in method in ``_builtin``'s order, its
name, title, description, whether it trains, and its options (``name=default``, as
:func:`ccad.config.option_help` lists them). Heavy imports happen inside the commands.

The snapshot is checked against the live registry by ``tests/test_cli_startup.py``; after
changing a method's title, description or config, regenerate it with::

    python -m ccad.method_catalog

Plug-in methods (registered at run time with ``register_method``) are not in the snapshot; the
CLI adds them from the live registry when that registry is already imported in the process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).with_name("method_catalog.json")
_FIELDS = ("name", "title", "description", "trainable", "options")


def builtin_catalog() -> list[dict[str, Any]]:
    """The snapshot: one dict per built-in method (keys ``name``, ``title``, ``description``,
    ``trainable``, ``options``), in the registry's order (the baseline first)."""
    return json.loads(CATALOG_FILE.read_text(encoding="utf-8"))


def _describe(name: str, method: Any) -> dict[str, Any]:
    from .config import option_help

    return {"name": name, "title": method.title, "description": method.description,
            "trainable": bool(method.trainable), "options": option_help(method.Config)}


def live_catalog(builtin_only: bool = True) -> list[dict[str, Any]]:
    """The same dicts read from the registry (imports every method module: slow)."""
    from .methods.base import get_method, method_names

    out = []
    for name in method_names():
        m = get_method(name)
        if builtin_only and not m.__module__.startswith("ccad.methods."):
            continue
        out.append(_describe(name, m))
    return out


def plugin_catalog() -> list[dict[str, Any]]:
    """Methods registered in this process that the snapshot does not hold, read from the live
    registry only when it is already imported (it never imports it)."""
    if "ccad.methods.base" not in sys.modules:
        return []
    known = {m["name"] for m in builtin_catalog()}
    return [m for m in live_catalog(builtin_only=False) if m["name"] not in known]


def available_names() -> list[str]:
    """Every method name the CLI accepts: the built-in ones, then plug-ins registered in-process."""
    return [m["name"] for m in builtin_catalog() + plugin_catalog()]


def write_catalog(path: Path = CATALOG_FILE) -> list[dict[str, Any]]:
    """Regenerate the snapshot from the live registry."""
    cat = live_catalog(builtin_only=True)
    path.write_text(json.dumps(cat, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return cat


if __name__ == "__main__":
    print(f"wrote {len(write_catalog())} methods to {CATALOG_FILE}")
