"""Inference speed of every method, three ways (one benchmark; ``--mode`` picks the first two).

    python -m benchmarks speed --json results.jsonl            # GPU: full rows, 256 px, batch 1,8,32,64
    python -m benchmarks speed --compile --methods ccad-v,deco-diff
    python -m benchmarks speed --quick                          # CPU smoke: tiny presets, 64 px, batch 1,2
    python -m benchmarks speed --mode latency                   # ms/image at 128 and 256 px, batch 1 and 8, MTD
    python -m benchmarks speed --mode latency --sizes 256 --methods deco-diff,ccad-v
    python -m benchmarks speed --model checkpoints/demo --threads 2  # a saved model, end to end (below)

**Throughput** (``--mode throughput``, the default; was ``benchmarks/throughput.py``):
images per second, batch size swept.

Each method (default: every registered one, ``ccad.methods.method_names()``) is built through the
benchmarks' one code path (``common.build_detector`` with the ``full`` settings row of
``benchmarks/common.py`` on CUDA, the ``quick`` row on the CPU, at ``--image-size``) on a few
generated textures (``ccad.data.synthetic``), trained for ONE step and not calibrated: the
networks are untrained, which does not change the cost of a forward pass (same architecture,
same number of denoising / correction steps, same autoencoder and scoring backbone). Latent
methods use the TAEF2 autoencoder of ``common.default_autoencoder()`` when its weights are there,
else the random-init one (``taef2:random``, the same architecture and cost); the spec is recorded.

Timed: ``detector.maps_for_batch(x)`` on a batch of generated textures already on the device -
everything a prediction costs after decoding and resizing - under bf16 autocast on CUDA (fp32 on
the CPU; ``--dtype``), the method's networks and the input in channels-last on CUDA
(``--memory-format``), after ``--warmup`` untimed calls, with ``torch.cuda.synchronize()``
around each of the ``--reps`` timed calls; images/s = batch / median seconds. ``--compile``
compiles the method's networks (and the autoencoder's encoder / decoder) in place with
``torch.compile``; a compile failure is recorded in the row (``compile_error``) and the method
is timed without it. A batch size that runs out of memory is recorded as ``oom`` and the larger
ones are skipped; once (warmup + reps) calls of one batch size take longer than ``--budget-s``,
the larger batch sizes are skipped too (recorded).

``--model DIR`` instead times one SAVED model end to end: :mod:`benchmarks.speed_saved`.

**Latency** (``--mode latency``; was ``benchmarks/speed.py``): per-image inference time at
several image sizes (``--sizes``, default 128,256) and batch sizes (``--batch-sizes``, default
1,8) on real images (``--data``: MTD's split.csv by default, any CSV manifest). Each method is
built through ``common.build_detector`` with the ``quick`` settings row at the requested size on
``--n-train`` training images and trained for ONE step (untrained networks, the same forward
cost). ``NAME@full`` uses the method's full-mode row (e.g. ``ccad-v@full``: the base denoiser, 10
DDIM steps), still at the requested size. Timed: ``detector.maps_for_batch(x)`` on real test
images, after one warm-up call; the median of ``--reps`` runs (default 3; a row whose first call
takes over 20 s gets one; once an image takes over 10 s, larger batches are skipped, ``null``).
One JSON line per (method, size) with ``ms_per_image_b<B>`` for each batch, then a table with the
ratio to CCAD(V) (quick row) at the same size and batch. The load average before / after each row
is recorded.

Throughput output: one JSON line per (method, device), written as soon as the method is done, with the
settings (batch sizes, dtype, compile, channels-last, settings row, preset, image size), every
batch size's result, the best images/s and its batch, the device name, torch version, commit
and load average (CPU timings on a shared machine are inflated by other processes); then a
table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import ccad  # noqa: F401 - before torch, as the CLI and the app import it (its OpenMP wait policy)
import torch

from benchmarks.common import (MTD_SPLIT, JsonLines, build_detector, command, default_autoencoder, git_commit,
                               machine, make_parser, parse, settings_for)
from benchmarks.speed_saved import bench_saved, saved_table
from ccad.methods import get_method, method_names

LATENCY_METHODS = "patchcore,ccad-v,ccad-v@full,ccad-c,ccad-f,deco-diff"


def parse_batches(text: str) -> list[int]:
    out = sorted({int(b) for b in text.split(",") if b.strip()})
    if not out or out[0] < 1:
        raise SystemExit(f"error: --batch-sizes {text!r}: expected positive integers, e.g. 1,8,32,64")
    return out


def pick_autoencoder(spec: Optional[str]) -> str:
    if spec:
        return spec
    found = default_autoencoder()
    return found if (Path(found.split(":", 1)[1]) / "taef2_encoder.pth").is_file() else "taef2:random"


def textures(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n x 3 x S x S`` generated textures in [0, 1] (four kinds, cycled)."""
    from ccad.data.convert import to_tensor
    from ccad.data.synthetic import generate_texture

    kinds = ("fibrous", "granular", "cloud", "woven")
    out = []
    for i in range(min(n, 8)):
        im = generate_texture(kinds[i % len(kinds)], size=size, seed=seed + i)
        out.append(to_tensor(im, size))  # grey -> 3 x S x S
    x = torch.stack(out)
    return x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n].contiguous()


