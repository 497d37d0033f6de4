"""``python -m benchmarks NAME [args]``; ``python -m benchmarks --list`` lists the names."""
from __future__ import annotations

import sys
from typing import Optional

from benchmarks import BENCHMARKS, EXPERIMENTS, names, run


def usage() -> str:
    width = max(len(n) for n in names())
    lines = ["usage: python -m benchmarks NAME [args]   (python -m benchmarks NAME --help for NAME's)", "",
             "benchmarks:"]
    lines += [f"  {n:<{width}}  {d}" for n, d in BENCHMARKS.items()]
    lines += ["", "experiments (one-off studies):"]
    lines += [f"  {n:<{width}}  {d}" for n, d in EXPERIMENTS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("--list", "-l", "list", "-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in names():
        print(f"error: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(name, rest)


if __name__ == "__main__":
    sys.exit(main())
