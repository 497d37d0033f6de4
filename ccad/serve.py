"""``ccad serve``: an HTTP JSON API over a saved detector or an export folder, for line software.

    ccad serve MODEL|EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY | $CCAD_API_KEY]
               [--max-queue 16] [--max-body-mb 32] [--batch --max-batch 8 --max-wait-ms 10]

Endpoints (OpenAPI docs at ``/docs``, the schema at ``/openapi.json``):

- ``POST /predict``: one or several images, as ``multipart/form-data`` (every file part is one image,
  named by its file name) or as the raw request body (``Content-Type: image/png`` etc.; named by
  ``?name=``). Answers ``{"model", "results": [{name, score, verdict, threshold, out_of_domain,
  domain_distance, domain_limit, error, width, height, seconds}], "seconds"}``, the results in the
  order of the parts; ``?heatmap=1`` / ``?overlay=1`` add the heatmap / overlay PNG (base64) to each.
  Images are decoded by :func:`ccad.data.io.load_image`, the reader ``ccad predict`` uses (so the
  same file gives the same score over HTTP as on the command line).
- ``GET /health``: liveness and the queue (``admitted`` / ``limit``); never needs the key.
- ``GET /model``: name, kind (torch / export), method, threshold, image size and the model card.

What the server guarantees:

- **Bounded queue.** At most ``max_queue`` requests are admitted at once (waiting or running);
  past it a request gets ``503`` with ``Retry-After`` (the seconds the admitted ones are expected to
  take, from the measured service time), at once, before its body is read: never an unbounded
  backlog.
- **Body limit.** A body over ``max_body`` bytes is ``413`` (by ``Content-Length`` before reading,
  and counted while reading for a chunked body); at most ``max_images`` images per request (``413``).
- **API key** (optional; ``--api-key`` or the ``CCAD_API_KEY`` environment variable): ``/predict``
  and ``/model`` need ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``, compared in constant time
  (:func:`hmac.compare_digest`); without it ``401``.
- **Bad input is a 4xx naming the part.** An unreadable image, a text field where a file was
  expected or a malformed multipart body is ``422`` with ``detail`` naming the part (``files[1]
  'bad.png': ...``) and ``errors`` listing every bad part; no request ever answers a traceback (an
  unexpected failure is a ``500`` with the exception's one-line message; the traceback goes to the
  server's log).
- **Inference off the event loop.** Decoding, the model and PNG encoding run in a thread pool
  (``max_queue`` threads: one per admitted request); the model itself runs ``workers`` calls at a
  time (a semaphore; default 1: on a CPU one call already uses every core) or, with ``batch``,
  through :class:`ccad.batching.PredictionBatcher`, which runs the images of concurrent requests
  as one batch (``max_batch`` images, waiting at most ``max_wait_s`` for more). Measured by
  ``python -m benchmarks serve`` (benchmarks/results/serve-cpu.jsonl): see the README's "Serve".

The model source is either a saved model folder (or Hub id) loaded by
:meth:`ccad.AnomalyDetector.from_pretrained`, or an export folder (it holds ``verdict.json``), run by
``ccad.runtime`` (imported only then). Both sit behind one small protocol (:class:`ServedModel`):
``predict_many(images) -> (predictions, errors)`` with ``.score``, ``.threshold``, ``.verdict``,
``.out_of_domain``, ``.anomaly_map`` on each prediction, plus :meth:`ServedModel.info`.

Imports of FastAPI, uvicorn and torch happen inside the functions that need them, so ``ccad --help``
stays fast.
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime

import argparse
import base64
import hmac
import importlib
import io
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

__all__ = ["ServeSettings", "ServedModel", "TorchModel", "ExportModel", "load_served", "Gate", "BadImage",
           "decode_image_bytes", "create_app", "ServerThread", "add_command", "API_KEY_ENV"]

API_KEY_ENV = "CCAD_API_KEY"
EXPORT_MARKER = "verdict.json"  # an export folder holds this file (ccad.export / ccad.runtime)
log = logging.getLogger("ccad.serve")


# ---- the model behind the server --------------------------------------------------------------

class ServedModel(Protocol):
    """What the server needs of a model: the torch detector and the export runtime both offer it."""

    name: str
    kind: str  # "torch" or "export"

    def predict_many(self, items: Sequence[Any], batch_size: int = 8, on_error: str = "raise"
                     ) -> tuple[list[Any], list[tuple[str, str]]]:
        """Predictions (``.score``, ``.threshold``, ``.verdict``, ``.out_of_domain``, ``.anomaly_map``,
        ``.heatmap()``, ``.overlay()``) for decoded images (float32 ``H x W x 3`` in [0, 1]), in order."""
        ...

    def info(self) -> dict[str, Any]:
        """name, kind, method, threshold, image_size, card."""
        ...


class TorchModel:
    """A :class:`ccad.AnomalyDetector` (a saved model folder or a Hub id) behind :class:`ServedModel`."""

    kind = "torch"

    def __init__(self, detector: Any, name: str = "model") -> None:
        self.detector, self.name = detector, name

    @classmethod
    def load(cls, source: str, revision: Optional[str] = None) -> "TorchModel":
        from .detector import AnomalyDetector

        det = AnomalyDetector.from_pretrained(source, revision=revision)
        return cls(det, Path(str(source).rstrip("/")).name or str(source))

    def predict_many(self, items: Sequence[Any], batch_size: int = 8, on_error: str = "raise"
                     ) -> tuple[list[Any], list[tuple[str, str]]]:
        return self.detector.predict_many(items, batch_size=batch_size, on_error=on_error)

    def info(self) -> dict[str, Any]:
        det = self.detector
        return {"name": self.name, "kind": self.kind, "method": det.variant, "threshold": det.threshold,
                "image_size": det.image_size, "resize": det.config.resize, "card": det.card()}


class ExportModel:
    """An export folder (``verdict.json`` + the ONNX/OpenVINO graph) run by ``ccad.runtime``
    (``load(DIR).predict(image)``), imported only here: a server without torch can serve it."""

    kind = "export"

    def __init__(self, runtime_model: Any, folder: Path) -> None:
        self.runtime, self.folder, self.name = runtime_model, folder, folder.name

    @classmethod
    def load(cls, folder: str | Path) -> "ExportModel":
        from .errors import CheckpointError

        folder = Path(folder)
        try:  # by name: the runtime (issue 22 item 1) is optional here, and imported only for an export folder
            runtime = importlib.import_module("ccad.runtime")
        except ImportError as exc:
            raise CheckpointError(f"{folder} is an export folder ({EXPORT_MARKER}) but ccad.runtime cannot be "
                               f"imported ({exc}); serve the saved torch model folder instead, or install a ccad "
                               f"with the runtime (ccad export / ccad.runtime, issue 22)") from None
        return cls(runtime.load(folder), folder)

    def predict_many(self, items: Sequence[Any], batch_size: int = 8, on_error: str = "raise"
                     ) -> tuple[list[Any], list[tuple[str, str]]]:
        items = list(items)
        many = getattr(self.runtime, "predict_many", None)
        if many is not None:
            got = many(items, batch_size=batch_size)
            preds, errors = got if isinstance(got, tuple) else (list(got), [])
        else:
            preds, errors = [self.runtime.predict(im) for im in items], []
        return [_as_prediction(p, im) for p, im in zip(preds, items)], errors

    def info(self) -> dict[str, Any]:
        import json

        verdict: dict[str, Any] = {}
        try:
            verdict = json.loads((self.folder / EXPORT_MARKER).read_text())
        except (OSError, ValueError):
            pass
        card = getattr(self.runtime, "card", None)
        card = card() if callable(card) else card
        if card is None:
            for name in ("card.json", "model_card.json"):
                try:
                    card = json.loads((self.folder / name).read_text())
                    break
                except (OSError, ValueError):
                    continue
        threshold = getattr(self.runtime, "threshold", verdict.get("threshold"))
        return {"name": self.name, "kind": self.kind,
                "method": getattr(self.runtime, "method", verdict.get("method", verdict.get("variant"))),
                "threshold": threshold, "image_size": getattr(self.runtime, "image_size", verdict.get("image_size")),
                "card": card if card is not None else verdict,
                # the backend's threading (ccad.runtime.thread_settings: threads, spinning)
                "runtime": getattr(self.runtime, "threading", None)}


def _as_prediction(p: Any, image: Any) -> Any:
    """A runtime's result as the server reads it: kept when it already has the
    :class:`ccad.prediction.Prediction` fields and renderers; else (a dict, or an object with ``map``
    for ``anomaly_map``) a Prediction built from its score, threshold, map and domain fields, so the
    verdict is :func:`ccad.scoring.verdict.status_of`'s, as for a torch model."""
    if all(hasattr(p, k) for k in ("score", "threshold", "verdict", "anomaly_map", "heatmap", "overlay")):
        return p
    from .prediction import Prediction

    def get(key: str, default: Any = None) -> Any:
        return p.get(key, default) if isinstance(p, dict) else getattr(p, key, default)

    import numpy as np

    amap = get("anomaly_map")
    amap = get("map") if amap is None else amap
    return Prediction(image=image, reconstruction=None, anomaly_map=np.asarray(amap, np.float32),
                      score=float(get("score")), threshold=float(get("threshold", float("nan"))),
                      seconds=float(get("seconds", 0.0) or 0.0), map_floor=float(get("map_floor", 0.0) or 0.0),
                      error=get("error"), domain_distance=get("domain_distance"), domain_limit=get("domain_limit"))


