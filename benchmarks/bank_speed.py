"""The PatchCore memory bank at CPU speed: the coreset modes side by side, and where inference goes.

    python -m benchmarks bank_speed --part fit --quick            # MTD: legacy vs fast, fit + evaluate
    python -m benchmarks bank_speed --part coreset --features F.pt  # the selection alone on cached features
    python -m benchmarks bank_speed --part inference --quick      # ms/image at 256 px, batch 1 and 8
    python -m benchmarks bank_speed --part backbones --quick      # PatchCore on each offline backbone
    python -m benchmarks bank_speed --part seeds --quick          # coreset variants x seeds, one feature pass

``--part fit`` (default) fits the MTD quick PatchCore row (762 train images at 256 px, 10 % held
out for the threshold, the rest into the memory; ``benchmarks/common.py``'s settings) once per
coreset mode (``--modes``, default ``legacy,fast``: ``method.coreset``, see
``ccad.features.coreset.CORESET_MODES``), in the same process, from the same images (the frozen
backbone gives the same features each time), and evaluates each on the test split: one JSON row
per mode, then a summary row with the fit speed-up and the metric differences. With
``--inference`` it also times the last mode's detector (as ``--part inference``).

``--part coreset`` times only the selection: the memory-bank ``StreamingCoreset`` fed image by
image exactly as ``PatchCoreScorer.fit`` feeds it (batches of 8 images, ``k = ratio * patches``),
per mode, on features cached with ``--save-features`` (one backbone pass), and reports how well each
memory covers all patches (max / 99.9 % / mean nearest distance of 40 000 random patches, in the
original feature space). It also times feat-diff's two one-shot selections (``greedy_coreset`` of
256 random cells per image: its bank ``xi`` and its edit memory) in each mode, and the streamed
selection feat-diff runs above its one-shot budget (:func:`ccad.methods.feat_diff.select_cells`,
both in one pass; below ``ONE_SHOT_BYTES`` of cells it selects one-shot, as the rows above).

``--part inference``: the per-image cost of a fitted fast-mode PatchCore detector at 256 px, batch
1 and 8 (median of ``--repeats``), split into the backbone, the nearest-neighbour search against the
memory and the map post-processing (upsampling + Gaussian smoothing + the out-of-domain statistic),
for each engine of ``--engines``: ``torch`` (the detector), ``onnx`` (its ``ccad export`` run by
``ccad.runtime`` with its default threading: the graph + the runtime's numpy score and median; the
stages as three graphs traced from the export's code), ``onnx-spin`` (the same with onnxruntime's
thread spinning on), alternated within each repeat. ``ms_*`` are wall times, ``cpu_ms_*`` the
process's CPU time (all its threads; what other processes on a shared machine inflate least).
``--memory-rows N`` sizes a ``--subset`` fit's memory to about N rows (the full MTD quick model:
7025), so the kNN costs what the full model's does.

    python -m benchmarks bank_speed --part inference --subset 100 --memory-rows 7025 --engines torch,onnx

``--part backbones``: the MTD quick PatchCore row for each offline backbone (``--backbones``).

``--part seeds``: the selection's own seed-to-seed spread, cheaply. The MTD quick PatchCore detector
is fitted once; every ``VARIANT@SEED`` of ``--variants`` (``legacy``, ``fast``, ``fast-noprecut`` =
fast without the per-image pre-reduction) then selects its memory from one pass of training features
(``PatchCoreScorer.fit_features``, the selection ``fit`` runs), replaces the detector's memory, is
recalibrated and evaluated through the detector (see :func:`seeds_rows`): one row per variant with
its selection seconds, label-free coverage (nearest-memory distance of held-out good patches) and
test metrics, then one summary row per variant (min / max / range / mean over its seeds).

Every row records the torch thread count and ``OMP_WAIT_POLICY`` (``import ccad`` sets PASSIVE
unless it is set already) and the load average: the CPU is shared, compare rows of one run only.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import (ALL_CORES, MTD_SPLIT, JsonLines, command, git_commit, machine, make_parser, parse,
                               settings_for)

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def _split(data: str, subset: Optional[int]) -> tuple[list, list]:
    from ccad.data.layouts import load_csv_manifest

    train = load_csv_manifest(data, split="train")
    test = load_csv_manifest(data, split="test")
    if subset:
        train = train[::max(1, len(train) // subset)]
        test = test[::max(1, len(test) // subset)]
    return train, test


def fit_rows(a: Any, out: JsonLines, run_info: dict) -> Any:
    """One MTD PatchCore row per coreset mode (same run), then the summary row; returns the last detector."""
    from benchmarks.mtd import run_method

    train, test = _split(a.data, a.subset)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ccad-bank-speed-"))
    rows, det = {}, None
    for mode in a.modes.split(","):
        s = settings_for("patchcore", "quick" if a.quick else "full", "", {"image_size": a.image_size},
                         {"coreset": mode})
        new, det = run_method("patchcore", train, test, s, s.get("mode", "quick"), a.device, work / mode,
                              work / "latents", a.batch_size)
        row = new[0]
        row["method"] = f"patchcore[coreset={mode}]"
        row["settings"]["run"] = run_info
        row["settings"]["memory_rows"] = int(det.method.scorer.memory_bank.shape[0])
        out.emit(row)
        rows[mode] = row
    if len(rows) >= 2:
        (old_name, old), *_, (new_name, new) = rows.items()
        out.emit({"summary": f"{new_name} vs {old_name}",
                  # None when the new fit rounds to 0.0 s (tiny smoke data on an idle machine)
                  "fit_speedup": round(old["fit_seconds"] / new["fit_seconds"], 2) if new["fit_seconds"] > 0 else None,
                  "fit_seconds": {old_name: old["fit_seconds"], new_name: new["fit_seconds"]},
                  **{f"delta_{k}": round(new[k] - old[k], 4) for k in METRICS},
                  "within_0.005": all(abs(new[k] - old[k]) <= 0.005 for k in METRICS), "run": run_info})
    return det, test


def backbone_rows(a: Any, out: JsonLines, run_info: dict) -> None:
    from benchmarks.mtd import run_method

    train, test = _split(a.data, a.subset)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ccad-bank-backbones-"))
    for bb in a.backbones.split(","):
        s = settings_for("patchcore", "quick" if a.quick else "full", "", {"image_size": a.image_size, "backbone": bb})
        new, det = run_method("patchcore", train, test, s, "quick" if a.quick else "full", a.device, work / bb,
                              work / "latents", a.batch_size)
        row = new[0]
        row["method"] = f"patchcore[{bb}]"
        row["settings"]["run"] = run_info
        row["settings"]["feature_dim"] = int(det.method.scorer.memory_bank.shape[1])
        out.emit(row)


def _features(a: Any) -> Any:
    """``N x D`` patch features of the training images (image-major, ``h * w`` rows each), cached."""
    import torch

    if a.features and Path(a.features).is_file():
        return torch.load(a.features)
    from ccad.features import get_backbone
    from ccad.features.stream import ImageStream, stream_features

    train, _ = _split(a.data, a.subset)
    bb = get_backbone("tf_efficientnet_lite0", layers=(2, 3))
    rows = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).clone()
            for f in stream_features(ImageStream(train, a.image_size, 8), bb, torch.device("cpu"), None, None)]
    x = torch.cat(rows)
    if a.features:
        torch.save(x, a.features)
    return x


def coreset_rows(a: Any, out: JsonLines, run_info: dict) -> None:
    import torch

    from ccad.features.coreset import StreamingCoreset, coreset_mode, greedy_coreset

    x = _features(a)
    n, dim = x.shape
    per = (a.image_size // 8) ** 2
    k = math.ceil(a.ratio * n)
    buffer = max(8 * k, 4096)  # PatchCoreScorer._buffer_rows
    probe = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:40000]]
    for mode in a.modes.split(","):
        cfg = coreset_mode(mode)
        t0 = time.perf_counter()
        sc = StreamingCoreset(k, buffer=buffer, reduce_to=k, proj_dim=cfg["proj_dim"], seed=0,
                              prereduce=cfg["prereduce"], group=per, exact_budget=cfg["exact_budget"])
        for b in x.split(8 * per):
            sc.update(b)
        bank = sc.result(k)
        sec = time.perf_counter() - t0
        d = torch.cat([torch.cdist(c, bank).min(1).values for c in probe.split(4096)])
        out.emit({"part": "coreset", "mode": mode, "settings": cfg, "n_patches": n, "dim": dim, "memory_rows": k,
                  "seconds": round(sec, 1), "reductions": sc.reductions,
                  "nn_dist_max": round(float(d.max()), 3), "nn_dist_q999": round(float(d.quantile(0.999)), 3),
                  "nn_dist_mean": round(float(d.mean()), 4), "run": run_info})
    # feat-diff's selections: 256 random cells per image -> its bank (xi 200) and edit memory (4096 rows)
    g = torch.Generator().manual_seed(1)
    cells = torch.cat([x[i:i + per][torch.randperm(per, generator=g)[:256]] for i in range(0, n, per)])
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        greedy_coreset(cells, 200, seed=0, mode=mode)
        t_bank = time.perf_counter() - t0
        mem = cells[greedy_coreset(cells, 4096, seed=1, mode=mode)]
        t_mem = time.perf_counter() - t0 - t_bank
        d = torch.cat([torch.cdist(c, mem).min(1).values for c in probe.split(4096)])
        out.emit({"part": "feat-diff selections", "mode": mode, "cells": int(cells.shape[0]),
                  "bank_seconds": round(t_bank, 1), "memory_seconds": round(t_mem, 1),
                  "memory_nn_dist_max": round(float(d.max()), 3), "memory_nn_dist_mean": round(float(d.mean()), 4),
                  "run": run_info})
    from ccad.methods.feat_diff import select_cells

    class _Cache:  # each image's drawn cells as one "map", as feat-diff reads its on-disk cache
        latents = cells.view(-1, min(per, 256), dim).permute(0, 2, 1).unsqueeze(-1).numpy()

        def __len__(self) -> int:
            return len(self.latents)

    t0 = time.perf_counter()
    bank_core, mem_core = select_cells(_Cache(), 0, [(200, 0), (4096, 1)], one_shot_bytes=0)  # the streamed path
    mem = mem_core.result()
    sec = time.perf_counter() - t0
    d = torch.cat([torch.cdist(c, mem).min(1).values for c in probe.split(4096)])
    out.emit({"part": "feat-diff selections", "mode": "streamed (select_cells)", "cells": int(cells.shape[0]),
              "bank_and_memory_seconds": round(sec, 1), "buffer_rows": [bank_core.buffer, mem_core.buffer],
              "memory_nn_dist_max": round(float(d.max()), 3), "memory_nn_dist_mean": round(float(d.mean()), 4),
              "run": run_info})


def _memory_ratio(a: Any, train: list, size: int, calibration_fraction: float = 0.1) -> Optional[float]:
    """``--memory-rows N``: the coreset ratio that gives about N memory rows from the fitted images
    (the full MTD quick model holds 7025: 686 images x 1024 patches x 1 %)."""
    if not a.memory_rows:
        return None
    fitted = max(1, len(train) - max(1, round(calibration_fraction * len(train))))
    return min(1.0, float(a.memory_rows) / (fitted * (size // 8) ** 2))


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _clock() -> tuple[float, float]:
    """(wall, process CPU: every thread's) seconds."""
    return time.perf_counter(), _cpu_s()


def _spans(marks: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive :func:`_clock` marks."""
    return ([b[0] - a[0] for a, b in zip(marks, marks[1:])], [b[1] - a[1] for a, b in zip(marks, marks[1:])])


class _OnnxStages:
    """The exported graph's three stages as three ONNX graphs traced from the same torch code the
    export traces (:mod:`ccad.export.graph`: the backbone with its normalisation; the memory
    distance as one matmul, :func:`ccad.export.graph.mm_nearest_distances`; the bilinear upsampling
    and Gaussian smoothing), each run by the runtime's own session class (its threading), plus the
    runtime's numpy post-processing (lower median, image score) in the last stage."""

    def __init__(self, det: Any, folder: Path, runtime: Any, spinning: Optional[bool]) -> None:
        import warnings

        import torch
        import torch.nn.functional as F
        from torch import nn

        from ccad.export.graph import OPSET, mm_nearest_distances
        from ccad.runtime import _OnnxSession
        from ccad.scoring.anomaly_map import gaussian_blur, scaled_sigma

        sc, size = det.method.scorer, int(det.method.scorer.image_size)
        sigma = scaled_sigma(det.method.ctx.scoring.sigma, size)
        memory, k = sc.memory_bank.float(), sc.k

        class Knn(nn.Module):
            def forward(self, f: torch.Tensor) -> torch.Tensor:
                b, d, h, w = f.shape
                dist, _ = mm_nearest_distances(f.permute(0, 2, 3, 1).reshape(-1, d), memory, k)
                return dist.mean(-1).view(b, 1, h, w)

        class Post(nn.Module):
            def forward(self, raw: torch.Tensor) -> torch.Tensor:
                return gaussian_blur(F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False),
                                     sigma)

        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            f = sc.backbone(x)
            raw = Knn()(f)
        self.sessions = {}
        for name, module, inp in (("backbone", sc.backbone, x), ("knn", Knn(), f), ("post", Post(), raw)):
            path = folder / f"stage-{name}.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module.eval(), (inp,), str(path), dynamo=False, opset_version=OPSET,
                                  input_names=["x"], output_names=["y"], do_constant_folding=True,
                                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
            self.sessions[name] = _OnnxSession(path, runtime.threading["threads"], spinning)
        self.runtime = runtime

    def __call__(self, x: Any) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of the backbone, the kNN and the post-processing for one batch."""
        from ccad.runtime import image_score, lower_median

        marks = [_clock()]
        f = self.sessions["backbone"]({"x": x})["y"]
        marks.append(_clock())
        raw = self.sessions["knn"]({"x": f})["y"]
        marks.append(_clock())
        maps = self.sessions["post"]({"x": raw})["y"]
        lower_median(raw.reshape(raw.shape[0], -1))
        image_score(maps[:, 0], self.runtime.spec["score"])
        marks.append(_clock())
        return _spans(marks)


#: ``--part seeds`` variants: a coreset mode, or a mode with some of its settings changed.
SEED_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "legacy": ("legacy", {}), "fast": ("fast", {}),
    "fast-noprecut": ("fast", {"prereduce": None}),  # the 32-dim projection alone, every patch streamed
    "fast-64": ("fast", {"proj_dim": 64}),  # the pre-cut with a 64-dim projection
    # the pre-cut in the 32-dim projection, the final selection on the original features
    "fast-exactfinal": ("fast", {"exact_budget": 1e12}),
    "fast-exact": ("fast", {"proj_dim": None}),  # the pre-cut and the final selection unprojected
    "fast-20": ("fast", {"prereduce": 0.2}),  # a 20 % pre-cut, 32-dim projection
}


def _image_keys(x: Any) -> list[str]:
    """SHA-1 of each image of a ``B x 3 x S x S`` batch as the backbone receives it."""
    import hashlib

    return [hashlib.sha1(xi.float().contiguous().cpu().numpy().tobytes()).hexdigest() for xi in x]


class _Remembered:
    """A backbone that remembers each image's features by the image's bytes (SHA-1 of the float
    tensor it is given): the detector's own scoring path (``PatchCoreScorer.score_maps``, the
    method's map post-processing, ``evaluate``) runs unchanged, and every image after the first pass
    costs a dictionary look-up instead of a backbone forward. A batch with any image not seen yet
    runs the real backbone. Everything else is the wrapped backbone's."""

    def __init__(self, backbone: Any) -> None:
        self._bb = backbone
        self.store: dict[str, Any] = {}
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bb, name)

    def __call__(self, x: Any) -> Any:
        import torch

        keys = _image_keys(x)
        if all(k in self.store for k in keys):
            self.hits += len(keys)
            return torch.stack([self.store[k] for k in keys]).to(x.device)
        f = self._bb(x)
        self.misses += len(keys)
        for k, fi in zip(keys, f):
            self.store.setdefault(k, fi.detach().cpu().clone())
        return f


