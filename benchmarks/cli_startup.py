"""Cold-start time of the command line (issue 20 item 6): ``--help``, ``--version`` and an argument
error must answer in under 2 s on two loaded cores.

Each command runs ``--repeat`` (5) times as a fresh process (``python -m ccad.cli ...``, the same
code as the ``ccad`` script); a row per command gives the median and the worst wall time, plus
the modules it imported among torch/diffusers/timm/cv2/gradio (none is the point: the parser
reads :mod:`ccad.method_catalog` instead of importing the methods). The bar is the median.

Usage: ``python -m benchmarks cli_startup [--repeat 5] [--json PATH]``
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Optional

from benchmarks.common import JsonLines, command, make_parser, parse

COMMANDS = [["--help"], ["--version"], ["train", "--help"], ["predict", "--help"],
            ["train", "data", "--out", "run", "--variant", "nosuch"], ["bank"]]
HEAVY = ("torch", "diffusers", "timm", "cv2", "gradio")
PROBE = ("import sys, runpy\nsys.argv = ['ccad'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('ccad.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")


def time_command(argv: list[str], repeat: int) -> dict:
    times, heavy = [], ""
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        heavy = proc.stderr.rsplit("HEAVY=", 1)[-1].strip()
    return {"command": "ccad " + " ".join(argv), "median_s": round(statistics.median(times), 3),
            "max_s": round(max(times), 3), "repeat": repeat, "heavy_imports": heavy.split(",") if heavy else [],
            "under_2s": statistics.median(times) < 2.0}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("cli_startup", __doc__)
    ap.add_argument("--repeat", type=int, default=5, help="cold starts per command")
    a = parse(ap, argv)
    out = JsonLines(a.json)
    for cmd in COMMANDS:
        row = time_command(cmd, a.repeat)
        row.update(cpus=os.cpu_count(), load_1min=round(os.getloadavg()[0], 2), cmd=command("cli_startup", argv))
        out.emit(row)
    print(f"\n{'command':<52} {'median s':>9} {'max s':>7}  heavy imports")
    for r in out.rows:
        print(f"{r['command']:<52} {r['median_s']:>9.3f} {r['max_s']:>7.3f}  {','.join(r['heavy_imports']) or '-'}")
    return 0
