"""Entry point of the Hugging Face Space (and `python app.py`): the same app as `ccad app`.
State (training runs, review decisions, uploads) goes to $CCAD_STATE_DIR or the user data folder
(`--state-dir` overrides), never into the repository.

A Space runs this file from the repository root; the bundled demo model in checkpoints/demo is
loaded, so a sample inspection works offline on CPU. Locally: `python app.py [--port 7860]`.
"""
from __future__ import annotations

import os

from app.main import build_app, launch
from app.state import default_state_dir

demo = build_app(data_root=os.environ.get("CCAD_DATA_ROOT", "."), state_dir=default_state_dir())

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="ccad inspection app (same as `ccad app`)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    launch(host=args.host, port=args.port, demo=demo)