def _coverage(probe: Any, memory: Any) -> dict[str, float]:
    """Nearest-memory distance of each probe patch: max, 99.9 % quantile, mean (label-free)."""
    import torch

    d = torch.cat([torch.cdist(c, memory).min(1).values for c in probe.split(4096)])
    return {"max": round(float(d.max()), 3), "q999": round(float(d.quantile(0.999)), 3),
            "mean": round(float(d.mean()), 4)}


def seeds_rows(a: Any, out: JsonLines, run_info: dict) -> None:
    """Each coreset variant and seed selected from ONE feature pass and scored by the real detector.

    The MTD quick PatchCore detector is fitted once (``build_detector``, the benchmark's one code
    path: fast mode, seed 0, 10 % held out), and a forward hook on its (shared, cached) backbone
    keeps the features of every batch the fit computed, in order. For each variant
    ``variant@seed`` a fresh ``PatchCoreScorer`` selects its memory from those batches with
    ``fit_features`` (the code ``fit`` runs on the backbone's output). That scorer replaces the
    detector's, the detector is recalibrated on its own held-out images and evaluated on the test
    split: the map post-processing, image score and metrics are the detector's. The backbone
    remembers each held-out and test image's features (:class:`_Remembered`), so every image passes
    through it once in the whole run. ``fast@0`` reproduces the fitted detector's memory exactly
    (``memory_equals_fit``).

    Coverage (label-free): the nearest-memory distance of every patch of the held-out good images
    (not in the memory's training set) and of 40 000 random training patches.
    """
    import statistics

    import torch

    from benchmarks.common import build_detector
    from ccad.data.dataset import iter_batches
    from ccad.data.sample import Sample
    from ccad.evaluate import evaluate
    from ccad.features import PatchCoreScorer, get_backbone

    variants = []
    for spec in a.variants.split(","):
        name, _, seed = spec.strip().partition("@")
        if name not in SEED_VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r} (known: {sorted(SEED_VARIANTS)})")
        variants.append((name, int(seed or 0)))
    good, test = _split(a.data, a.subset)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ccad-bank-seeds-"))
    s = settings_for("patchcore", "quick" if a.quick else "full", "", {"image_size": a.image_size},
                     {"coreset": "fast"})
    # the fit's own backbone forwards, in order (get_backbone is shared and cached: the scorer's is this one)
    log: list[tuple[list[str], Any]] = []
    shared = get_backbone(s["backbone"], layers=tuple(s["layers"]))
    handle = shared.register_forward_hook(lambda _m, inp, out_: log.append((_image_keys(inp[0]),
                                                                            out_.detach().cpu().clone())))
    t0 = time.perf_counter()
    try:
        det = build_detector("patchcore", good, s, work / "fit", device=a.device)
    finally:
        handle.remove()
    fit_s = time.perf_counter() - t0
    fitted = det.method.scorer
    if fitted.backbone is not shared:
        raise RuntimeError("seeds: the fitted scorer's backbone is not the shared one; its forwards were not seen")
    split = det.info["calibration_split"]
    held_paths = list(split["selection_images"]) + list(split["threshold_images"])
    n_train = fitted.n_images  # fit's forwards come first (its batches), then the calibration's
    batches, seen, i = [], 0, 0
    while seen < n_train:
        batches.append(log[i][1])
        seen += int(log[i][1].shape[0])
        i += 1
    if seen != n_train:
        raise RuntimeError(f"seeds: the fit's forwards hold {seen} images, the memory saw {n_train}")
    bb = _Remembered(fitted.backbone)
    for keys, f in log[i:]:  # later forwards (calibration; a small memory's bank pass), remembered
        for k, fi in zip(keys, f):
            bb.store.setdefault(k, fi)
    # the held-out images as the calibration loads them (it also scores synthetic-anomaly copies, so
    # its forwards are not all held-out images): their keys pick their features
    held_keys = [k for b in iter_batches([Sample(p, None, 0) for p in held_paths], det.input_size, 8,
                                         on_error="skip") for k in _image_keys(b["image"])]
    missing = [k for k in held_keys if k not in bb.store]
    if missing or len(held_keys) != len(held_paths):
        raise RuntimeError(f"seeds: {len(missing)} of the {len(held_paths)} held-out images were not seen by the fit")
    held = [bb.store[k].unsqueeze(0) for k in held_keys]
    log.clear()
    fitted.backbone = bb
    d = batches[0].shape[1]
    probe_held = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, d) for f in held])
    train_flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, d) for f in batches])
    g = torch.Generator().manual_seed(0)
    probe_train = train_flat[torch.randperm(train_flat.shape[0], generator=g)[:40000]]
    del train_flat
    t0 = time.perf_counter()
    ev = evaluate(det, test, batch_size=a.batch_size)  # the fitted detector; the test features are remembered
    m = ev.per_category["mean"]
    out.emit({"part": "seeds", "variant": "fit", "coreset": "fast", "seed": 0, "fit_seconds": round(fit_s, 1),
              "eval_seconds": round(time.perf_counter() - t0, 1),
              "n_train": n_train, "n_held_out": len(held_paths), "n_held_out_patches": int(probe_held.shape[0]),
              "n_test": len(ev.records),
              "memory_rows": int(fitted.memory_bank.shape[0]),
              **{k: round(float(m[k]), 4) for k in METRICS}, "run": run_info})
    rows = []
    for name, seed in variants:
        mode, changes = SEED_VARIANTS[name]
        sc = PatchCoreScorer(bb, ratio=fitted.ratio, k=fitted.k, image_size=fitted.image_size,
                             batch_size=fitted.batch_size, reweight=fitted.reweight, seed=seed, coreset=mode)
        sc._coreset.update(changes)  # a variant of a mode: the settings fit_features reads
        sc.proj_dim = sc._coreset["proj_dim"]
        load0 = machine()["loadavg"]
        t0 = time.perf_counter()
        sc.fit_features(batches, n_images=n_train)
        sel_s = time.perf_counter() - t0
        memory = sc.memory_bank
        det.method.scorer = sc
        det.calibrate(split["threshold_images"], batch_size=8, selection=split["selection_images"],
                      chosen=split["chosen_on_selection"])
        t0 = time.perf_counter()
        ev = evaluate(det, test, batch_size=a.batch_size)
        m = ev.per_category["mean"]
        row = {"part": "seeds", "variant": name, "coreset": mode, "changes": changes, "seed": seed,
               "selection_seconds": round(sel_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
               "memory_rows": int(memory.shape[0]),
               "coverage_held_out": _coverage(probe_held, memory), "coverage_train": _coverage(probe_train, memory),
               **{k: round(float(m[k]), 4) for k in METRICS}, "threshold": det.threshold,
               "memory_equals_fit": bool(memory.shape == fitted.memory_bank.shape
                                         and torch.equal(memory, fitted.memory_bank.cpu())),
               "backbone_misses": bb.misses, "loadavg_start": load0, "loadavg_end": machine()["loadavg"],
               "run": run_info}
        out.emit(row)
        rows.append(row)
    print(f"{'variant':<16}{'seed':>5}{'sel s':>8}{'img AUROC':>11}{'pix AUROC':>11}{'AUPRO':>9}"
          f"{'held max':>10}{'q99.9':>8}{'mean':>8}", file=sys.stderr)
    for r in rows:
        c = r["coverage_held_out"]
        print(f"{r['variant']:<16}{r['seed']:>5}{r['selection_seconds']:>8}{r['image_auroc']:>11}"
              f"{r['pixel_auroc']:>11}{r['pixel_aupro']:>9}{c['max']:>10}{c['q999']:>8}{c['mean']:>8}",
              file=sys.stderr)
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        summary: dict[str, Any] = {"part": "seeds summary", "variant": name, "seeds": [r["seed"] for r in mine],
                                   "selection_seconds_mean": round(statistics.mean(r["selection_seconds"]
                                                                                   for r in mine), 1)}
        for k in (*METRICS, "coverage_held_out.max", "coverage_held_out.q999", "coverage_held_out.mean"):
            vals = [r[k] if "." not in k else r[k.split(".")[0]][k.split(".")[1]] for r in mine]
            summary[k] = {"min": min(vals), "max": max(vals), "range": round(max(vals) - min(vals), 4),
                          "mean": round(statistics.mean(vals), 4)}
        summary["run"] = run_info
        out.emit(summary)


def inference_rows(a: Any, out: JsonLines, run_info: dict, det: Any = None, test: Optional[list] = None) -> None:
    """ms/image of a fitted PatchCore detector, batch 1 and 8, and the share of each stage, for each
    engine of ``--engines``: ``torch`` (the detector), ``onnx`` (its ``ccad export``, run by
    ``ccad.runtime`` with its default threading), ``onnx-spin`` (the same with onnxruntime's
    spinning on, its own default). Engines alternate within each repeat, so load drift hits all alike."""
    import statistics

    import torch
    import torch.nn.functional as F

    from ccad.data.convert import to_tensor
    from ccad.data.io import load_image
    from ccad.features.patchcore import nearest_distances
    from ccad.scoring.anomaly_map import gaussian_blur, scaled_sigma
    from ccad.scoring.domain import patch_median

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ("torch", "onnx", "onnx-spin")]
    if bad:
        raise SystemExit(f"error: --engines: unknown {bad}; give torch, onnx and/or onnx-spin")
    fit_info: dict[str, Any] = {}
    if det is None:
        from benchmarks.common import build_detector

        train, test = _split(a.data, a.subset)
        ratio = _memory_ratio(a, train, a.image_size)
        s = settings_for("patchcore", "quick", "", {"image_size": a.image_size},
                         {"coreset": "fast", **({"ratio": ratio} if ratio else {})})
        t0 = time.perf_counter()
        det = build_detector("patchcore", train, s, Path(tempfile.mkdtemp()), device=a.device)
        fit_info = {"fit_images": len(train), "coreset_ratio": ratio or s["options"].get("ratio"),
                    "memory_rows_asked": a.memory_rows, "fit_s": round(time.perf_counter() - t0, 1)}
    method, sc = det.method, det.method.scorer
    size = sc.image_size
    pool = [to_tensor(load_image(s.image_path), size) for s in (test or [])[:8]]
    imgs = torch.stack([pool[i % len(pool)] for i in range(8)])  # 8 images (repeated if fewer)
    sigma = scaled_sigma(method.ctx.scoring.sigma, size)

    runtimes: dict[str, Any] = {}
    export_info: dict[str, Any] = {}
    if any(e.startswith("onnx") for e in engines):
        from ccad.export import export_detector
        from ccad.runtime import load

        folder = Path(a.workdir or tempfile.mkdtemp(prefix="ccad-bank-speed-")) / "export"
        parity_images = [s.image_path for s in (test or []) if s.label == 0][:6] or None
        t0 = time.perf_counter()
        export_detector(det, folder, "onnx", parity_images=parity_images, overwrite=True)
        par = json.loads((folder / "parity.json").read_text())
        export_info = {"export_s": round(time.perf_counter() - t0, 1), "parity_passed": par["passed"],
                       "parity_n_images": par["n_images"], "parity_max_score_rel_diff": par["max_score_rel_diff"],
                       "parity_verdicts_differ": par["verdicts_differ"]}
        for e in engines:
            if e.startswith("onnx"):
                rt = load(folder, spinning=True if e == "onnx-spin" else None)
                runtimes[e] = (rt, _OnnxStages(det, folder, rt, rt.threading["spinning"]))

    def torch_stages(x: Any) -> tuple[list[float], list[float]]:
        marks = [_clock()]
        f = sc.backbone(x)
        marks.append(_clock())
        b, d, h, w = f.shape
        dist, _ = nearest_distances(f.permute(0, 2, 3, 1).reshape(-1, d), sc.memory_bank, sc.k, group=h * w)
        raw = dist.mean(-1).view(b, 1, h, w)
        marks.append(_clock())
        maps = gaussian_blur(F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False), sigma)
        patch_median(raw)
        maps.flatten(1).amax(1)
        marks.append(_clock())
        return _spans(marks)

    for batch in (1, 8):
        x = imgs[:batch]
        xn = x.numpy()
        keys = ("backbone", "knn", "post", "total", "cpu_backbone", "cpu_knn", "cpu_post", "cpu_total")
        times = {e: {k: [] for k in keys} for e in engines}
        load0 = _loadavg()
        with torch.inference_mode():
            for e in engines:  # warm-up
                method.maps(x) if e == "torch" else (runtimes[e][0].maps_and_scores(xn), runtimes[e][1](xn))
            for _ in range(a.repeats):
                for e in engines:
                    walls, cpus = torch_stages(x) if e == "torch" else runtimes[e][1](xn)
                    c0, t3 = _cpu_s(), time.perf_counter()
                    if e == "torch":  # the method's map, its domain statistic (what _map_parts runs for PatchCore)
                        method.maps(x)
                    else:  # the export: graph + the runtime's numpy score / median (what predict runs per batch)
                        runtimes[e][0].maps_and_scores(xn)
                    t4, c1 = time.perf_counter(), _cpu_s()
                    for key, v in zip(keys, (*walls, t4 - t3, *cpus, c1 - c0)):
                        times[e][key].append(v)
        for e in engines:
            med = {k: statistics.median(v) for k, v in times[e].items()}
            parts = med["backbone"] + med["knn"] + med["post"]
            cpu_parts = med["cpu_backbone"] + med["cpu_knn"] + med["cpu_post"]
            row = {"part": "inference", "engine": e, "batch": batch, "image_size": size,
                   "memory_rows": int(sc.memory_bank.shape[0]), "feature_dim": int(sc.memory_bank.shape[1]),
                   "ms_per_image": round(1000 * med["total"] / batch, 1),
                   "cpu_ms_per_image": round(1000 * med["cpu_total"] / batch, 1),
                   "ms_per_image_stages": {k: round(1000 * med[k] / batch, 1) for k in ("backbone", "knn", "post")},
                   "share": {k: round(med[k] / parts, 3) for k in ("backbone", "knn", "post")},
                   "cpu_ms_per_image_stages": {k: round(1000 * med[f"cpu_{k}"] / batch, 1)
                                               for k in ("backbone", "knn", "post")},
                   "cpu_share": {k: round(med[f"cpu_{k}"] / max(cpu_parts, 1e-9), 3)
                                 for k in ("backbone", "knn", "post")},
                   "repeats": a.repeats, "loadavg_start": load0, "loadavg_end": _loadavg(), **fit_info}
            if e != "torch":
                row.update(export_info, runtime_threading=runtimes[e][0].threading,
                           stages_note="three graphs traced from the export's code, run by the runtime's session")
            out.emit({**row, "run": run_info})


