"""``ccad serve`` over real HTTP on 127.0.0.1 (uvicorn in a thread, or the CLI in a subprocess).

A real tiny PatchCore detector (``fit_detector`` on generated 64-px textures) answers every test
but the queue test, whose model blocks on an Event so that the queue fills deterministically.
What a line integrator relies on: the HTTP scores are the detector's own for the same files, the
results come back in the parts' order and to the right client, a missing key is 401, an
unreadable part is 422 naming it (never a 500), an oversized body is 413, a full queue is 503 with
Retry-After, and the server keeps answering afterwards.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from ccad.data.synthetic import write_dataset
from ccad.pipeline import fit_detector
from ccad.prediction import Prediction
from ccad.serve import (API_KEY_ENV, ExportModel, ServerThread, ServeSettings, TorchModel, create_app, free_port,
                        load_served)

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret-key"
HEAD = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(detector, saved model folder, test image files: good ones then defective ones)."""
    root = write_dataset(tmp_path_factory.mktemp("data"), kinds=("fibrous",), n_train=6, n_test_good=3,
                         n_test_defect=2, size=64, seed=3, defects=("spot",))
    det = fit_detector(root / "fibrous", image_size=64, bank_size=8, calibration_fraction=0.25, device="cpu")
    model_dir = tmp_path_factory.mktemp("model")
    det.save_pretrained(model_dir)
    images = sorted((root / "fibrous" / "test" / "good").glob("*.png")) + \
        sorted((root / "fibrous" / "test" / "spot").glob("*.png"))
    return det, model_dir, images


@pytest.fixture(scope="module")
def server(tiny):
    det = tiny[0]
    app = create_app(TorchModel(det, "tiny"), ServeSettings(api_key=KEY, max_body=200_000, max_images=8))
    with ServerThread(app) as srv:
        yield srv


def _own(det, path):
    return det.predict(str(path))


