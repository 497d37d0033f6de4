"""The app under load: N concurrent sessions inspect one image each through Gradio's HTTP queue API.

    python -m benchmarks app_load                              # 20 clients, the bundled demo model
    python -m benchmarks app_load --n 40 --model path/to/model --json benchmarks/results/app-load-cpu.jsonl

Starts ``ccad app`` (the real launch path: ``app.main.launch``, its ``demo.queue`` settings) in a
subprocess on a free 127.0.0.1 port, waits for it, sends one warm-up inspection, then starts N
client threads at once (a barrier). Each client is one session speaking the queue protocol the
browser and ``gradio_client`` speak: upload its image (``/gradio_api/upload``), join the queue for
the ``inspect`` endpoint (``/gradio_api/queue/join``), read its session's event stream
(``/gradio_api/queue/data``) until ``process_completed``. Raw HTTP rather than ``gradio_client``
so that every step carries its own timestamp: submit (before the upload), join sent / join
acknowledged by the server, queue rank at join (the server's ``estimation``), processing start
(``process_starts``), finish (``process_completed``).

Checks: every request served (``ok``: completed, the app's status line says "Inspected 1 image",
and the File box names this client's own image: no result is mixed up), none ``lost`` (no
completion before ``--timeout``), none refused (queue full) or failed; the server still answers
afterwards (``/config`` and one more inspection); queue order: ``order_violations`` counts pairs
(a, b) where a's join was acknowledged before b's join was even sent (so a surely entered the queue
first) and yet b started processing before a - Gradio's queue is FIFO per concurrency group, so
this must be 0; ``out_of_order_finishes`` counts requests whose finishing position differs from
their join-acknowledgement position (0 expected with the app's inspect concurrency of 1; joins
acknowledged within microseconds of each other can legitimately swap).

Latency = finish - submit (what a user waits: upload, queue wait, the model, the reply);
``wait`` = start - join ack (time in the queue); ``service`` = finish - start. Prints one JSON
line (``--json FILE`` appends it) and a per-request table. Timings on a shared CPU box are
inflated by other processes: the load average before and after is recorded.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import httpx

from benchmarks.common import ROOT, JsonLines, make_parser, parse, percentile

SAMPLES = ROOT / "assets" / "samples"


# ----------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "ccad", "benchmarks/app_load.py"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _r(x: Optional[float], nd: int = 3) -> Optional[float]:
    return None if x is None else round(float(x), nd)


def sample_images(src: Optional[str], n: int, workdir: Path) -> list[Path]:
    """n distinct files (req_00_<stem>.png, ...) cycling over the bundled samples (or ``src``); if there
    are none, textures from ``ccad.data.synthetic``."""
    folder = Path(src) if src else SAMPLES
    pool = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif"})
    if not pool:
        from ccad.data.synthetic import write_dataset

        ds = write_dataset(workdir / "synth", kinds=("fibrous",), n_train=1, n_test_good=4, n_test_defect=4,
                           size=64, seed=0, defects=("spot",))
        pool = sorted((ds / "fibrous" / "test").rglob("*.png"))
    out = []
    for i in range(n):
        p = pool[i % len(pool)]
        dst = workdir / "requests" / f"req_{i:02d}_{p.stem}{p.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
        out.append(dst)
    return out


# ----------------------------------------------------------------------------------------- server

class AppServer:
    """``ccad app`` in a subprocess (its log in ``workdir/server.log``)."""

    def __init__(self, port: int, workdir: Path, model: Optional[str], inspect_concurrency: Optional[int]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "server.log"
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(workdir / "gradio-tmp"),
                   HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")
        if inspect_concurrency is not None:
            env["CCAD_APP_INSPECT_CONCURRENCY"] = str(inspect_concurrency)
        cmd = [sys.executable, "-c", "import sys; from ccad.cli import main; sys.exit(main(sys.argv[1:]))",
               "app", "--host", "127.0.0.1", "--port", str(port), "--data-root", str(workdir),
               "--state-dir", str(workdir / "state")]  # never the user's own app state
        if model:
            cmd += ["--model", model]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/config", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the app did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return httpx.get(self.url + "/config", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ----------------------------------------------------------------------------------------- one client

class InspectEndpoint:
    """What a client needs from ``/config``: the API prefix, the ``inspect`` fn index, the default inputs
    (model name, threshold) and where the score / verdict / file / status boxes sit in the outputs."""

    def __init__(self, url: str, config: dict[str, Any], api_name: str = "inspect") -> None:
        self.url = url
        self.api = url + "/" + config.get("api_prefix", "/gradio_api").strip("/")
        self.protocol = config.get("protocol")
        deps = [d for d in config["dependencies"] if d.get("api_name") == api_name]
        if not deps:
            raise RuntimeError(f"the app has no endpoint api_name={api_name!r}")
        self.dep = deps[0]
        self.fn_index = self.dep["id"]
        comps = {c["id"]: c for c in config["components"]}
        by_elem = {c.get("props", {}).get("elem_id"): c for c in comps.values()}
        self.model = by_elem["model-select"]["props"].get("value")
        self.threshold = by_elem["inspect-threshold"]["props"].get("value")
        out_elems = [comps[i].get("props", {}).get("elem_id") for i in self.dep["outputs"]]
        self.out_index = {e: k for k, e in enumerate(out_elems) if e}

    def output(self, data: list[Any], elem_id: str) -> Any:
        """The value of the output component ``elem_id`` in a ``process_completed`` data list."""
        k = self.out_index.get(elem_id)
        return data[k] if k is not None and k < len(data) else None


def run_client(ep: InspectEndpoint, image: Path, barrier: Optional[threading.Barrier], timeout: float,
               t0: float) -> dict[str, Any]:
    """One session: upload, join, stream to completion. Times are seconds since ``t0``."""
    rec: dict[str, Any] = {"image": image.name, "ok": False, "status": "lost", "error": None, "rank": None}
    session = uuid.uuid4().hex[:11]
    now = lambda: time.perf_counter() - t0  # noqa: E731
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=30)) as http:
            if barrier is not None:
                barrier.wait(timeout=120)
            rec["submit"] = now()
            up = http.post(ep.api + "/upload", files=[("files", (image.name, image.read_bytes(), "image/png"))])
            up.raise_for_status()
            path = up.json()[0]
            fd = {"path": path, "orig_name": image.name, "meta": {"_type": "gradio.FileData"}}
            body = {"data": [ep.model, [fd], ep.threshold, ""], "fn_index": ep.fn_index, "session_hash": session,
                    "event_data": None, "trigger_id": ep.dep.get("targets", [[None]])[0][0]}
            rec["join_sent"] = now()
            j = http.post(ep.api + "/queue/join", json=body)
            rec["join_ack"] = now()
            if j.status_code == 503:
                rec.update(status="refused", error="queue full")
                return rec
            j.raise_for_status()
            event_id = j.json()["event_id"]
            deadline = time.time() + timeout
            with http.stream("GET", ep.api + "/queue/data", params={"session_hash": session}) as resp:
                buf = b""
                for chunk in resp.iter_bytes():
                    buf += chunk
                    while b"\n\n" in buf:
                        line, buf = buf.split(b"\n\n", 1)
                        line = line.decode("utf-8").strip()
                        if not line.startswith("data:"):
                            continue
                        msg = json.loads(line[5:])
                        kind = msg.get("msg")
                        if msg.get("event_id") not in (None, event_id):
                            continue
                        if kind == "estimation" and rec["rank"] is None:
                            rec["rank"] = msg.get("rank")
                        elif kind == "process_starts":
                            rec["start"] = now()
                        elif kind == "process_completed":
                            rec["finish"] = now()
                            out = msg.get("output") or {}
                            if not msg.get("success", False):
                                rec.update(status="failed", error=str(out.get("error") or msg)[:400])
                                return rec
                            data = out.get("data") or []
                            status_md, shown = ep.output(data, "inspect-status"), ep.output(data, "inspect-file")
                            rec.update(score=ep.output(data, "inspect-score"), file=shown,
                                       verdict=ep.output(data, "inspect-verdict"))
                            if str(status_md or "").startswith("Inspected 1 image") and shown == image.name:
                                rec.update(ok=True, status="ok")
                            else:
                                rec.update(status="failed", error=f"status={status_md!r} file={shown!r}")
                            return rec
                        elif kind == "close_stream":
                            return rec
                    if time.time() > deadline:
                        return rec
    except Exception as exc:  # a refused connection, a timeout: the request counts as lost / failed
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
        if "finish" in rec:
            rec["status"] = "failed"
    return rec


# ----------------------------------------------------------------------------------------- analysis

def order_stats(recs: list[dict[str, Any]]) -> dict[str, int]:
    served = [r for r in recs if "start" in r and "join_ack" in r]
    violations = sum(1 for a in served for b in served
                     if a is not b and a["join_ack"] < b["join_sent"] and b["start"] < a["start"])
    done = [r for r in served if "finish" in r]
    by_ack = sorted(done, key=lambda r: r["join_ack"])
    by_fin = sorted(done, key=lambda r: r["finish"])
    out_of_order = sum(1 for a, b in zip(by_ack, by_fin) if a is not b)
    return {"order_violations": violations, "out_of_order_finishes": out_of_order}


def summarise(recs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["finish"] - r["submit"] for r in recs if r["ok"]]
    wait = [r["start"] - r["join_ack"] for r in recs if r["ok"] and "start" in r]
    service = [r["finish"] - r["start"] for r in recs if r["ok"] and "start" in r]
    span = (max(r["finish"] for r in recs if r["ok"]) - min(r["submit"] for r in recs if "submit" in r)) \
        if lat else None
    return {
        "ok": sum(r["ok"] for r in recs),
        "lost": sum(r["status"] == "lost" for r in recs),
        "failed": sum(r["status"] == "failed" for r in recs),
        "refused": sum(r["status"] == "refused" for r in recs),
        "latency_p50_s": _r(percentile(lat, 50)), "latency_p90_s": _r(percentile(lat, 90)),
        "latency_p99_s": _r(percentile(lat, 99)), "latency_max_s": _r(max(lat) if lat else None),
        "latency_min_s": _r(min(lat) if lat else None),
        "queue_wait_p50_s": _r(percentile(wait, 50)), "queue_wait_max_s": _r(max(wait) if wait else None),
        "service_mean_s": _r(statistics.fmean(service) if service else None),
        "service_max_s": _r(max(service) if service else None),
        "span_s": _r(span), "throughput_per_s": _r(len(lat) / span if span else None, 4),
        **order_stats(recs),
    }


def table(recs: list[dict[str, Any]]) -> str:
    rows = [f"{'#':>3} {'image':<26} {'rank':>4} {'submit':>7} {'ack':>7} {'start':>7} {'finish':>7} "
            f"{'wait':>6} {'latency':>7}  status"]
    for i, r in sorted(enumerate(recs), key=lambda ir: ir[1].get("join_ack", 1e9)):
        def f(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]:7.2f}" if k in r else f"{'-':>7}"

        wait = f"{r['start'] - r['join_ack']:6.2f}" if "start" in r and "join_ack" in r else f"{'-':>6}"
        latency = f"{r['finish'] - r['submit']:7.2f}" if "finish" in r else f"{'-':>7}"
        status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
        rows.append(f"{i:>3} {r['image'][:26]:<26} {str(r['rank']):>4} {f('submit')} {f('join_ack')} {f('start')} "
                    f"{f('finish')} {wait} {latency}  {status}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    ap = make_parser("app_load", __doc__, json_help="append the JSON line to this file")
    ap.add_argument("--n", type=int, default=20, help="concurrent client sessions")
    ap.add_argument("--model", default=None, help="model folder or Hub id for the app (default: the bundled demo)")
    ap.add_argument("--images", default=None, help="folder of images to cycle over (default: assets/samples)")
    ap.add_argument("--inspect-concurrency", type=int, default=None,
                    help="CCAD_APP_INSPECT_CONCURRENCY for the server (default: the app's own, 1)")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the app to answer")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a client waits for its result")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up inspection before the burst")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (server log, request images)")
    a = parse(ap, argv)

    workdir = Path(tempfile.mkdtemp(prefix="ccad-app-load-"))
    images = sample_images(a.images, a.n + 2, workdir)
    load_start = loadavg()
    port = free_port()
    server = AppServer(port, workdir, a.model, a.inspect_concurrency)
    result: dict[str, Any] = {"bench": "app_load", "n": a.n}
    try:
        t_boot = time.perf_counter()
        config = server.wait_ready(a.startup_timeout)
        startup_s = time.perf_counter() - t_boot
        ep = InspectEndpoint(server.url, config)
        warm = None
        if not a.no_warmup:
            warm = run_client(ep, images[a.n], None, a.timeout, time.perf_counter())
            if not warm["ok"]:
                raise RuntimeError(f"the warm-up inspection failed: {warm}\n{server.log_tail()}")
        barrier = threading.Barrier(a.n)
        recs: list[dict[str, Any]] = [{}] * a.n
        t0 = time.perf_counter()

        def work(i: int) -> None:
            recs[i] = run_client(ep, images[i], barrier, a.timeout, t0)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(a.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.timeout + 180)
        recs = [r if r else {"image": images[i].name, "ok": False, "status": "lost", "error": "thread hung",
                             "rank": None} for i, r in enumerate(recs)]
        after = run_client(ep, images[a.n + 1], None, a.timeout, time.perf_counter())
        server_alive = server.alive() and after["ok"]
        result.update(summarise(recs))
        result.update({
            "server_alive": server_alive, "after_request_ok": after["ok"],
            "after_request_latency_s": _r(after["finish"] - after["submit"]) if after["ok"] else None,
            "warmup_s": _r(warm["finish"] - warm["submit"]) if warm else None, "startup_s": _r(startup_s, 1),
            "model": ep.model, "inspect_concurrency": a.inspect_concurrency or
            int(os.environ.get("CCAD_APP_INSPECT_CONCURRENCY", "1")),
            "queue": "FIFO per concurrency group (Gradio)", "protocol": ep.protocol,
            "loadavg_start": load_start, "loadavg_end": loadavg(), "cpus": os.cpu_count(),
            "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        print(table(recs))
        print()
        print(f"n={a.n} ok={result['ok']} lost={result['lost']} failed={result['failed']} "
              f"refused={result['refused']} | latency p50 {result['latency_p50_s']} s, "
              f"p90 {result['latency_p90_s']} s, "
              f"p99 {result['latency_p99_s']} s, max {result['latency_max_s']} s | service mean "
              f"{result['service_mean_s']} s | {result['throughput_per_s']} req/s | order violations "
              f"{result['order_violations']}, out-of-order finishes {result['out_of_order_finishes']} | "
              f"server alive {server_alive} | load {result['loadavg_start']} -> {result['loadavg_end']}")
    finally:
        server.stop()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder kept: {workdir}", file=sys.stderr)
    JsonLines(a.json).emit(result)
    good = (result.get("ok") == a.n and result.get("server_alive") and result.get("order_violations") == 0)
    return 0 if good else 1
