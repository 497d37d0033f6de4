"""One-off studies: ``python -m benchmarks experiments.NAME [args]``.

Kept because benchmarks/results/README.md quotes their results (the commands are there); they
are not standing benchmarks (they answer one question of one issue, and most re-score the
models a ``python -m benchmarks mtd --workdir`` run saved), so tests/test_benchmarks.py only
checks that they import and parse their arguments.
"""