def load_served(source: str, revision: Optional[str] = None) -> ServedModel:
    """An export folder (it holds ``verdict.json``) -> :class:`ExportModel`; anything else (a saved
    model folder, a Hub id) -> :class:`TorchModel`."""
    if Path(source).is_dir() and (Path(source) / EXPORT_MARKER).is_file():
        return ExportModel.load(source)
    return TorchModel.load(source, revision)


# ---- images in -------------------------------------------------------------------------------

class BadImage(ValueError):
    """One part of a request that is not a readable image: ``part`` names it (``files[1] 'a.png'``)."""

    def __init__(self, part: str, reason: str) -> None:
        self.part, self.reason = part, reason
        super().__init__(f"{part}: {reason}")


_EXT_OF_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "DIB": ".bmp", "TIFF": ".tif",
                  "WEBP": ".webp", "PPM": ".ppm"}


def decode_image_bytes(data: bytes, part: str) -> Any:
    """An uploaded file -> float32 ``H x W x 3`` in [0, 1], read exactly as ``ccad predict`` reads a
    file (:func:`ccad.data.io.load_image`: EXIF orientation, 16-bit, alpha dropped, the pixel and
    side limits), from a temporary file named by the content's own format. Raises :class:`BadImage`
    naming ``part`` for anything that is not a supported, decodable image."""
    from PIL import Image

    from .data.io import ImageReadError, load_image

    if not data:
        raise BadImage(part, "empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = str(im.format or "")
    except Image.DecompressionBombError as exc:
        raise BadImage(part, f"image too large (possible decompression bomb): {exc}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for non-images
        raise BadImage(part, f"not an image Pillow can identify ({len(data)} bytes; supported: PNG, JPEG, BMP, "
                             f"TIFF, WebP, PNM)") from None
    ext = _EXT_OF_FORMAT.get(fmt)
    if ext is None:
        raise BadImage(part, f"unsupported image format {fmt or 'unknown'} (supported: PNG, JPEG, BMP, TIFF, "
                             f"WebP, PNM)")
    with tempfile.TemporaryDirectory(prefix="ccad-serve-") as tmp:
        path = Path(tmp) / f"upload{ext}"
        path.write_bytes(data)
        try:
            return load_image(path)
        except ImageReadError as exc:
            raise BadImage(part, exc.reason) from None


def _png_base64(rgb: Any) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 H x W x 3
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: those become None (a missing threshold is an uncalibrated model)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:  # numpy scalars
        return _finite(x.item())
    return x


# ---- admission -------------------------------------------------------------------------------

class Gate:
    """At most ``limit`` requests admitted at once; the rest are refused at once (never queued).

    :meth:`retry_after` estimates how long the admitted requests will take: the measured mean
    service time of a request (exponentially averaged) times the admitted count over ``parallel``."""

    def __init__(self, limit: int, parallel: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"max_queue must be >= 1, got {limit}")
        self.limit, self.parallel = int(limit), max(1, int(parallel))
        self.admitted = 0
        self.served = 0
        self.refused = 0
        self.mean_s: Optional[float] = None
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.admitted >= self.limit:
                self.refused += 1
                return False
            self.admitted += 1
            return True

    def leave(self, seconds: Optional[float] = None) -> None:
        with self._lock:
            self.admitted -= 1
            if seconds is not None:
                self.served += 1
                self.mean_s = seconds if self.mean_s is None else 0.8 * self.mean_s + 0.2 * seconds

    def retry_after(self) -> int:
        per = self.mean_s if self.mean_s is not None else 1.0
        return int(min(300, max(1, math.ceil(per * self.admitted / self.parallel))))


# ---- the application -------------------------------------------------------------------------

@dataclass
class ServeSettings:
    """The server's limits. ``max_queue``: requests admitted at once (waiting + running; past it
    503); ``max_body``: bytes per request body (413); ``max_images``: images per request (413);
    ``api_key``: None = open; ``workers``: model calls at once (without ``batch``); ``batch``: run
    concurrent requests' images as one batch through :class:`ccad.batching.PredictionBatcher`
    (``max_batch`` images, ``max_wait_s`` wait for more once one request is there)."""

    api_key: Optional[str] = None
    max_queue: int = 16
    max_body: int = 32 * 1024 * 1024
    max_images: int = 64
    workers: int = 1
    batch: bool = False
    max_batch: int = 8
    max_wait_s: float = 0.01

    def __post_init__(self) -> None:
        for field in ("max_queue", "max_body", "max_images", "workers", "max_batch"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"serve: {field} must be >= 1, got {getattr(self, field)}")
        if self.max_wait_s < 0:
            raise ValueError(f"serve: max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("serve: the API key is empty (give a non-empty key, or none for an open server)")


class _Engine:
    """Decode -> model -> results, run in the thread pool (never on the event loop)."""

    def __init__(self, model: ServedModel, settings: ServeSettings) -> None:
        self.model, self.settings = model, settings
        self.batcher = None
        if settings.batch:
            from .batching import PredictionBatcher

            self.batcher = PredictionBatcher(model, max_batch=settings.max_batch, max_wait_s=settings.max_wait_s)
        self._model_slots = threading.BoundedSemaphore(settings.workers)
        self._count_lock = threading.Lock()
        self.images = 0  # images sent to the model
        self.calls = 0  # model calls without the batcher (with it: batcher.calls)

    @property
    def model_calls(self) -> int:
        return self.batcher.calls if self.batcher is not None else self.calls

    def infer(self, images: list[Any]) -> list[Any]:
        with self._count_lock:
            self.images += len(images)
        if self.batcher is not None:
            return self.batcher.predict_many(images, on_error="raise")[0]
        with self._model_slots:
            self.calls += 1
            return self.model.predict_many(images, batch_size=self.settings.max_batch, on_error="raise")[0]

    def handle(self, parts: list[tuple[str, str, bytes]], heatmap: bool, overlay: bool) -> dict[str, Any]:
        """``parts``: (label naming the part, image name, bytes). Raises :class:`_BadParts`."""
        t0 = time.perf_counter()
        images, bad = [], []
        for label, _name, data in parts:
            try:
                images.append(decode_image_bytes(data, label))
            except BadImage as exc:
                bad.append(exc)
        if bad:
            raise _BadParts(bad)
        preds = self.infer(images)
        results = []
        for (_label, name, _data), im, p in zip(parts, images, preds):
            row = {"name": name, "score": float(p.score), "verdict": str(p.verdict),
                   "threshold": float(p.threshold), "out_of_domain": getattr(p, "out_of_domain", None),
                   "domain_distance": getattr(p, "domain_distance", None),
                   "domain_limit": getattr(p, "domain_limit", None), "error": getattr(p, "error", None),
                   "width": int(im.shape[1]), "height": int(im.shape[0]),
                   "seconds": getattr(p, "seconds", None)}
            if heatmap:
                row["heatmap_png"] = _png_base64(p.heatmap())
            if overlay:
                row["overlay_png"] = _png_base64(p.overlay())
            results.append(_finite(row))
        return {"model": self.model.name, "results": results, "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


class _BadParts(Exception):
    def __init__(self, bad: list[BadImage]) -> None:
        self.bad = bad
        super().__init__("; ".join(str(b) for b in bad))


_PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "description": "One or several images: multipart/form-data (each file part one image), or one image as "
                       "the raw body (Content-Type image/png, image/jpeg, ... or application/octet-stream).",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "401": {"description": "API key missing or wrong"},
        "413": {"description": "body over the size limit, or too many images"},
        "422": {"description": "a part is not a readable image (detail names the part)"},
        "503": {"description": "queue full: retry after Retry-After seconds"},
    },
}


def create_app(model: ServedModel, settings: Optional[ServeSettings] = None) -> Any:
    """The FastAPI application serving ``model`` under ``settings`` (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    from . import __version__

    settings = settings or ServeSettings()
    engine = _Engine(model, settings)
    gate = Gate(settings.max_queue, settings.max_batch if settings.batch else settings.workers)
    pool = ThreadPoolExecutor(max_workers=settings.max_queue, thread_name_prefix="ccad-serve")
    started = time.time()
    key = settings.api_key.encode() if settings.api_key else None

    @asynccontextmanager
    async def lifespan(_app: Any):
        yield
        engine.close()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ccad serve", version=__version__, lifespan=lifespan,
                  description="Visual anomaly inspection over HTTP: POST images to /predict; each gets a score, a "
                              "verdict at the model's calibrated threshold and an out-of-domain flag.")
    app.state.gate, app.state.engine, app.state.settings = gate, engine, settings

    def check_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key):
            raise HTTPException(401, "missing or wrong API key: send it as the X-API-Key header (or "
                                     "Authorization: Bearer KEY)", headers={"WWW-Authenticate": "Bearer"})

    def too_large(n: int) -> HTTPException:
        return HTTPException(413, f"request body is {n} bytes or more, over the limit of {settings.max_body} bytes")

    async def read_body(request: Request) -> bytes:
        buf, n = bytearray(), 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > settings.max_body:
                raise too_large(n)
            buf += chunk
        return bytes(buf)

    def bad_request(errors: list[dict[str, Any]]) -> JSONResponse:
        detail = "; ".join(f"{e['part']}: {e['error']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    async def parts_of(request: Request, body: bytes, name: Optional[str]
                       ) -> tuple[list[tuple[str, str, bytes]], list[dict[str, Any]]]:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            label = name or "body"
            return [(f"body '{label}'", label, body)], []

        async def once():
            yield body

        try:
            form = await MultiPartParser(request.headers, once(), max_files=settings.max_images,
                                         max_fields=settings.max_images, max_part_size=settings.max_body).parse()
        except MultiPartException as exc:
            if exc.message.startswith("Too many"):  # starlette: "Too many files. Maximum number of files is N."
                raise HTTPException(413, f"too many parts in one request (at most {settings.max_images} images): "
                                         f"{exc.message}") from None
            return [], [{"part": "body", "error": f"malformed multipart/form-data: {exc.message}"}]
        parts, errors, counts = [], [], {}
        try:
            for field, value in form.multi_items():
                j = counts[field] = counts.get(field, -1) + 1
                if isinstance(value, UploadFile):
                    fname = value.filename or f"{field}[{j}]"
                    parts.append((f"{field}[{j}] '{fname}'", fname, await value.read()))
                else:
                    errors.append({"part": f"{field}[{j}]", "error": "a text field, not a file: send each image "
                                                                     "as a file part"})
        finally:
            await form.close()
        return parts, errors

    @app.post("/predict", openapi_extra=_PREDICT_DOC, summary="inspect one or several images")
    async def predict(request: Request, heatmap: bool = False, overlay: bool = False,
                      name: Optional[str] = None) -> Any:
        """Score, verdict, threshold and out-of-domain flag per image (heatmap / overlay PNGs on request)."""
        check_key(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body:
            raise too_large(int(length))
        if not gate.try_enter():
            raise HTTPException(503, f"busy: {gate.limit} requests already queued; retry later",
                                headers={"Retry-After": str(gate.retry_after())})
        t0, ok = time.perf_counter(), False
        try:
            body = await read_body(request)
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
            parts, errors = await parts_of(request, body, name)
            if errors:
                return bad_request(errors)
            if not parts or (not multipart and not body):
                return bad_request([{"part": "body", "error": "no image in the request: send image files as "
                                                              "multipart/form-data parts or one image as the body"}])
            if len(parts) > settings.max_images:
                raise HTTPException(413, f"{len(parts)} images in one request, over the limit of "
                                         f"{settings.max_images}")
            try:
                out = await _run_in(pool, engine.handle, parts, heatmap, overlay)
            except _BadParts as exc:
                return bad_request([{"part": b.part, "error": b.reason} for b in exc.bad])
            ok = True
            return out
        finally:
            gate.leave(time.perf_counter() - t0 if ok else None)

    @app.get("/health", summary="liveness and queue state (no API key needed)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "kind": model.kind,
                "queue": {"admitted": gate.admitted, "limit": gate.limit},
                "served": gate.served, "refused_busy": gate.refused, "images": engine.images,
                "model_calls": engine.model_calls, "uptime_s": round(time.time() - started, 3)}

    @app.get("/model", summary="the model: name, kind, method, threshold, image size, card")
    async def model_info(request: Request) -> Any:
        check_key(request)
        info = await _run_in(pool, model.info)
        info["serving"] = {"batch": settings.batch, "max_batch": settings.max_batch if settings.batch else None,
                           "max_wait_s": settings.max_wait_s if settings.batch else None,
                           "workers": settings.workers, "max_queue": settings.max_queue,
                           "max_body": settings.max_body, "max_images": settings.max_images,
                           "api_key": key is not None}
        return JSONResponse(_finite(info))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: {exc}"})

    return app


async def _run_in(pool: Any, fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


# ---- running it --------------------------------------------------------------------------------

class ServerThread:
    """uvicorn serving ``app`` on ``host:port`` in a background thread (tests, notebooks):
    :meth:`start` returns once ``/health`` answers (or raises after ``timeout`` seconds)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        if port == 0:
            port = free_port(host)
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                   timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="ccad-serve-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        import httpx

        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped during start-up")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the server on {self.url} did not answer /health within {timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _warm_up(model: ServedModel) -> None:
    """One prediction on a grey image so the first request does not pay for lazy initialisation."""
    import numpy as np

    model.predict_many([np.full((64, 64, 3), 0.5, np.float32)], batch_size=1, on_error="raise")


def _run(a: argparse.Namespace) -> int:
    import sys

    import uvicorn

    key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    settings = ServeSettings(api_key=key, max_queue=a.max_queue, max_body=int(a.max_body_mb * 1024 * 1024),
                             max_images=a.max_images, workers=a.workers, batch=a.batch, max_batch=a.max_batch,
                             max_wait_s=a.max_wait_ms / 1000.0)
    model = load_served(a.model, a.revision)
    if not a.no_warmup:
        _warm_up(model)
    info = model.info()
    if a.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"warning: serving on {a.host} without an API key: anyone who can reach the port can use the "
              f"model (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    print(f"serving {info['name']} ({info['kind']}, {info.get('method')}, threshold {info.get('threshold')}) on "
          f"http://{a.host}:{a.port} (docs: /docs; batch {'on' if a.batch else 'off'}; "
          f"API key {'required' if key else 'off'})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, settings), host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=10)
    return 0


def add_command(sub: Any) -> None:
    """``ccad serve`` (added to ``ccad``'s subparsers by :func:`ccad.cli.build_parser`)."""
    defaults = ServeSettings()
    sp = sub.add_parser("serve", help="serve a model over HTTP (JSON API for line software)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="An HTTP JSON API over a saved model folder (or Hub id) or an export folder "
                                    "(with verdict.json): POST /predict, GET /health, GET /model, docs at /docs.")
    sp.add_argument("model", help="model folder, Hub repo id, or export folder (holds verdict.json)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sp.add_argument("--port", type=int, default=8000, help="port")
    sp.add_argument("--api-key", default=None,
                    help=f"require this key (X-API-Key header or Authorization: Bearer); default ${API_KEY_ENV}, "
                         "else none (an open server)")
    sp.add_argument("--max-queue", type=int, default=defaults.max_queue,
                    help="requests admitted at once (waiting + running); past it 503 with Retry-After")
    sp.add_argument("--max-body-mb", type=float, default=defaults.max_body / 1024 / 1024,
                    help="largest request body in MiB (413 above)")
    sp.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request (413 above)")
    sp.add_argument("--workers", type=int, default=defaults.workers,
                    help="model calls at once without --batch (1 on a CPU: one call already uses every core)")
    sp.add_argument("--batch", action="store_true",
                    help="micro-batching: run the images of concurrent requests as one batch (see README 'Serve' "
                         "for when it helps)")
    sp.add_argument("--max-batch", type=int, default=defaults.max_batch, help="with --batch: images per batch")
    sp.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_s * 1000,
                    help="with --batch: how long a batch waits for more requests once one is there")
    sp.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    sp.add_argument("--no-warmup", action="store_true", help="skip the warm-up prediction at start")
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level")
    sp.set_defaults(func=_run)
