"""What the benchmarks share: the per-method settings table and one code path that builds any method.

Every method is built the same way: its typed config (``get_method(name).default_config()``)
with the table's ``options`` applied by :func:`ccad.config.set_option` (the ``--option``
mechanism of ``ccad train``), its default scoring with the table's ``scoring`` fields, then
``train_detector(train, run_dir, variant=name, method=cfg, train=TrainConfig(...))`` for a
trained method, or ``fit_detector`` for a method with ``trainable=False`` (PatchCore). No
method name is compared anywhere else.

The latent methods use the real TAEF2 autoencoder, ``taef2:<repo>/../shared/weights`` by
default (``.device/weights`` when that exists instead, e.g. on the offline GPU machine; any
spec with ``--autoencoder``). Thresholds come from a held-out slice of the good training images
(``calibration_fraction``); nothing here reads a test label.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

# torch and ccad are imported where they are used: a benchmark that measures memory (metrics_speed,
# peak_memory's children) or only drives a server (app_load) must not pay for them at import.

ROOT = Path(__file__).resolve().parents[1]

LATENT_TAG = "{autoencoder}"  # placeholder in the table, replaced by the resolved spec

# ------------------------------------------------------------------------------------------------
# The settings table. Keys: image_size, preset, steps, batch_size, lr, warmup_steps (trained
# methods), bank_size / backbone / layers (the shared BankConfig), options (method-config fields,
# dotted, via set_option), scoring (ScoringConfig fields), budget (a plain sentence).
# quick = CPU (2 cores); full = one GPU.
# ------------------------------------------------------------------------------------------------
_PATCHCORE = {"image_size": 256, "bank_size": 200, "backbone": "tf_efficientnet_lite0", "layers": (2, 3),
              "options": {"ratio": 0.01}}

SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "patchcore": {
        "quick": {**_PATCHCORE, "budget": "one pass of lite0 over the train images (~6 min on 2 CPU cores)"},
        "full": dict(_PATCHCORE),
    },
    "ccad-v": {
        "quick": {"image_size": 128, "preset": "tiny", "steps": 240, "batch_size": 8, "lr": 1e-3,
                  "warmup_steps": 24, "bank_size": 200,
                  "options": {"diffusion.start_step": 250, "diffusion.steps": 5, "diffusion.guidance": 2.0},
                  "scoring": {"score_layers": (1, 2, 3)},
                  "budget": "240 steps x batch 8 at 128 px, 5 DDIM steps (~5 min on 2 CPU cores)"},
        "full": {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 3e-4,
                 "warmup_steps": 100, "bank_size": 200,
                 "options": {"diffusion.start_step": 250, "diffusion.steps": 10, "diffusion.guidance": 2.0},
                 "scoring": {"score_layers": (1, 2, 3)}},
    },
    "ccad-c": {
        "quick": {"image_size": 128, "preset": "small", "steps": 150, "batch_size": 16, "lr": 5e-4,
                  "warmup_steps": 15, "bank_size": 200,
                  "options": {"autoencoder": LATENT_TAG, "diffusion.steps": 5, "diffusion.start_step": 250},
                  "budget": "TAEF2 latents 16x16 (128 px, encoded once, shared), 150 steps x batch 16 (~1 s/step), "
                            "5 DDIM steps from t=250 (~0.45 s/image)"},
        "full": {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 1e-4,
                 "warmup_steps": 500, "bank_size": 200,
                 "options": {"autoencoder": LATENT_TAG, "diffusion.steps": 10}},
    },
    "ccad-f": {
        "quick": {"image_size": 128, "preset": "small", "steps": 150, "batch_size": 16, "lr": 5e-4,
                  "warmup_steps": 15, "bank_size": 200,
                  "options": {"autoencoder": LATENT_TAG, "diffusion.steps": 5, "diffusion.start_step": 250},
                  "budget": "as ccad-c, plus the latent bank (k-center of 64 patches per image) and FCM"},
        "full": {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 1e-4,
                 "warmup_steps": 500, "bank_size": 200,
                 "options": {"autoencoder": LATENT_TAG, "diffusion.steps": 10}},
    },
    "deco-diff": {
        "quick": {"image_size": 128, "preset": "small", "steps": 300, "batch_size": 16, "lr": 5e-4,
                  "warmup_steps": 30,
                  "options": {"autoencoder": LATENT_TAG},
                  "budget": "TAEF2 latents 16x16 (128 px, encoded once, shared), 300 steps x batch 16 (~0.7 s/step), "
                            "5 correction steps (paper; ~0.27 s/image)"},
        "full": {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 1e-4,
                 "warmup_steps": 500, "options": {"autoencoder": LATENT_TAG}},
    },
    "d3ad": {
        "quick": {"image_size": 128, "preset": "small", "steps": 300, "batch_size": 16, "lr": 5e-4,
                  "warmup_steps": 30, "options": {"autoencoder": LATENT_TAG, "domain_adapt_epochs": 1},
                  "budget": "TAEF2 latents 16x16 (128 px, shared cache), 300 steps x batch 16, per-image start "
                            "<= T_max 80 (<= 8 DDIM steps), 1 epoch of domain adaptation (paper A.1)"},
        "full": {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 1e-4,
                 "warmup_steps": 500, "options": {"autoencoder": LATENT_TAG, "domain_adapt_epochs": 3}},
    },
    "glad": {
        "quick": {"image_size": 128, "preset": "tiny", "steps": 200, "batch_size": 8, "lr": 1e-3,
                  "warmup_steps": 20, "options": {"T": 500, "steps": 10, "t_min": 200},
                  "budget": "pixel space, tiny UNet, 200 steps x batch 8 at 128 px, <= 10 adaptive DDIM steps "
                            "(~3.4 s/image on one shared thread); delta fitted on good train images (q 0.99)"},
        "full": {"image_size": 256, "preset": "base", "steps": 20000, "batch_size": 32, "lr": 1e-4,
                 "warmup_steps": 500, "options": {"T": 750, "steps": 25, "t_min": 350}},
    },
    "feat-diff": {
        "quick": {**_PATCHCORE, "preset": "small", "steps": 300, "batch_size": 8, "lr": 1e-3, "warmup_steps": 30,
                  "options": {"memory_size": 4096},
                  "budget": "lite0 layers 2+3 features at 256 px cached once, 300 steps x batch 8 of the small "
                            "feature denoiser, edit memory 4096 rows, noise / steps / edit picked on synthetic "
                            "anomalies of 16 held-out good images"},
        "full": {**_PATCHCORE, "preset": "base", "steps": 5000, "batch_size": 32, "lr": 3e-4, "warmup_steps": 200,
                 "options": {"search_images": 64, "search_steps": "1 2 4"}},
    },
}

DEFAULT_METHODS = "patchcore,ccad-v,ccad-c,ccad-f,deco-diff"


def default_autoencoder() -> str:
    """``taef2:<folder>``: ../shared/weights next to the repo, else .device/weights (GPU machine)."""
    for folder in (ROOT.parent / "shared" / "weights", ROOT / ".device" / "weights"):
        if (folder / "taef2_encoder.pth").is_file():
            return f"taef2:{folder}"
    return f"taef2:{ROOT.parent / 'shared' / 'weights'}"


def default_settings(name: str, mode: str) -> dict[str, Any]:
    """The row of a registered method without one in :data:`SETTINGS` (a new method needs no
    benchmark row): its own default config and image size (at most 128 px for ``quick``) and the
    trainer's defaults, 200 steps for ``quick``, 2000 for ``full``."""
    from ccad.methods import get_method
    from ccad.training import TrainConfig

    mcls = get_method(name)  # an unknown name: UnknownVariant listing the available ones
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    t = TrainConfig()
    size = int(mcls.default_image_size)
    steps = 200 if mode == "quick" else 2000
    return {"image_size": min(128, size) if mode == "quick" else size, "preset": None, "steps": steps,
            "batch_size": int(t.batch_size), "lr": float(t.lr), "warmup_steps": steps // 10, "options": {},
            "budget": f"no settings row for {name}: the method's defaults, {steps} training steps"}