def train_samples(folder: Path, size: int, n: int) -> list:
    from ccad.data.detect import load_dataset
    from ccad.data.synthetic import write_dataset

    root = write_dataset(folder, kinds=("granular",), n_train=n, n_test_good=1, n_test_defect=1, size=size, seed=3,
                         defects=("spot",))
    return [s for s in load_dataset(root, split="train") if s.label == 0]


def row_settings(name: str, mode: str, size: int, autoencoder: str, preset: Optional[str]) -> dict[str, Any]:
    """The benchmark table's row for ``name`` at ``size``, one training step, no domain adaptation
    (it changes the scoring extractor's weights, not its cost)."""
    fields = {f.name for f in dataclasses.fields(get_method(name).Config)}
    options = {"domain_adapt_epochs": 0} if "domain_adapt_epochs" in fields else {}
    overrides: dict[str, Any] = {"image_size": size, "steps": 1, "warmup_steps": 0, "batch_size": 2}
    if preset is not None and "preset" in fields:
        overrides["preset"] = preset
    if not get_method(name).trainable:
        overrides = {"image_size": size}
    return settings_for(name, mode, autoencoder, overrides=overrides, options=options)


def compile_networks(det: Any) -> tuple[list[str], list[tuple[Any, str]]]:
    """``torch.compile`` the method's networks in place (``nn.Module.compile``) and the autoencoder's
    children; returns their names and the handles to undo it."""
    done: list[tuple[Any, str]] = []
    for key, mod in det.method.modules.items():
        mod.compile()
        done.append((mod, key))
    ae = getattr(det.method, "autoencoder", None)
    backend = getattr(ae, "backend", None)
    if isinstance(backend, torch.nn.Module):
        for key, mod in backend.named_children():
            mod.compile()
            done.append((mod, f"autoencoder.{key}"))
    return [n for _, n in done], done


def uncompile(done: list[tuple[Any, str]]) -> None:
    for mod, _ in done:
        mod._compiled_call_impl = None


def timed(det: Any, x: torch.Tensor, warmup: int, reps: int, dtype: str) -> list[float]:
    cuda = x.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def ctx() -> Any:
        if dtype == "bf16":
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    for _ in range(warmup):
        with ctx():
            det.maps_for_batch(x)
    sync()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        with ctx():
            det.maps_for_batch(x)
        sync()
        out.append(time.perf_counter() - t)
    return out


def error_text(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' '.join(lines)[:400]}"