def test_one_image_as_the_raw_body_gets_the_detectors_own_result(tiny, server):
    det, _, images = tiny
    r = httpx.post(server.url + "/predict", params={"name": "part-7"}, content=images[-1].read_bytes(),
                   headers={**HEAD, "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    want = _own(det, images[-1])
    assert res["name"] == "part-7" and res["verdict"] == want.verdict
    assert res["score"] == pytest.approx(want.score, rel=1e-5, abs=1e-6)
    assert res["threshold"] == pytest.approx(det.threshold) and res["out_of_domain"] == want.out_of_domain
    assert (res["width"], res["height"]) == (64, 64) and "heatmap_png" not in res
    assert r.json()["model"] == "tiny"


def test_several_images_multipart_in_order_with_heatmap_and_overlay(tiny, server):
    det, _, images = tiny
    chosen = [images[0], images[-1], images[1]]
    files = [("files", (f"{i}_{p.name}", p.read_bytes(), "image/png")) for i, p in enumerate(chosen)]
    r = httpx.post(server.url + "/predict?heatmap=1&overlay=true", files=files, headers=HEAD, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == [f"{i}_{p.name}" for i, p in enumerate(chosen)]
    for x, p in zip(results, chosen):
        want = _own(det, p)
        assert x["score"] == pytest.approx(want.score, rel=1e-5, abs=1e-6) and x["verdict"] == want.verdict
        for kind in ("heatmap_png", "overlay_png"):
            png = cv2.imdecode(np.frombuffer(base64.b64decode(x[kind]), np.uint8), cv2.IMREAD_COLOR)
            assert png is not None and png.shape == (64, 64, 3)
    # the defective image scores above the good ones (the model does its job through the API)
    assert results[1]["score"] > max(results[0]["score"], results[2]["score"])


def test_a_16_bit_grey_upload_is_read_as_ccad_predict_reads_the_file(tiny, server, tmp_path):
    det, _, images = tiny
    grey = (cv2.imread(str(images[-1]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)
    path = tmp_path / "grey16.png"
    cv2.imwrite(str(path), grey)
    r = httpx.post(server.url + "/predict", files=[("image", ("grey16.png", path.read_bytes()))], headers=HEAD,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["score"] == pytest.approx(_own(det, path).score, rel=1e-5, abs=1e-6)


def test_the_api_key_is_required_for_predict_and_model_not_for_health(tiny, server):
    det, _, images = tiny
    body = images[0].read_bytes()
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/predict", content=body, headers=headers, timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["detail"], (headers, r.text)
    assert httpx.get(server.url + "/model", timeout=30).status_code == 401
    ok = httpx.post(server.url + "/predict", content=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200
    health = httpx.get(server.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = httpx.get(server.url + "/model", headers=HEAD, timeout=30).json()
    assert info["name"] == "tiny" and info["kind"] == "torch" and info["method"] == "patchcore"
    assert info["threshold"] == pytest.approx(det.threshold) and info["card"]["variant"] == "patchcore"
    assert info["serving"]["api_key"] is True


def test_an_unreadable_part_is_422_naming_it_and_the_server_goes_on(tiny, server):
    _, _, images = tiny
    truncated = images[0].read_bytes()[:200]
    files = [("files", ("fine.png", images[0].read_bytes())), ("files", ("notes.png", b"not an image at all")),
             ("files", ("cut.png", truncated))]
    r = httpx.post(server.url + "/predict", files=files, headers=HEAD, timeout=60)
    assert r.status_code == 422, r.text
    body = r.json()
    assert "files[1] 'notes.png'" in body["detail"] and "files[2] 'cut.png'" in body["detail"]
    assert [e["part"] for e in body["errors"]] == ["files[1] 'notes.png'", "files[2] 'cut.png'"]
    assert "Traceback" not in r.text
    # a text field where an image was expected, an empty body, a malformed multipart body
    r = httpx.post(server.url + "/predict", data={"comment": "hello"}, files=[("f", ("a.png", images[0].read_bytes()))],
                   headers=HEAD, timeout=60)
    assert r.status_code == 422 and "comment[0]" in r.json()["detail"]
    r = httpx.post(server.url + "/predict", content=b"", headers=HEAD, timeout=60)
    assert r.status_code == 422 and "no image" in r.json()["detail"]
    r = httpx.post(server.url + "/predict", content=b"--x\r\ngarbage", timeout=60,
                   headers={**HEAD, "Content-Type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 422, r.text
    assert httpx.post(server.url + "/predict", content=images[0].read_bytes(), headers=HEAD,
                      timeout=60).status_code == 200


def test_a_body_over_the_limit_is_413_with_or_without_content_length(server):
    big = os.urandom(300_000)  # the server's limit is 200 000 bytes
    r = httpx.post(server.url + "/predict", content=big, headers=HEAD, timeout=60)
    assert r.status_code == 413 and "200000" in r.json()["detail"]

    def chunks():  # chunked transfer: no Content-Length, the server counts while reading
        for i in range(0, len(big), 50_000):
            yield big[i:i + 50_000]

    r = httpx.post(server.url + "/predict", content=chunks(), headers=HEAD, timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_too_many_images_in_one_request_is_413(tiny, server):
    _, _, images = tiny
    files = [("files", (f"{i}.png", images[0].read_bytes())) for i in range(9)]  # the limit is 8
    r = httpx.post(server.url + "/predict", files=files, headers=HEAD, timeout=60)
    assert r.status_code == 413 and "8" in r.json()["detail"], r.text


class _BlockingModel:
    """Answers only once ``release`` is set (the queue test's model: the queue fills deterministically)."""

    name, kind = "blocking", "torch"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def predict_many(self, items, batch_size=8, on_error="raise"):
        self.calls += 1
        assert self.release.wait(60), "the test never released the model"
        return [Prediction(image=im, reconstruction=None, anomaly_map=np.zeros(im.shape[:2], np.float32), score=0.25,
                           threshold=0.5, seconds=0.0) for im in items], []

    def info(self):
        return {"name": self.name, "kind": self.kind, "method": "stub", "threshold": 0.5, "image_size": 64,
                "card": {}}


def _poll(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("condition not reached before the deadline")


@pytest.mark.parametrize("batch", [False, True])
def test_a_full_queue_answers_503_with_retry_after_at_once(tiny, batch):
    _, _, images = tiny
    model = _BlockingModel()
    app = create_app(model, ServeSettings(max_queue=2, batch=batch, max_wait_s=0.0))
    body = images[0].read_bytes()
    with ServerThread(app) as srv:
        answers: list[int] = []
        threads = [threading.Thread(target=lambda: answers.append(
            httpx.post(srv.url + "/predict", content=body, timeout=60).status_code)) for _ in range(2)]
        for t in threads:
            t.start()
        _poll(lambda: httpx.get(srv.url + "/health", timeout=10).json()["queue"]["admitted"] == 2)
        busy = httpx.post(srv.url + "/predict", content=body, timeout=10)
        assert busy.status_code == 503 and "retry" in busy.json()["detail"]
        assert int(busy.headers["Retry-After"]) >= 1
        assert httpx.get(srv.url + "/health", timeout=10).json()["refused_busy"] == 1
        model.release.set()
        for t in threads:
            t.join(60)
        assert answers == [200, 200]
        # the queue drained: admitted again
        _poll(lambda: httpx.get(srv.url + "/health", timeout=10).json()["queue"]["admitted"] == 0)
        assert httpx.post(srv.url + "/predict", content=body, timeout=60).status_code == 200


@pytest.mark.parametrize("batch", [False, True])
def test_concurrent_clients_each_get_their_own_answer(tiny, batch):
    det, _, images = tiny
    want = [_own(det, p) for p in images]
    app = create_app(TorchModel(det, "tiny"), ServeSettings(max_queue=16, batch=batch, max_batch=4))
    n = 10
    got: dict[int, dict] = {}
    errors: list[str] = []
    with ServerThread(app) as srv:
        barrier = threading.Barrier(n)

        def client(i: int) -> None:
            p = images[i % len(images)]
            barrier.wait(30)
            try:
                r = httpx.post(srv.url + "/predict", params={"name": f"{i}:{p.name}"}, content=p.read_bytes(),
                               timeout=120)
                if r.status_code != 200:
                    errors.append(f"{i}: {r.status_code} {r.text}")
                else:
                    got[i] = r.json()["results"][0]
            except httpx.HTTPError as exc:  # pragma: no cover - reported below
                errors.append(f"{i}: {exc!r}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors and sorted(got) == list(range(n))  # none lost, none refused
        for i, res in got.items():
            assert res["name"] == f"{i}:{images[i % len(images)].name}"
            assert res["score"] == pytest.approx(want[i % len(images)].score, rel=1e-5, abs=1e-6)
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["served"] == n and health["queue"]["admitted"] == 0


def test_docs_and_openapi_describe_predict(server):
    assert httpx.get(server.url + "/docs", timeout=30).status_code == 200
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/png" in body


def test_an_export_folder_without_the_runtime_is_refused_by_name(tmp_path, monkeypatch):
    from ccad.errors import CheckpointError

    (tmp_path / "verdict.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "ccad.runtime", None)  # as on a branch without ccad.runtime
    with pytest.raises(CheckpointError, match=r"export folder \(verdict\.json\).*ccad\.runtime"):
        load_served(str(tmp_path))


def test_an_export_folder_is_served_through_the_runtime(tiny, tmp_path, monkeypatch):
    """The export adapter is chosen by verdict.json and runs the real ``ccad.runtime`` (onnxruntime)
    over a real ``ccad export`` of the same detector: the same score and verdict over HTTP; the
    runtime's threading comes from the environment and ``/model`` says which it is."""
    from ccad.export import export_detector
    from ccad.runtime import SPINNING_ENV, THREADS_ENV

    det, _, images = tiny
    folder = export_detector(det, tmp_path / "export")
    monkeypatch.setenv(THREADS_ENV, "1")
    monkeypatch.delenv(SPINNING_ENV, raising=False)
    model = load_served(str(folder))
    assert isinstance(model, ExportModel)
    with ServerThread(create_app(model)) as srv:
        r = httpx.post(srv.url + "/predict?overlay=1", content=images[-1].read_bytes(), timeout=60)
        assert r.status_code == 200
        (res,) = r.json()["results"]
        want = _own(det, images[-1])
        assert res["score"] == pytest.approx(want.score, rel=1e-4) and res["verdict"] == want.verdict
        assert res["out_of_domain"] == want.out_of_domain
        png = cv2.imdecode(np.frombuffer(base64.b64decode(res["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
        assert png.shape == (64, 64, 3)
        info = httpx.get(srv.url + "/model", timeout=30).json()
        assert info["kind"] == "export" and info["method"] == "patchcore"
        assert info["runtime"] == {"threads": 1, "spinning": False}


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="max_queue"):
        ServeSettings(max_queue=0)
    with pytest.raises(ValueError, match="API key is empty"):
        ServeSettings(api_key="  ")


def test_the_cli_serves_a_saved_model_with_the_key_from_the_environment(tiny):
    det, model_dir, images = tiny
    port = free_port()
    env = {**os.environ, API_KEY_ENV: KEY, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ccad.cli", "serve", str(model_dir), "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"ccad serve exited {proc.returncode}: {proc.stdout.read()}")
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _poll(up, timeout=180)
        assert httpx.post(url + "/predict", content=images[0].read_bytes(), timeout=60).status_code == 401
        r = httpx.post(url + "/predict", files=[("files", (p.name, p.read_bytes())) for p in images[:2]],
                       headers=HEAD, timeout=60)
        assert r.status_code == 200
        for res, p in zip(r.json()["results"], images[:2]):
            assert res["score"] == pytest.approx(_own(det, p).score, rel=1e-5, abs=1e-6)
        assert httpx.get(url + "/model", headers=HEAD, timeout=30).json()["name"] == model_dir.name
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
