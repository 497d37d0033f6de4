"""The ``--model DIR`` mode of ``python -m benchmarks speed``: one saved model, end to end.

``--model DIR`` times one SAVED model end to end the way the app and the CLI call it
(``AnomalyDetector.load_folder``; ``predict(image)`` one image at a time, as one app request, and
``predict_many(images, batch_size=B)`` for each ``--batch-sizes``) on the bundled sample images
(``assets/samples``, decoded once, cycled to ``--n-images``), after one warm-up call, median of
``--reps``; seconds per inspection = call time / images, wall time and this process's CPU time
(``time.process_time``: with 2 threads an idle 2-core machine gives wall ~ CPU / 2 at best; CPU
time is the figure that other processes on a shared machine inflate least). It also splits one
batch-1 inspection into its parts (the method's maps, e.g. CCAD(V)'s reconstruction + feature
comparison, and the fusion memory's nearest-neighbour map); ``--sessions N`` starts N one-image
requests at once and serves them one by one (a queue with concurrency 1, as the app's inspect
queue) and through :class:`ccad.batching.PredictionBatcher` (p50 latency, seconds per
inspection); ``--check`` asserts that every batch size gives the one-at-a-time scores and maps
(float32 tolerance). ``--threads`` sets ``torch.set_num_threads`` (a free Space has 2 cores).
One JSON line, then a table.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any, Optional

import ccad  # noqa: F401 - before torch, as the CLI and the app import it (its OpenMP wait policy)
import torch

from benchmarks.common import ROOT, git_commit, machine


def sample_images(n: int) -> tuple[list[Any], list[str]]:
    from ccad.data.io import list_images, load_image

    root = ROOT / "assets" / "samples"
    paths = list_images(root)
    if not paths:
        raise SystemExit(f"error: no sample images in {root}")
    imgs = [load_image(p) for p in paths]
    return [imgs[i % len(imgs)] for i in range(n)], [paths[i % len(paths)].name for i in range(n)]


def bench_saved(a: argparse.Namespace) -> dict[str, Any]:
    """End-to-end seconds per inspection of a saved model (see the module docstring)."""
    import numpy as np

    from ccad.data.convert import to_tensor
    from ccad.pipeline import AnomalyDetector

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    det = AnomalyDetector.load_folder(a.model, device=device)
    load_s = time.perf_counter() - t0
    images, names = sample_images(a.n_images)
    load_before = machine()["loadavg"]
    det.predict(images[0])  # warm-up: lazy backbone builds, allocator

    cpu: dict[str, float] = {}

    def med(fn: Any, reps: int, key: Optional[str] = None, n: int = 1) -> float:
        """Median wall seconds of ``fn()`` / n; the median process CPU seconds / n go to cpu[key]
        (CPU time is what the work costs; wall time is inflated when other processes share the cores)."""
        out, cpus = [], []
        for _ in range(reps):
            c, t = time.process_time(), time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        if key:
            cpu[key] = round(statistics.median(cpus) / n, 4)
        return statistics.median(out) / n

    one = med(lambda: [det.predict(im) for im in images], a.reps, "predict", len(images))
    per_batch = {}
    for b in a.batch_sizes:
        det.predict_many(images[:b], batch_size=b)
        per_batch[b] = med(lambda b=b: det.predict_many(images, batch_size=b), a.reps, f"predict_many_b{b}",
                           len(images))
    # the parts of one batch-1 inspection (after decoding): the method's maps, the fusion map
    x = to_tensor(images[0], det.input_size)[None].to(device)
    xm = torch.nn.functional.interpolate(x, size=(det.image_size, det.image_size), mode="bilinear",
                                         align_corners=False, antialias=True)
    parts = {"method_maps_s": med(lambda: det.method.maps(xm), a.reps)}
    if det.fusion is not None:
        parts["fusion_bank_maps_s"] = med(lambda: det.fusion.bank_maps(x, tuple(x.shape[-2:])), a.reps)
    parts["maps_for_batch_s"] = med(lambda: det.maps_for_batch(x), a.reps)
    sessions = None
    if a.sessions:  # N sessions at once, one image each: served one by one vs. through the batcher
        sessions = {"n": a.sessions, "max_batch": a.max_batch}
        for mode in ("one_by_one", "batcher"):
            sessions[mode] = serve_sessions(det, images, a.sessions, mode, a.max_batch)
    check = None
    if a.check:  # batching must not change any prediction (float32 tolerance)
        ref = [det.predict(im) for im in images]
        worst_score, worst_map = 0.0, 0.0
        for b in a.batch_sizes:
            got, errs = det.predict_many(images, batch_size=b)
            assert not errs and len(got) == len(ref)
            for r, g in zip(ref, got):
                np.testing.assert_allclose(g.score, r.score, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(g.anomaly_map, r.anomaly_map, rtol=1e-4, atol=1e-4)
                worst_score = max(worst_score, abs(g.score - r.score))
                worst_map = max(worst_map, float(np.abs(g.anomaly_map - r.anomaly_map).max()))
        check = {"max_abs_score_diff": worst_score, "max_abs_map_diff": worst_map, "rtol": 1e-4}
    info = machine()
    return {"benchmark": "saved-model", "model": str(a.model), "variant": det.variant,
            "image_size": det.image_size, "input_size": det.input_size, "device": device.type,
            "device_name": info["device_name"], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": info["cpu_count"], "commit": git_commit(), "n_images": len(images),
            "images": sorted(set(names)), "reps": a.reps, "load_seconds": round(load_s, 2),
            "predict_s_per_image": round(one, 4),
            "predict_many_s_per_image": {str(b): round(v, 4) for b, v in per_batch.items()},
            "parts_batch1": {k: round(v, 4) for k, v in parts.items()}, "cpu_s_per_image": cpu,
            "batch_check": check, "sessions": sessions,
            "loadavg_before": load_before, "loadavg_after": info["loadavg"],
            "command": a.command}


def serve_sessions(det: Any, images: list[Any], n: int, mode: str, max_batch: int) -> dict[str, Any]:
    """``n`` threads start at once (a barrier), each asking for one inspection: ``one_by_one``
    takes a lock around ``det.predict`` (a queue served with concurrency 1, as the app's
    ``inspect`` queue); ``batcher`` goes through :class:`ccad.batching.PredictionBatcher`.
    Latency = finish - start of each request; per inspection = total wall / n."""

    from ccad.batching import PredictionBatcher

    lock = threading.Lock()
    gate = threading.Barrier(n + 1)
    lat: list[float] = [0.0] * n
    batcher = PredictionBatcher(det, max_batch=max_batch, max_wait_s=0.01) if mode == "batcher" else None

    def one(k: int) -> None:
        gate.wait()
        t = time.perf_counter()
        if batcher is not None:
            batcher.predict_many([images[k % len(images)]])
        else:
            with lock:
                det.predict(images[k % len(images)])
        lat[k] = time.perf_counter() - t

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    c0, t0 = time.process_time(), time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    calls = batcher.calls if batcher is not None else n
    if batcher is not None:
        batcher.close()
    lat.sort()
    return {"p50_latency_s": round(statistics.median(lat), 3), "max_latency_s": round(lat[-1], 3),
            "wall_s": round(wall, 3), "s_per_inspection": round(wall / n, 4), "cpu_s_per_inspection":
            round(cpu_s / n, 4), "detector_calls": calls}


def saved_table(row: dict[str, Any]) -> str:
    cpu = row["cpu_s_per_image"]
    lines = ["call | wall s per inspection | CPU s per inspection", "--- | --- | ---",
             f"predict (one image per call, as one app request) | {row['predict_s_per_image']:.3f} | "
             f"{cpu['predict']:.3f}"]
    for b, v in row["predict_many_s_per_image"].items():
        lines.append(f"predict_many batch {b} | {v:.3f} | {cpu[f'predict_many_b{b}']:.3f}")
    for k, v in row["parts_batch1"].items():
        lines.append(f"part, batch 1: {k[:-2]} | {v:.3f} | -")
    ses = row.get("sessions")
    if ses:
        for mode in ("one_by_one", "batcher"):
            r = ses[mode]
            lines.append(f"{ses['n']} sessions at once, {mode.replace('_', ' ')} (p50 latency "
                         f"{r['p50_latency_s']:.2f} s, {r['detector_calls']} detector calls) | "
                         f"{r['s_per_inspection']:.3f} | "
                         f"{r['cpu_s_per_inspection']:.3f}")
    lines.append(f"(threads {row['threads']}, load average before {row['loadavg_before']}, "
                 f"after {row['loadavg_after']})")
    return "\n".join(lines)