def bench_method(name: str, a: argparse.Namespace, train: list, run_root: Path, device: torch.device,
                 base: dict[str, Any]) -> dict[str, Any]:
    cuda = device.type == "cuda"
    row: dict[str, Any] = {**base, "method": name}
    s = row_settings(name, a.settings, a.image_size, a.autoencoder, a.preset)
    row.update(preset=s.get("preset"), steps_trained=1 if get_method(name).trainable else 0)
    t0 = time.perf_counter()
    try:
        det = build_detector(name, train, s, run_root / name, calibration_fraction=0.0, device=device,
                             latent_cache=run_root / "latents")
    except Exception as exc:  # noqa: BLE001 - one method failing must not stop the others: record it
        row.update(error=f"build: {error_text(exc)}", best_images_per_s=None, best_batch=None)
        if a.verbose:
            traceback.print_exc()
        return row
    row["build_seconds"] = round(time.perf_counter() - t0, 1)
    channels_last = a.memory_format == "channels_last" or (a.memory_format == "auto" and cuda)
    if channels_last:
        det.method.modules.to(memory_format=torch.channels_last)
    row["channels_last"] = channels_last
    compiled: list[tuple[Any, str]] = []
    if a.compile:
        try:
            row["compiled"], compiled = compile_networks(det)
        except Exception as exc:  # noqa: BLE001
            row["compile_error"] = error_text(exc)
    results = []
    xs = textures(max(a.batch_sizes), a.image_size).to(device)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    skip_reason = None
    for b in a.batch_sizes:
        if skip_reason is not None:
            results.append({"batch": b, "skipped": skip_reason})
            continue
        x = xs[:b]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times = timed(det, x, a.warmup, a.reps, a.dtype)
        except torch.cuda.OutOfMemoryError:
            results.append({"batch": b, "error": "oom"})
            skip_reason = f"oom at batch {b}"
            torch.cuda.empty_cache()
            continue
        except Exception as exc:  # noqa: BLE001
            if compiled and "compile_error" not in row:
                # the compiled graph failed (compilation is lazy): record it, time the eager networks
                row["compile_error"] = error_text(exc)
                uncompile(compiled)
                compiled = []
                try:
                    times = timed(det, x, a.warmup, a.reps, a.dtype)
                except Exception as exc2:  # noqa: BLE001
                    results.append({"batch": b, "error": error_text(exc2)})
                    continue
            else:
                if a.verbose:
                    traceback.print_exc()
                results.append({"batch": b, "error": error_text(exc)})
                continue
        med = statistics.median(times)
        r = {"batch": b, "seconds_per_batch": round(med, 5), "images_per_s": round(b / med, 2),
             "min_s": round(min(times), 5), "max_s": round(max(times), 5)}
        if cuda:
            r["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        results.append(r)
        if med * (a.warmup + a.reps) > a.budget_s:
            skip_reason = f"batch {b} took {med:.2f} s per call (budget {a.budget_s:g} s per batch size)"
    row["results"] = results
    ok = [r for r in results if "images_per_s" in r]
    best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    row["best_images_per_s"] = best["images_per_s"] if best else None
    row["best_batch"] = best["batch"] if best else None
    if not ok:
        row["error"] = "; ".join(f"batch {r['batch']}: {r.get('error') or r.get('skipped')}" for r in results)
    del det
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    head = ["method", "device", "dtype", "compile", "best img/s", "at batch"] + [f"b={b}" for b in batches]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        per = {x["batch"]: x for x in r.get("results", [])}
        cells = []
        for b in batches:
            x = per.get(b, {})
            cells.append(f"{x['images_per_s']:g}" if "images_per_s" in x else ("oom" if x.get("error") == "oom" else
                                                                                 ("skip" if "skipped" in x else
                                                                                  ("err" if x else "-"))))
        comp = ("failed" if r.get("compile_error") else "yes") if r.get("compile") else "no"
        best = "-" if r.get("best_images_per_s") is None else f"{r['best_images_per_s']:g}"
        lines.append(" | ".join([r["method"], r["device"], r["dtype"], comp, best, str(r.get("best_batch") or "-"),
                                 *cells]))
    return "\n".join(lines)


def latency_time_call(det: Any, x: torch.Tensor, reps: int) -> float:
    """Median seconds of ``det.maps_for_batch(x)`` over ``reps`` runs after one warm-up."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    det.maps_for_batch(x)
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        det.maps_for_batch(x)
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def bench_latency(a: argparse.Namespace, out: JsonLines) -> list[dict[str, Any]]:
    """``--mode latency``: ms per image of each (method, size) at each batch size (module docstring)."""
    from ccad.data.layouts import load_csv_manifest
    from ccad.data.convert import to_tensor
    from ccad.data.io import load_image

    ae = a.autoencoder or default_autoencoder()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train = load_csv_manifest(a.data, split="train")  # every k-th good train image (MTD: 762 // n_train)
    train = train[:: max(1, len(train) // a.n_train)][: a.n_train]
    test = load_csv_manifest(a.data, split="test")
    test = test[:: max(1, len(test) // 8)][:8]
    images = [load_image(s.image_path) for s in test]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ccad-speed-"))
    run = {"commit": git_commit(), "command": a.command, **machine()}
    print(f"# {json.dumps(run)}", file=sys.stderr, flush=True)
    rows = []
    for size in a.sizes:
        xs = torch.stack([to_tensor(im, size) for im in images])
        for spec in a.methods:
            name, _, mode = spec.partition("@")
            mode = mode or "quick"
            trainable = get_method(name).trainable
            s = settings_for(name, mode, ae, {"image_size": size, "steps": 1 if trainable else None,
                                              "batch_size": 2 if trainable else None,
                                              "warmup_steps": 0 if trainable else None})
            load0 = machine()["loadavg"]
            t0 = time.perf_counter()
            det = build_detector(name, train, s, work / f"{spec}-{size}", calibration_fraction=0.25, device=device,
                                 latent_cache=work / f"latents-{size}")
            build_s = time.perf_counter() - t0
            ms: dict[str, Any] = {}
            for b in a.batch_sizes:
                if ms and max(v for v in ms.values() if v is not None) > 10000:  # > 10 s an image: skip larger
                    ms[f"ms_per_image_b{b}"] = None
                    continue
                x = xs[:b] if b <= len(xs) else xs.repeat((b + len(xs) - 1) // len(xs), 1, 1, 1)[:b]
                first = time.perf_counter()
                det.maps_for_batch(x)
                reps = a.reps if time.perf_counter() - first < 20 else 1  # slow rows: one timed run
                ms[f"ms_per_image_b{b}"] = round(1000 * latency_time_call(det, x, reps) / b, 1)
            row = {"method": spec, "image_size": size, **ms, "device": device,
                   "settings": {"mode": mode, "preset": s.get("preset"), "options": s.get("options", {}),
                                "trained_steps": 1 if trainable else None, "untrained_networks": trainable,
                                "build_seconds": round(build_s, 1), "reps": a.reps,
                                "loadavg_start": load0, "loadavg_end": machine()["loadavg"], "run": run}}
            out.emit(row)
            rows.append(row)
    return rows


def latency_table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    ref = {(r["image_size"]): r for r in rows if r["method"] == "ccad-v"}
    lines = [f"{'method':<14}{'size':>6}" + "".join(f"{'ms/img b' + str(b):>14}{'vs ccad-v':>11}" for b in batches)]
    for r in rows:
        line = f"{r['method']:<14}{r['image_size']:>6}"
        for b in batches:
            v = r[f"ms_per_image_b{b}"]
            base = ref.get(r["image_size"], {}).get(f"ms_per_image_b{b}")
            line += f"{str(v):>14}" + (f"{base / v:>10.2f}x" if base and v else f"{'-':>11}")
        lines.append(line)
    lines.append("\n('vs ccad-v' = CCAD(V) quick-row ms / this row's ms at the same size and batch; > 1 = faster. "
                 "Networks untrained: forward cost only.)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("speed", __doc__, quick="throughput: CPU smoke test (tiny presets, 64 px, batch 1,2, one "
                                             "warm-up and one timed call)",
                     workdir="latency: run folders (default: a temporary folder)", autoencoder=True, device=True,
                     threads=None)
    ap.add_argument("--mode", choices=("throughput", "latency"), default="throughput",
                    help="throughput: images/s per batch size on generated textures (default); latency: ms/image "
                         "per image size on real images (--data). --model times a saved model instead")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names (throughput: or 'all', the registry, the default; "
                         f"latency: NAME or NAME@full, default {LATENCY_METHODS})")
    ap.add_argument("--batch-sizes", "--batches", dest="batch_sizes", default=None,
                    help="throughput: default 1,8,32,64 (--quick: 1,2); latency: default 1,8; --model: 1,4,8")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per batch size (throughput: default 5, quick 1; latency and --model: 3)")
    ap.add_argument("--image-size", type=int, default=None, help="throughput: default 256 (--quick: 64)")
    ap.add_argument("--settings", choices=("quick", "full"), default=None,
                    help="throughput: the benchmark table row (default: full on CUDA, quick on the CPU)")
    ap.add_argument("--preset", default=None, help="throughput: override the row's network preset (tiny/small/base)")
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="throughput: auto = bf16 autocast on CUDA, fp32 on the CPU")
    ap.add_argument("--compile", action="store_true", help="throughput: torch.compile the method's networks")
    ap.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto",
                    help="throughput: networks and input batch; auto: channels-last on CUDA, contiguous on the CPU")
    ap.add_argument("--warmup", type=int, default=None, help="throughput: untimed calls per batch size (default 2; "
                                                             "quick 1)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="throughput: skip larger batches once (warmup + reps) calls of one batch size exceed this")
    ap.add_argument("--train-images", type=int, default=8, help="throughput: generated images the networks are "
                                                                "built on")
    ap.add_argument("--verbose", action="store_true", help="throughput: print tracebacks of failures")
    ap.add_argument("--data", default=str(MTD_SPLIT), help="latency: a CSV manifest (default MTD's split.csv)")
    ap.add_argument("--sizes", default="128,256", help="latency: image sizes (default 128,256)")
    ap.add_argument("--n-train", type=int, default=16, help="latency: images the (untrained) detectors are built on")
    ap.add_argument("--model", default=None, help="time this saved model end to end instead (e.g. checkpoints/demo)")
    ap.add_argument("--n-images", type=int, default=8, help="--model: sample images per timed call")
    ap.add_argument("--sessions", type=int, default=0,
                    help="--model: also serve N simultaneous one-image sessions, one by one and batched")
    ap.add_argument("--max-batch", type=int, default=8, help="--sessions: the batcher's largest batch")
    ap.add_argument("--check", action="store_true",
                    help="--model: assert every batch size gives the one-at-a-time scores and maps")
    a = parse(ap, argv)
    a.command = command("speed", argv)
    out = JsonLines(a.json)
    if a.model:
        a.batch_sizes = parse_batches(a.batch_sizes or "1,4,8")
        a.reps = a.reps if a.reps is not None else 3
        row = bench_saved(a)
        out.emit(row)
        print()
        print(saved_table(row))
        return 0
    if a.mode == "latency":
        if a.threads is None:  # as the latency benchmark always ran: every core
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        a.methods = [m.strip() for m in (a.methods or LATENCY_METHODS).split(",") if m.strip()]
        a.sizes = [int(v) for v in a.sizes.split(",") if v.strip()]
        a.batch_sizes = [int(v) for v in (a.batch_sizes or "1,8").split(",") if v.strip()]
        a.reps = a.reps if a.reps is not None else 3
        if not Path(a.data).is_file():
            print(f"error: {a.data} not found (--mode latency reads MTD's split.csv, or --data)", file=sys.stderr)
            return 2
        rows = bench_latency(a, out)
        print()
        print(latency_table(rows, a.batch_sizes))
        return 0

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    a.settings = a.settings or ("full" if cuda and not a.quick else "quick")
    if a.quick:
        a.preset = a.preset or "tiny"
    a.image_size = a.image_size or (64 if a.quick else 256)
    a.batch_sizes = parse_batches(a.batch_sizes or ("1,2" if a.quick else "1,8,32,64"))
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 5)
    if a.dtype == "auto":
        a.dtype = "bf16" if cuda else "fp32"
    a.autoencoder = pick_autoencoder(a.autoencoder)
    methods = a.methods or "all"
    names = method_names() if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for n in names:
        get_method(n)  # an unknown name fails here, listing the known ones
    if cuda:
        torch.backends.cudnn.benchmark = True

    info = machine()
    base = {"benchmark": "throughput", "device": device.type, "device_name": info["device_name"],
            "torch": torch.__version__, "commit": git_commit(),
            "settings": a.settings, "image_size": a.image_size, "batch_sizes": a.batch_sizes, "dtype": a.dtype,
            "compile": bool(a.compile), "memory_format": a.memory_format, "warmup": a.warmup, "reps": a.reps,
            "autoencoder": a.autoencoder,
            "cpu_count": info["cpu_count"], "torch_threads": info["torch_threads"],
            "command": a.command}
    with tempfile.TemporaryDirectory(prefix="ccad-throughput-") as tmp:
        tmp_p = Path(tmp)
        train = train_samples(tmp_p / "data", a.image_size, a.train_images)
        for name in names:
            t0 = time.perf_counter()
            row = bench_method(name, a, train, tmp_p / "runs", device, base)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["loadavg"] = machine()["loadavg"]
            out.emit(row)
    print()
    print(table(out.rows, a.batch_sizes))
    return 0
