"""``ccad serve`` under load: N concurrent clients over real HTTP, with and without micro-batching.

    python -m benchmarks serve --workdir /tmp/serve-bench                  # PatchCore on 40 MTD good images
    python -m benchmarks serve --model path/to/model --clients 8 --requests 8 --json out.jsonl

The model: ``--model DIR`` (a saved model folder), else a PatchCore detector fitted here on the
first ``--n-train`` good training images of ``--data`` (MTD's ``split.csv``; 256 px, the ``mtd``
quick settings) and saved in ``WORKDIR/model``. The request images: ``--n-images`` test images of
the same split (good and defective alternating), sent as the files' own bytes.

Each row starts the real command, ``python -m ccad.cli serve MODEL --port P`` (with ``--batch
--max-batch B --max-wait-ms W`` for the batched rows; ``--max-queue`` = clients, so nothing is
refused by design), in a subprocess on a free 127.0.0.1 port; waits for ``/health``; sends one
warm-up request; then ``--clients`` threads start at once (a barrier) and each sends
``--requests`` one-image ``POST /predict`` requests back to back (a closed loop: a line PC waits
for its verdict before sending the next part). Per row: requests/s (ok requests / wall time of the
burst), latency p50/p90/p99/max (send to answer), ``ok`` / ``lost`` (no answer before
``--timeout``, or a transport error) / ``refused`` (503) / ``failed`` (any other status);
``server_alive`` (``/health`` and one more prediction after the burst); ``mean_batch`` (images per
model call, from ``/health``); ``server_cpu_s_per_request`` (the server process's CPU seconds over
the burst per answered request: on a shared machine the figure others inflate least);
``max_score_diff`` (largest score difference against the first row, per image: batching and the
export must not change a score); ``runtime_threading`` (an export's onnxruntime threads and spinning,
from ``/model``; ``$CCAD_RUNTIME_THREADS`` / ``$CCAD_RUNTIME_SPINNING`` reach the servers).

Rows: ``torch`` without and with batching, then the ONNX export (``ccad export MODEL --format onnx``
served by ``ccad.runtime``) without and with batching, in the same run, when ``ccad.runtime`` is
importable; otherwise that row says why it was skipped. Server and clients share the machine
(2 cores here): the figures are the whole system's, not the server's alone. The load average before
and after each row is recorded. One JSON line per row (``--json`` appends), then a table.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from benchmarks.common import MTD_SPLIT, ROOT, JsonLines, command, git_commit, make_parser, parse, percentile


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), nd)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------- the model

def build_model(a: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """``--model``, or a PatchCore detector fitted on the first ``--n-train`` good train images."""
    if a.model:
        return Path(a.model), {"model": str(a.model)}
    from ccad.data.layouts import load_csv_manifest
    from ccad.methods import get_method
    from ccad.pipeline import fit_detector

    train = [s for s in load_csv_manifest(a.data, split="train") if s.label == 0][: a.n_train]
    out = work / "model"
    t0 = time.perf_counter()
    det = fit_detector(train, variant="patchcore", image_size=a.image_size, bank_size=200,
                       method=get_method("patchcore").Config(ratio=0.01), calibration_fraction=0.25)
    fit_s = time.perf_counter() - t0
    det.save_pretrained(out)
    return out, {"model": "patchcore fitted here", "data": str(a.data), "n_train": len(train),
                 "image_size": a.image_size, "fit_s": round(fit_s, 2)}


def request_images(a: Any) -> list[Path]:
    if a.images:
        from ccad.data.io import list_images

        paths = list_images(a.images)
    else:
        from ccad.data.layouts import load_csv_manifest

        test = load_csv_manifest(a.data, split="test")
        good = [Path(s.image_path) for s in test if s.label == 0]
        bad = [Path(s.image_path) for s in test if s.label == 1]
        paths = [p for pair in zip(good, bad) for p in pair]
    if not paths:
        raise SystemExit("error: no request images (--images DIR, or a --data split with test images)")
    return [paths[i % len(paths)] for i in range(a.n_images)]


def export_model(model: Path, work: Path) -> tuple[Optional[Path], Optional[str]]:
    """The ONNX export of ``model`` for the export rows, or (None, why not)."""
    if importlib.util.find_spec("ccad.runtime") is None:
        return None, "ccad.runtime is not importable on this branch (issue 22 item 1 adds it): no export row"
    out = work / "export"
    if not (out / "verdict.json").is_file():
        proc = subprocess.run([sys.executable, "-m", "ccad.cli", "export", str(model), "--format", "onnx", "--out",
                               str(out)], cwd=ROOT, capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            return None, f"ccad export failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    return out, None


# ---------------------------------------------------------------------------------------- a server

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Server:
    """``python -m ccad.cli serve`` in a subprocess (its log in ``log``)."""

    def __init__(self, model: Path, port: int, args: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ccad.cli", "serve", str(model), "--port", str(port),
                                      "--log-level", "warning", *args], cwd=ROOT, env=_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: ccad serve exited {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"error: ccad serve did not answer /health in {timeout} s; see {self.log.name}")

    def cpu_s(self) -> float:
        """The server process's CPU seconds so far (user + system, all its threads): the figure other
        processes on a shared machine inflate least."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def burst(url: str, images: list[Path], clients: int, per_client: int, timeout: float) -> dict[str, Any]:
    """``clients`` threads, each ``per_client`` requests back to back; every outcome recorded."""
    bodies = [p.read_bytes() for p in images]
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(timeout=timeout) as http:
            barrier.wait()
            for k in range(per_client):
                j = (c * per_client + k) % len(images)
                t = time.perf_counter()
                row: dict[str, Any] = {"client": c, "image": j}
                try:
                    r = http.post(url + "/predict", params={"name": f"{c}-{k}"}, content=bodies[j],
                                  headers={"Content-Type": "application/octet-stream"})
                    row["status"] = r.status_code
                    if r.status_code == 200:
                        res = r.json()["results"][0]
                        row["score"] = res["score"]
                        row["right_answer"] = res["name"] == f"{c}-{k}"
                except httpx.HTTPError as exc:
                    row["status"] = None
                    row["error"] = repr(exc)
                row["latency_s"] = time.perf_counter() - t
                with lock:
                    outcomes.append(row)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout * per_client + 60)
    wall = time.perf_counter() - t0
    return {"outcomes": outcomes, "wall_s": wall}