def settings_for(name: str, mode: str, autoencoder: str, overrides: Optional[dict[str, Any]] = None,
                 options: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """A deep copy of the table row (:func:`default_settings` for a method without one) with the
    autoencoder filled in and overrides applied."""
    s = copy.deepcopy(SETTINGS[name][mode]) if name in SETTINGS else default_settings(name, mode)
    opts = s.setdefault("options", {})
    for k, v in list(opts.items()):
        if v == LATENT_TAG:
            opts[k] = autoencoder
    changed = []
    for k, v in (overrides or {}).items():
        if v is not None:
            if s.get(k) != v:
                changed.append(f"{k} {v}")
            s[k] = v
    opts.update(options or {})
    if changed and s.get("budget"):  # the sentence describes the table's row, not this one
        s["budget"] += f" [the table's budget; this run overrides: {', '.join(changed)}]"
    return s


def method_configs(name: str, s: dict[str, Any]) -> tuple[Any, Any]:
    """(method config, scoring config) from a settings row, through ``set_option``."""
    from ccad.config import set_option
    from ccad.methods import get_method

    mcls = get_method(name)
    cfg = mcls.default_config()
    if s.get("preset") is not None:
        set_option(cfg, "preset", s["preset"], "settings")
    for k, v in s.get("options", {}).items():
        set_option(cfg, k, v, "settings")
    scoring = mcls.default_scoring()
    for k, v in s.get("scoring", {}).items():
        set_option(scoring, k, v, "settings")
    mcls.validate_config(cfg)
    return cfg, scoring


def build_detector(name: str, train: list, s: dict[str, Any], run_dir: Path, calibration_fraction: float = 0.1,
                   device: Any = None, latent_cache: Optional[Path] = None, seed: int = 0,
                   fusion_memory: Any = None) -> Any:
    """The one code path: ``fit_detector`` (trainable=False) or ``train_detector`` (everything else).

    ``latent_cache``: a folder shared by the latent methods of one run; ``run_dir/latents`` links
    to it, so the training images are encoded once per (image size, autoencoder) - the cache's
    own hash decides whether it is reused. With ``scoring: {fusion: bank}`` in the row the
    method's map is fused with a nearest-neighbour map (``fusion_memory``: a fitted
    ``PatchCoreScorer`` of the same training images to reuse, e.g. the PatchCore row's).
    """
    from ccad.methods import get_method
    from ccad.pipeline import fit_detector, train_detector
    from ccad.training import TrainConfig

    mcls = get_method(name)
    cfg, scoring = method_configs(name, s)
    bank_kw = {k: s[k] for k in ("bank_size", "backbone", "layers") if s.get(k) is not None}
    if not mcls.trainable:
        return fit_detector(train, variant=name, method=cfg, image_size=s["image_size"], scoring=scoring,
                            calibration_fraction=calibration_fraction, device=device, seed=seed, **bank_kw)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if latent_cache is not None and mcls.space == "latent":
        latent_cache.mkdir(parents=True, exist_ok=True)
        link = run_dir / "latents"
        if not link.exists():
            link.symlink_to(latent_cache, target_is_directory=True)
    steps = int(s["steps"])
    tcfg = TrainConfig(steps=steps, batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                       warmup_steps=int(s.get("warmup_steps", min(100, steps // 10))),
                       checkpoint_every=steps, keep_checkpoints=1, show_progress=False, seed=seed)
    return train_detector(train, run_dir, variant=name, method=cfg, train=tcfg, image_size=s["image_size"],
                          scoring=scoring, calibration_fraction=calibration_fraction, device=device, seed=seed,
                          fusion_memory=fusion_memory, overwrite=True,  # a benchmark row always trains afresh
                          **bank_kw)


def loss_summary(run_dir: Path) -> Optional[dict[str, float]]:
    """First / last training losses (mean of 20 steps) from the last checkpoint's trainer_state.json."""
    import json

    states = sorted(Path(run_dir).glob("checkpoint-*/trainer_state.json"))
    if not states:
        return None
    losses = json.loads(states[-1].read_text()).get("losses") or []
    if not losses:
        return None
    head, tail = losses[:20], losses[-20:]
    return {"first20": round(sum(head) / len(head), 4), "last20": round(sum(tail) / len(tail), 4),
            "n": len(losses)}


class PeakRSS:
    """Samples the process RSS in a thread; ``peak_mb`` is the high-water mark while active."""

    def __init__(self, every: float = 0.05) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def __enter__(self) -> "PeakRSS":
        import torch

        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def peak_vram_mb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0.0


def machine() -> dict[str, Any]:
    """Device name, CPU count, torch version, and the 1/5/15-minute load average now."""
    import platform

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    load = [round(x, 2) for x in os.getloadavg()]
    return {"device_name": dev, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg": load, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "ccad"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty-ccad" if dirty else "")
    except Exception:  # noqa: BLE001 - no git on the machine: say so
        return "unknown"


MTD_SPLIT = ROOT.parent / "shared" / "data" / "mtd" / "split.csv"


def add_saved_model_args(ap: Any, what: str = "trained models") -> None:
    """The arguments of a tool that re-scores the models a ``python -m benchmarks mtd --workdir`` saved
    (``--json`` and ``--threads`` come from :func:`make_parser`)."""
    ap.add_argument("--workdir", required=True, help=f"a `python -m benchmarks mtd --workdir` with {what}")
    ap.add_argument("--methods", required=True, help="comma-separated method folders in WORKDIR")
    ap.add_argument("--data", default=str(MTD_SPLIT), help="MTD split.csv")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--subset", type=int, default=None, help="as mtd --subset (for a smoke run's workdir)")


def saved_model_split(data: str, subset: Optional[int] = None, at_least: int = 0) -> tuple[list, list]:
    """``(test samples, calibration slice)`` as ``mtd.py`` used them: the slice is the 10 % of the
    good training images (seed 0) its models were calibrated on; ``subset`` as ``mtd.py --subset``;
    ``at_least``: grown as training grows it for a model that chooses settings on it
    (``ccad.pipeline.hold_out_at_least``: 2 = one selection and one threshold image)."""
    from ccad.data.layouts import load_csv_manifest
    from ccad.pipeline import hold_out_at_least, split_good

    train = load_csv_manifest(data, split="train")
    test = load_csv_manifest(data, split="test")
    if subset:
        train = train[::max(1, len(train) // subset)]
        test = test[::max(1, len(test) // subset)]
    rest, cal = split_good([s for s in train if s.label == 0], 0.1, 0)
    if at_least:
        cal = hold_out_at_least(rest, cal, at_least)[1]
    return test, cal


def parse_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``--option METHOD:key=value`` (or ``key=value`` for every method) -> {method or '*': {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --option {item!r}: expected [METHOD:]key=value")
        method, _, key = head.rpartition(":")
        out.setdefault(method or "*", {})[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# The shared command line and the one JSON-lines writer
# ------------------------------------------------------------------------------------------------
ALL_CORES = "all"  # make_parser(threads=ALL_CORES): torch.set_num_threads(os.cpu_count())


def make_parser(name: str, doc: Optional[str], *, quick: Optional[str] = None, workdir: Optional[str] = None,
                autoencoder: bool = False, device: bool = False, threads: Any = None,
                json_help: str = "also append the JSON lines to this file") -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: ``--json PATH`` always (append the JSON lines
    there, see :class:`JsonLines`) and ``--threads N`` (``torch.set_num_threads``; default
    ``threads``: a number, :data:`ALL_CORES`, or None = torch's own); the shared options a
    benchmark opts into: ``--quick`` (help text ``quick``), ``--workdir`` (help ``workdir``),
    ``--autoencoder`` (the latent methods' autoencoder spec) and ``--device``. Each benchmark then
    adds only its own arguments. ``prog`` is ``python -m benchmarks NAME``."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, metavar="PATH", help=json_help)
    default = "all cores" if threads == ALL_CORES else (threads if threads is not None else "torch's own")
    ap.add_argument("--threads", type=int, default=None, help=f"torch.set_num_threads (default: {default})")
    ap.set_defaults(_threads_default=threads)
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)
    if workdir is not None:
        ap.add_argument("--workdir", default=None, help=workdir)
    if autoencoder:
        ap.add_argument("--autoencoder", default=None,
                        help="latent methods' autoencoder spec (default taef2:../shared/weights, or "
                             "taef2:.device/weights)")
    if device:
        ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    return ap


def parse(ap: argparse.ArgumentParser, argv: Optional[list[str]]) -> argparse.Namespace:
    """``ap.parse_args(argv)``, then the thread count (``--threads`` or the parser's default)."""
    a = ap.parse_args(argv)
    n = a.threads if a.threads is not None else a._threads_default
    if n == ALL_CORES:
        n = max(1, os.cpu_count() or 1)
    if n is not None:
        import torch

        torch.set_num_threads(int(n))
    return a


def percentile(xs: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in [0, 100]); None for no data (the latency benchmarks')."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def command(name: str, argv: Optional[list[str]]) -> str:
    """The command line a row records: ``python -m benchmarks NAME ARGS``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is None and args[:1] == [name]:
        args = args[1:]
    return " ".join(["python -m benchmarks", name, *args])


class JsonLines:
    """The one JSON writer: :meth:`emit` prints a row as one JSON line on stdout (flushed) and, with
    a path, appends it to that file at once (parent folders created), so a long run keeps every
    row it finished and two runs into one file add up (delete the file first for a fresh one).
    Values JSON cannot encode are written with ``default`` (``str`` unless told)."""

    def __init__(self, path: Optional[str], default: Any = str) -> None:
        self.path = Path(path) if path else None
        self.default = default
        self.rows: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict[str, Any], echo: bool = True) -> None:
        """Print ``row`` (unless ``echo`` is False: a benchmark that printed its progress already)
        and append it to the file."""
        line = json.dumps(row, default=self.default)
        if echo:
            print(line, flush=True)
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def learned_part_lines(rows: list[dict], keys: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
                       metrics: Any = None) -> list[str]:
    """``method - ablation`` per metric (signed, 4 decimals) for every method with both rows: the
    method's own row ``NAME`` and its ablation row ``NAME/ablation`` (the same saved model with its
    learned part replaced by the trivial one, :attr:`ccad.methods.base.Method.ablation`).
    ``metrics(row) -> dict`` finds a row's metrics (default: the row itself; multiclass: its mean)."""
    get = metrics or (lambda r: r)
    by = {r["method"]: r for r in rows}
    out = []
    for name, r in by.items():
        abl = by.get(f"{name}/ablation")
        if abl is None:
            continue
        what = (r.get("settings") or {}).get("ablation") or "its ablation"
        a, b = get(r), get(abl)
        deltas = ", ".join(f"{k} {float(a[k]) - float(b[k]):+.4f}" for k in keys
                           if a.get(k) is not None and b.get(k) is not None)
        out.append(f"# {name}: learned part adds {deltas} (vs {what})")
    return out


def false_alarm_fields(records: list[dict[str, Any]], det: Any, threshold: Optional[float] = None) -> dict[str, Any]:
    """What the calibration promised against what the test's good images show (issue 20.3):
    ``target_fpr`` (the model's ``scoring.target_fpr``), ``test_good_fpr`` (the share of the
    test's good images scoring above the threshold), the counts it rests on, the recall on the
    test's defective images at the same threshold, and the calibration's own split
    (``calibration_split``: how many held-out good images chose settings and how many set the
    threshold, when the detector records it). ``threshold``: the one the records were judged
    against (default: the detector's)."""
    import math

    thr = float(det.threshold if threshold is None else threshold)
    good = [r["score"] for r in records if int(r["label"]) == 0]
    bad = [r["score"] for r in records if int(r["label"]) == 1]
    fa = sum(1 for s in good if s > thr)
    hit = sum(1 for s in bad if s > thr)
    cal = getattr(det, "calibration", None)
    split = (getattr(det, "info", None) or {}).get("calibration_split")
    out = {"target_fpr": float(det.config.scoring.target_fpr),
           "calibration_method": getattr(cal, "method", None),
           "test_good_fpr": round(fa / len(good), 4) if good else None,
           "test_good_false_alarms": fa, "test_good_n": len(good),
           "test_recall": round(hit / len(bad), 4) if bad else None, "test_defect_n": len(bad),
           "threshold_rests_on": None if cal is None else int(len(cal.good_scores))}
    if split:
        out["calibration_split"] = {k: v for k, v in split.items() if not isinstance(v, list)}
    if cal is not None and len(cal.good_scores) and threshold is None:
        out["at_targets"] = operating_points(records, cal.good_scores)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


OPERATING_TARGETS = (0.01, 0.02, 0.05)


def operating_points(records: list[dict[str, Any]], good_scores: Any,
                     targets: tuple[float, ...] = OPERATING_TARGETS) -> list[dict[str, Any]]:
    """Issue 21 item 1 from one fitted model: for each target false-alarm rate, the threshold
    ``ccad`` would calibrate from the SAME held-out good scores (``Calibration.fit(good, fpr=t)``,
    no refit, no test label) and what it does on the test images: recall (overall and per defect
    type), false alarms on the test's good images, and whether the target is simply the held-out
    maximum (``1 / n`` above the target)."""
    from ccad.scoring.threshold import Calibration

    good_ref = np.asarray(good_scores, np.float64).ravel()
    good = [r for r in records if int(r["label"]) == 0]
    bad = [r for r in records if int(r["label"]) == 1]
    out = []
    for t in targets:
        thr = float(Calibration.fit(good_ref, fpr=t).threshold)
        per: dict[str, list[int]] = {}
        for r in bad:
            per.setdefault(str(r.get("defect_type") or r.get("category") or "defect"), []).append(
                int(r["score"] > thr))
        hit = sum(int(r["score"] > thr) for r in bad)
        fa = sum(int(r["score"] > thr) for r in good)
        out.append({"target_fpr": t, "threshold": round(thr, 4), "threshold_is_max_good": t < 1.0 / good_ref.size,
                    "recall": round(hit / len(bad), 4) if bad else None, "caught": hit, "defects": len(bad),
                    "test_good_false_alarms": fa, "test_good_n": len(good),
                    "recall_per_type": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}})
    return out