def _loadavg() -> list[float]:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("bank_speed", __doc__, quick="the MTD quick PatchCore settings (CPU)",
                     workdir="run folders (default: a temporary folder)", device=True, threads=ALL_CORES)
    ap.add_argument("--part", choices=["fit", "coreset", "inference", "backbones", "seeds"], default="fit")
    ap.add_argument("--modes", default="legacy,fast", help="coreset modes, in order (the last is 'new')")
    ap.add_argument("--data", default=str(MTD_SPLIT), help="MTD split.csv (or any CSV manifest)")
    ap.add_argument("--subset", type=int, default=None, help="smoke runs: about N train and N test images")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    ap.add_argument("--inference", action="store_true", help="--part fit: also time the last mode's detector")
    ap.add_argument("--repeats", type=int, default=5, help="--part inference: timed repeats (median)")
    ap.add_argument("--engines", default="torch",
                    help="--part inference: torch, onnx (ccad export run by ccad.runtime), onnx-spin (the same "
                         "with onnxruntime's thread spinning on), comma-separated, alternated within each repeat")
    ap.add_argument("--memory-rows", type=int, default=None,
                    help="--part inference: size the memory to about this many rows (the full MTD quick model: "
                         "7025) by the coreset ratio, so a --subset fit costs what the full model costs per image")
    ap.add_argument("--features", default=None, help="--part coreset: cached features (.pt; written when missing)")
    ap.add_argument("--ratio", type=float, default=0.01, help="--part coreset: memory = this share of the patches")
    ap.add_argument("--variants", default="fast@0,legacy@1,fast@1,fast@2,legacy@0,legacy@2,fast-noprecut@0",
                    help=f"--part seeds: VARIANT@SEED, in order; variants {sorted(SEED_VARIANTS)}")
    ap.add_argument("--backbones", default="tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2")
    a = parse(ap, argv)
    if not Path(a.data).is_file():
        print(f"error: {a.data} not found (the benchmark reads ../shared/data/mtd/split.csv)", file=sys.stderr)
        return 2
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_info = {"commit": git_commit(), "command": command("bank_speed", argv), **machine()}
    print(f"# {json.dumps(run_info)}", file=sys.stderr, flush=True)
    out = JsonLines(a.json)
    if a.part == "fit":
        det, test = fit_rows(a, out, run_info)
        if a.inference:
            inference_rows(a, out, run_info, det, test)
    elif a.part == "coreset":
        coreset_rows(a, out, run_info)
    elif a.part == "inference":
        inference_rows(a, out, run_info)
    elif a.part == "seeds":
        seeds_rows(a, out, run_info)
    else:
        backbone_rows(a, out, run_info)
    return 0
