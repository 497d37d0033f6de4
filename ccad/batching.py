"""Batch concurrent inspection requests into one forward pass (a server's queue, batched).

On a 2-core CPU a small model's batch-1 forward is overhead-bound: the bundled demo (CCAD(V)
tiny, 5 DDAD steps, bank fusion) costs far less per image at batch 8 than at batch 1 (see
``python -m benchmarks speed --model checkpoints/demo``). A server that handles one session at a
time runs every request at batch 1. :class:`PredictionBatcher` lets several sessions' requests
run together: each caller (one thread per request, e.g. Gradio's workers with a concurrency
limit above 1) calls :meth:`PredictionBatcher.predict_many`; one worker thread takes whatever
requests are waiting (up to ``max_batch`` images, after waiting at most ``max_wait_s`` for more to
arrive) and runs them through ``detector.predict_many`` as one batched call; each caller decodes
its own files in its own thread first (in parallel with the model) and gets back its own
predictions and errors, in its own order.

Predictions are the ones each request would get alone: no method's prediction depends on the
batch (the stochastic samplers draw each image's noise from its own generator, seeded alike;
``tests/test_batch_invariance.py`` checks every registered method). One detector call runs at a
time, so the detector needs no locking of its own.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Optional

__all__ = ["PredictionBatcher"]

ProgressFn = Optional[Callable[[int, int], None]]


class _Request:
    def __init__(self, images: list[Any], paths: list[Optional[str]], reads: list[float]) -> None:
        self.images, self.paths, self.reads = images, paths, reads
        self.future: Future = Future()


class PredictionBatcher:
    """Run concurrent ``predict_many`` requests on one detector as shared batches.

    Args:
        detector: an :class:`ccad.AnomalyDetector` (anything with ``predict_many``).
        max_batch: at most this many images per detector call (a larger request runs alone, in
            batches of ``max_batch``).
        max_wait_s: how long the worker waits for more requests once the first is there (0: take
            only what is already waiting; the wait costs at most this per batch).
    """

    def __init__(self, detector: Any, max_batch: int = 8, max_wait_s: float = 0.02) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.detector = detector
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self._pending: list[_Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self.calls = 0  # detector calls made (for tests and benchmarks)
        self._worker = threading.Thread(target=self._run, name="ccad-batcher", daemon=True)
        self._worker.start()

    # ---- callers ---------------------------------------------------------------------------------
    def predict_many(self, items: Iterable[Any], batch_size: Optional[int] = None, on_error: str = "skip",
                     progress: ProgressFn = None) -> tuple[list[Any], list[tuple[str, str]]]:
        """As :meth:`ccad.AnomalyDetector.predict_many` for this caller's ``items``: decoded here,
        in the caller's thread (errors named as there; ``on_error="raise"`` raises the first),
        then run with other callers' images. ``batch_size`` is ignored (the batcher decides);
        ``progress`` is called when this caller's images are decoded and when they are done."""
        from .data.coerce import decode_item

        items = list(items)
        errors: list[tuple[str, str]] = []
        decoded = [got for j, item in enumerate(items) if (got := decode_item(item, j, on_error, errors)) is not None]
        images: list[Any] = [d[0] for d in decoded]
        reads: list[float] = [d[1] for d in decoded]
        paths: list[Optional[str]] = [d[2] for d in decoded]
        if not images:
            return [], errors
        req = _Request(images, paths, reads)
        with self._cv:
            if self._closed:
                raise RuntimeError("the PredictionBatcher is closed")
            self._pending.append(req)
            self._cv.notify_all()
        preds = req.future.result()
        if progress is not None:
            progress(len(items), len(items))
        return preds, errors

    def predict(self, image: Any) -> Any:
        """One image (raises :class:`ccad.data.io.ImageReadError` for an unreadable one)."""
        return self.predict_many([image], on_error="raise")[0][0]

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=60)

    def __enter__(self) -> "PredictionBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the worker ------------------------------------------------------------------------------
    def _take(self) -> list[_Request]:
        """Requests for the next call: the oldest first, then the next ones while they fit."""
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if not self._pending:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while sum(len(r.images) for r in self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            taken, n = [], 0
            while self._pending and (not taken or n + len(self._pending[0].images) <= self.max_batch):
                r = self._pending.pop(0)
                taken.append(r)
                n += len(r.images)
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                return
            try:
                images = [im for r in taken for im in r.images]
                self.calls += 1
                preds, errors = self.detector.predict_many(images, batch_size=self.max_batch, on_error="raise")
                k = 0
                for r in taken:
                    mine = preds[k:k + len(r.images)]
                    k += len(r.images)
                    for p, path, read in zip(mine, r.paths, r.reads):
                        p.path = path
                        p.seconds += read  # its own decode, done in the caller's thread
                    r.future.set_result(mine)
            except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
                for r in taken:
                    if not r.future.done():
                        r.future.set_exception(exc)
