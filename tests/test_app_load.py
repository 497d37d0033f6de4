"""The app under load: 20 concurrent sessions inspect at once through Gradio's HTTP API
(``gradio_client``, localhost only) and are all served, in queue order, with the server alive after.

The app is the real one (``app.main.build_app``, its ``demo.queue`` settings and the ``inspect``
endpoint) around a tiny real PatchCore detector fitted here on generated textures. Only what
Gradio's queue guarantees is asserted, never timings: with the inspect group's concurrency limit
of 1, requests start in the order they entered the queue (FIFO per concurrency group) and never
overlap. To make the queue order known, each client submits only after the previous one's join
was acknowledged (it has a server event id); to make all of them wait in the queue at once, the
first inspection is held until every request has been submitted.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("gradio_client")

N = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from browser_util import serve

    from app.controller import AppController
    from app.main import INSPECT_CONCURRENCY, build_app
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import fit_detector

    assert INSPECT_CONCURRENCY == 1, "the order assertions below assume the app's default inspect concurrency"
    root = tmp_path_factory.mktemp("data")
    ds = write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=3, n_test_defect=3, size=64,
                       seed=4, defects=("spot",))
    det = fit_detector(str(ds / "fibrous"), bank_size=20, image_size=64, calibration_fraction=0.25)
    ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None, demo_dir=None)
    name = "tiny (patchcore)"
    ctl.registry.add(name, det, "built by the test")

    # record, on the server side, when each inspection runs (and hold the first one, see the docstring)
    calls: list[tuple[str, str]] = []  # ("start" | "end", image name)
    active = {"now": 0, "max": 0}
    lock = threading.Lock()
    release = threading.Event()
    original = ctl.inspect

    def recording_inspect(model: Any, files: Any, *args: Any, **kwargs: Any) -> Any:
        names = [Path(str(getattr(f, "name", f))).name for f in files or []]
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
            calls.append(("start", ",".join(names)))
        try:
            release.wait(120)
            return original(model, files, *args, **kwargs)
        finally:
            with lock:
                active["now"] -= 1
                calls.append(("end", ",".join(names)))

    ctl.inspect = recording_inspect  # type: ignore[method-assign]
    images = []
    src = sorted((ds / "fibrous" / "test").rglob("*.png"))
    for i in range(N + 1):  # distinct names, so each result can be matched to its request
        p = root / "requests" / f"req_{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(src[i % len(src)].read_bytes())
        images.append(p)
    demo = build_app(ctl)
    with serve(demo) as url:
        yield {"url": url, "name": name, "threshold": ctl.threshold_range(name)["value"], "images": images,
               "calls": calls, "active": active, "release": release}


def _status_and_file(result: Any) -> tuple[list[str], list[str]]:
    texts = [x for x in result if isinstance(x, str)]
    return [t for t in texts if t.startswith("Inspected")], texts


def test_twenty_concurrent_sessions_all_served_in_queue_order(served: dict[str, Any]) -> None:
    from gradio_client import Client, handle_file

    url, images = served["url"], served["images"][:N]
    clients = [Client(url, verbose=False, download_files=False) for _ in range(N)]  # 20 sessions
    assert len({c.session_hash for c in clients}) == N
    jobs = []
    for c, img in zip(clients, images):
        job = c.submit(served["name"], [handle_file(str(img))], served["threshold"], "", api_name="/inspect")
        deadline = time.time() + 600  # a generous deadline: the suite must pass on a loaded machine
        while getattr(job.communicator, "event_id", None) is None and not job.done():
            assert time.time() < deadline, f"{img.name}: the server never acknowledged the join"
            time.sleep(0.01)
        jobs.append(job)
    served["release"].set()  # all 20 are now in the queue (19 of them waiting behind the held first)

    # raises on an app or queue error; 20 inspections run one after another, so the last waits for all:
    # a deadline for a stuck queue, not a speed bar (it failed at 120 s on two cores kept busy)
    results = [job.result(timeout=900) for job in jobs]
    for img, res in zip(images, results):
        status, texts = _status_and_file(res)
        assert status and status[0].startswith("Inspected 1 image"), (img.name, texts)
        assert img.name in texts, f"{img.name}: result mixed up with another request: {texts}"

    calls, active = served["calls"], served["active"]
    started = [n for kind, n in calls if kind == "start"]
    assert started == [p.name for p in images], "inspections did not start in queue order"
    assert active["max"] == 1, "two inspections ran at once despite the concurrency limit of 1"
    # never overlapping: every start directly follows the previous request's end
    assert [k for k, _ in calls] == ["start", "end"] * N
    assert [n for _, n in calls[::2]] == [n for _, n in calls[1::2]]

    # the server still answers: its config, and one more inspection through a fresh session
    assert httpx.get(url + "config", timeout=30).status_code == 200
    last = served["images"][N]
    res = Client(url, verbose=False, download_files=False).predict(
        served["name"], [handle_file(str(last))], served["threshold"], "", api_name="/inspect")
    status, texts = _status_and_file(res)
    assert status and last.name in texts
