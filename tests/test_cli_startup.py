"""The command line answers at once (issue 20 item 6): ``--help``, ``--version`` and argument errors
never import torch or diffusers (the parser reads the built-in methods' snapshot,
:mod:`ccad.method_catalog`), and that snapshot says what the live registry says.

How fast it answers is measured by ``python -m benchmarks cli_startup`` (median of cold starts),
never here: these tests assert what is imported, which does not depend on the machine's load."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ccad.method_catalog import builtin_catalog, live_catalog

PROBE = """
import json, sys
from ccad.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "diffusers", "timm", "cv2", "gradio") if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def _probe(argv: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["bank", "--help"],
                                  ["predict", "--help"], ["app", "--help"],
                                  ["train", "data", "--out", "run", "--variant", "nosuch"],
                                  ["predict", "model"], ["nosuchcommand"]])
def test_help_version_and_argument_errors_import_no_heavy_module(argv: list[str]) -> None:
    result, out = _probe(argv)
    assert result["heavy"] == [], f"ccad {' '.join(argv)} imported {result['heavy']}"
    assert result["code"] == (0 if argv[-1] in ("--help", "--version") else 2), out


def test_train_help_lists_every_variant_with_its_options_and_an_unknown_one_is_refused_by_name() -> None:
    _, out = _probe(["train", "--help"])
    for m in builtin_catalog():
        assert f"  {m['name']:<10} {m['title']}" in out
        assert ", ".join(m["options"]) in out
    _, out = _probe(["train", "data", "--out", "run", "--variant", "nosuch"])
    assert "argument --variant: unknown variant 'nosuch'; available: patchcore, ccad-v" in out


def test_the_snapshot_is_the_live_registry() -> None:
    """A method whose title, description or config changed must regenerate the snapshot
    (``python -m ccad.method_catalog``); otherwise ``--help`` would describe an old method."""
    assert builtin_catalog() == live_catalog(), "stale ccad/method_catalog.json: run python -m ccad.method_catalog"


def test_a_plugin_registered_in_process_is_listed_and_accepted(capsys: pytest.CaptureFixture) -> None:
    from ccad.cli import build_parser
    from ccad.methods import get_method, register_method, unregister_method

    base = get_method("patchcore")

    @register_method
    class Toy(base):  # type: ignore[misc, valid-type]
        name = "toy-startup"
        title = "Toy for the CLI"
        description = "registered by a test"

    try:
        args = build_parser().parse_args(["train", "d", "--out", "r", "--variant", "toy-startup"])
        assert args.variant == "toy-startup"
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--help"])
        assert "toy-startup Toy for the CLI: registered by a test" in capsys.readouterr().out
    finally:
        unregister_method("toy-startup")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--out", "r", "--variant", "toy-startup"])
