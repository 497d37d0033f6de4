"""The project's benchmarks, one package: ``python -m benchmarks NAME [args]`` from the repo root.

``python -m benchmarks --list`` (or no arguments) lists them. Each benchmark is a module with
``main(argv) -> int`` that builds its parser from :func:`benchmarks.common.make_parser` (the
shared ``--json`` / ``--threads`` and, where it has them, ``--quick`` / ``--workdir`` /
``--autoencoder`` / ``--device``), prints one JSON line per result and then a table, and appends
the JSON lines to ``--json PATH`` (:class:`benchmarks.common.JsonLines`).

Standing benchmarks (:data:`BENCHMARKS`) measure the product and are smoke-tested by
``tests/test_benchmarks.py``; one-off studies live in :mod:`benchmarks.experiments` and run as
``python -m benchmarks experiments.NAME`` (:data:`EXPERIMENTS`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

# ``import ccad`` (cheap: its names load lazily) sets OMP_WAIT_POLICY=PASSIVE unless it is set, and
# libgomp reads it when torch is first imported: it must come before any benchmark imports torch, or
# the benchmarks would time another setting than the product runs with (rows record it: machine()).
import ccad  # noqa: F401,E402

BENCHMARKS: dict[str, str] = {
    "mtd": "every method on the fixed MTD split (metrics, fit time, ms/image, peak memory)",
    "multiclass": "one model per latent method over five synthetic texture classes",
    "speed": "inference speed: images/s per batch size (throughput), ms/image per size (latency), "
             "or a saved model end to end (--model)",
    "app_load": "`ccad app` under N concurrent sessions on its HTTP queue API",
    "serve": "`ccad serve` under N concurrent HTTP clients: requests/s, p50/p99, with and without batching",
    "bank_scaling": "feature-bank build time and peak memory versus the number of images",
    "bank_speed": "PatchCore memory coreset modes side by side (fit, selection alone), inference stage shares",
    "peak_memory": "peak RSS of `ccad predict` on one huge image",
    "metrics_speed": "time and memory of the pixel metrics (AUROC, AP, F1-max, AUPRO)",
    "operating_points": "recall and false-alarm rate at good-only thresholds for several target rates",
    "cli_startup": "cold-start time of `ccad --help`, `--version` and argument errors (median of N)",
    "synthetic_speed": "time to generate one synthetic sample per texture and defect",
    "dagm_relabel": "the DAGM re-labelling proposals (mask IoU vs the exact masks) on synthetic DAGM data",
    "resize_modes": "square / keep-aspect / tile resize modes (PatchCore) on elongated thin-defect images and MTD",
}
EXPERIMENTS: dict[str, str] = {
    "experiments.ablations": "each seed paper's key claim as an ablation on the synthetic set (issue 8 study)",
    "experiments.levers": "scoring levers re-applied to the models an `mtd --workdir` run saved",
    "experiments.fusion_grid": "every (normalisation, weight) of the bank fusion on a saved fused MTD model",
    "experiments.latent_diagnostics": "why a saved latent detector scores as it does, from good images only",
}


def names() -> list[str]:
    """Every runnable name: the standing benchmarks, then the experiments."""
    return [*BENCHMARKS, *EXPERIMENTS]


def load(name: str) -> ModuleType:
    """The module of benchmark ``name`` (a key of :data:`BENCHMARKS` or :data:`EXPERIMENTS`)."""
    if name not in BENCHMARKS and name not in EXPERIMENTS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(names())}")
    return importlib.import_module(f"benchmarks.{name}")


def run(name: str, argv: list[str] | None = None) -> int:
    """Run benchmark ``name`` with ``argv`` (its own arguments); its exit status."""
    return int(load(name).main(list(argv or [])) or 0)