def run_row(label: str, engine: str, model: Path, batch: bool, a: Any, images: list[Path], work: Path,
            port: int) -> dict[str, Any]:
    args = ["--max-queue", str(max(a.clients, 1))]
    if batch:
        args += ["--batch", "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)]
    load0 = loadavg()
    srv = Server(model, port, args, work / f"server-{label}.log")
    try:
        startup = srv.wait(a.startup_timeout)
        httpx.post(srv.url + "/predict", content=images[0].read_bytes(), timeout=a.timeout)  # warm-up
        h0 = httpx.get(srv.url + "/health", timeout=10).json()
        runtime = httpx.get(srv.url + "/model", timeout=30).json().get("runtime")  # the export's threading
        cpu0 = srv.cpu_s()
        got = burst(srv.url, images, a.clients, a.requests, a.timeout)
        cpu = srv.cpu_s() - cpu0
        try:
            h1 = httpx.get(srv.url + "/health", timeout=10).json()
            alive = httpx.post(srv.url + "/predict", content=images[-1].read_bytes(),
                               timeout=a.timeout).status_code == 200
        except httpx.HTTPError:
            h1, alive = {}, False
    finally:
        srv.stop()
    out = got["outcomes"]
    ok = [o for o in out if o["status"] == 200]
    lat = [o["latency_s"] for o in ok]
    n = a.clients * a.requests
    calls = (h1.get("model_calls", 0) - h0.get("model_calls", 0)) if h1 else 0
    imgs = (h1.get("images", 0) - h0.get("images", 0)) if h1 else 0
    scores: dict[int, float] = {}
    for o in ok:
        scores.setdefault(o["image"], o["score"])
    return {"benchmark": "serve", "row": label, "engine": engine, "batch": batch,
            "max_batch": a.max_batch if batch else None, "max_wait_ms": a.max_wait_ms if batch else None,
            "clients": a.clients, "requests": n, "ok": len(ok),
            "lost": sum(o["status"] is None for o in out) + (n - len(out)),
            "refused": sum(o["status"] == 503 for o in out),
            "failed": sum(o["status"] not in (None, 200, 503) for o in out),
            "wrong_answer": sum(not o.get("right_answer", True) for o in ok),
            "requests_per_s": _r(len(ok) / got["wall_s"] if got["wall_s"] > 0 else None, 3),
            "latency_p50_s": _r(percentile(lat, 50)), "latency_p90_s": _r(percentile(lat, 90)),
            "latency_p99_s": _r(percentile(lat, 99)), "latency_max_s": _r(max(lat) if lat else None),
            "latency_mean_s": _r(statistics.fmean(lat) if lat else None),
            "wall_s": _r(got["wall_s"], 3), "server_cpu_s": _r(cpu, 3),
            "server_cpu_s_per_request": _r(cpu / len(ok) if ok else None),
            "mean_batch": _r(imgs / calls if calls else None, 2),
            "server_alive": bool(alive), "runtime_threading": runtime, "startup_s": _r(startup, 2),
            "loadavg_start": load0,
            "loadavg_end": loadavg(), "_scores": scores}


def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("serve", __doc__, workdir="folder for the fitted model, the export and the servers' logs "
                                               "(default: a temporary folder)")
    ap.add_argument("--model", default=None, help="a saved model folder (default: fit PatchCore on --data)")
    ap.add_argument("--data", default=str(MTD_SPLIT), help="MTD split.csv (or any CSV manifest)")
    ap.add_argument("--n-train", type=int, default=40, help="good train images for the fitted PatchCore")
    ap.add_argument("--image-size", type=int, default=256, help="the fitted PatchCore's input size")
    ap.add_argument("--images", default=None, help="a folder of request images (default: --data's test images)")
    ap.add_argument("--n-images", type=int, default=16, help="distinct request images (cycled)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=8, help="requests per client, back to back")
    ap.add_argument("--max-batch", type=int, default=8, help="the batched rows' --max-batch")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="the batched rows' --max-wait-ms")
    ap.add_argument("--modes", default="off,on", help="batching modes to run: off, on or both")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the rows this many times, alternating (off, on, off, on, ...): drift on a shared "
                         "machine then hits every mode alike")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take before it is lost")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds the server may take to start")
    a = parse(ap, argv)
    import tempfile

    from benchmarks.app_load import free_port

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = JsonLines(a.json)
    model, model_facts = build_model(a, work)
    images = request_images(a)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in ("off", "on") for m in modes):
        raise SystemExit(f"error: --modes {a.modes!r}: give off, on or off,on")
    export, why = export_model(model, work)
    plan = [("torch", model)] + ([("onnx", export)] if export is not None else [])
    common = {"command": command("serve", argv), "commit": git_commit(), "cpu_count": os.cpu_count(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (set by import ccad)"),
              **{k.lower(): os.environ[k] for k in ("CCAD_RUNTIME_THREADS", "CCAD_RUNTIME_SPINNING")
                 if k in os.environ},
              "n_images": len(set(images)), **model_facts}
    rows, first = [], None
    runs = [(rep, engine, src, mode) for rep in range(max(1, a.repeat)) for engine, src in plan for mode in modes]
    for rep, engine, src, mode in runs:
        label = f"{engine}-batch-{mode}" + (f"-{rep + 1}" if a.repeat > 1 else "")
        row = run_row(label, engine, src, mode == "on", a, images, work, free_port())
        scores = row.pop("_scores")
        if first is None:
            first = scores
        diffs = [abs(scores[j] - first[j]) for j in scores if j in first]
        row["max_score_diff"] = _r(max(diffs) if diffs else None, 8)
        row.update(common)
        out.emit(row)
        rows.append(row)
    if export is None:
        row = {"benchmark": "serve", "row": "onnx", "engine": "onnx", "skipped": why, **common}
        out.emit(row)
        rows.append(row)
    keys = ("row", "ok", "lost", "refused", "failed", "requests_per_s", "latency_p50_s", "latency_p99_s",
            "server_cpu_s_per_request", "mean_batch", "max_score_diff", "server_alive")
    print("\n" + "".join(f"{k.replace('server_', '').replace('_per_request', '/req'):>16}" for k in keys))
    for r in rows:
        if "skipped" in r:
            print(f"{r['row']:>16}  skipped: {r['skipped']}")
            continue
        print("".join(f"{str(r.get(k)):>16}" for k in keys))
    return 0 if all(r.get("server_alive", True) and not r.get("lost") for r in rows) else 1
