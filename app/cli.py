"""``ccad app``: the app adds this subcommand to the ``ccad`` CLI through the ``ccad.commands``
entry point (pyproject.toml), so the engine never imports the app."""
from __future__ import annotations

import argparse
from typing import Any


def _run(a: argparse.Namespace) -> int:
    from .main import launch

    launch(host=a.host, port=a.port, data_root=a.data_root, model=a.model, share=a.share, state_dir=a.state_dir)
    return 0


def add_command(sub: Any) -> None:
    sp = sub.add_parser("app", help="start the Gradio inspection app",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sp.add_argument("--port", type=int, default=7860, help="port")
    sp.add_argument("--data-root", default=".", help="server folders the app may read are confined to this root")
    sp.add_argument("--model", default=None, help="model folder or Hub id to load (default: the bundled demo)")
    sp.add_argument("--share", action="store_true", help="create a public Gradio share link")
    sp.add_argument("--state-dir", default=None,
                    help="folder for the app's state: training runs, review decisions, uploads being inspected "
                         "(default: $CCAD_STATE_DIR, else the user data folder, e.g. ~/.local/share/ccad/app)")
    sp.set_defaults(func=_run)
