"""Background jobs for the app: one long-running job (training) per server, shared by every tab.

The job lives in the server process, not in a browser session, so reloading the page or opening
a second tab shows the same job (the UI polls :meth:`JobManager.snapshot`). Only one job runs at
a time; a second :meth:`JobManager.start` raises :class:`JobBusy` whose message says which job
is running. A job's exception is caught and recorded (state ``failed``): it never reaches the
server. :meth:`JobManager.stop` only *requests* a stop; the job polls :meth:`JobHandle.should_stop`
(the training callbacks do) and ends cleanly, writing a resumable checkpoint.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
FINISHED = "finished"
FAILED = "failed"
ACTIVE_STATES = (RUNNING, STOPPING)


class JobBusy(RuntimeError):
    """Raised when a job is requested while another one is still running."""


@dataclass
class Job:
    """State of one background job; read it through :meth:`JobManager.snapshot`."""

    id: str
    kind: str
    params: dict[str, Any]
    state: str = RUNNING
    message: str = "starting"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    eta_seconds: float = float("nan")
    losses: list[tuple[int, float]] = field(default_factory=list)
    preview: Optional[np.ndarray] = None
    preview_step: int = -1
    error: str = ""
    result: Any = None
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None
    log: list[str] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started


class JobHandle:
    """What the job's target function sees: report progress and check for a stop request."""

    def __init__(self, manager: "JobManager", job: Job) -> None:
        self._manager = manager
        self._job = job
        self._stop = threading.Event()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def update(self, **fields: Any) -> None:
        """Set progress fields (step, total_steps, epoch, loss, lr, eta_seconds, message, preview,
        losses: the whole curve, e.g. the history a resumed run continues); a finite ``loss`` adds
        the point ``(step, loss)`` to the curve unless it has one for that step."""
        with self._manager._lock:
            job = self._job
            for key, value in fields.items():
                if not hasattr(job, key):
                    raise AttributeError(f"Job has no field {key!r}")
                setattr(job, key, value)
            if "loss" in fields and fields["loss"] is not None and np.isfinite(float(fields["loss"])):
                if not job.losses or job.losses[-1][0] != int(job.step):  # one point per step
                    job.losses.append((int(job.step), float(fields["loss"])))
            if fields.get("preview") is not None:
                job.preview_step = int(job.step)

    def log(self, line: str) -> None:
        with self._manager._lock:
            self._job.log.append(f"[{time.strftime('%H:%M:%S')}] {line}")
            self._job.log[:] = self._job.log[-200:]


class JobManager:
    """Runs at most one background job at a time in a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._job: Optional[Job] = None
        self._handle: Optional[JobHandle] = None
        self._thread: Optional[threading.Thread] = None
        self._counter = 0

    def busy(self) -> bool:
        with self._lock:
            return self._job is not None and self._job.state in ACTIVE_STATES

    def start(self, kind: str, target: Callable[[JobHandle], Any], params: Optional[dict[str, Any]] = None,
              on_done: Optional[Callable[[Job], None]] = None) -> Job:
        """Start ``target(handle)`` in a background thread; its return value becomes ``job.result``.

        Raises :class:`JobBusy` when another job is running. ``on_done(job)`` runs in the job's
        thread after the target returned (state finished or stopped); its errors fail the job too.
        """
        with self._lock:
            if self.busy():
                cur = self._job
                assert cur is not None
                raise JobBusy(f"a {cur.kind} job is already running on this server (job {cur.id}, "
                              f"step {cur.step}/{cur.total_steps}); only one job at a time - stop it or wait")
            self._counter += 1
            job = Job(id=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{self._counter}", kind=kind,
                      params=dict(params or {}))
            handle = JobHandle(self, job)
            self._job, self._handle = job, handle
            thread = threading.Thread(target=self._run, args=(job, handle, target, on_done),
                                      name=f"ccad-job-{job.id}", daemon=True)
            self._thread = thread
            thread.start()
            return job

    def _run(self, job: Job, handle: JobHandle, target: Callable[[JobHandle], Any],
             on_done: Optional[Callable[[Job], None]]) -> None:
        try:
            result = target(handle)
            with self._lock:
                job.result = result
                job.state = STOPPED if handle.should_stop() else FINISHED
                job.message = ("stopped; a resumable checkpoint was saved" if job.state == STOPPED
                               else "finished")
            if on_done is not None:
                on_done(job)
        except BaseException as exc:  # never let a job take the server down
            with self._lock:
                job.state = FAILED
                job.error = f"{type(exc).__name__}: {exc}"
                job.message = f"failed: {job.error}"
                job.log.append(traceback.format_exc(limit=8))
        finally:
            with self._lock:
                job.finished = time.time()

    def stop(self) -> bool:
        """Ask the running job to stop; returns False when no job is running."""
        with self._lock:
            if not self.busy() or self._handle is None or self._job is None:
                return False
            self._handle._stop.set()
            self._job.state = STOPPING
            self._job.message = "stopping: finishing the current step and saving a checkpoint"
            return True

    def current(self) -> Optional[Job]:
        with self._lock:
            return self._job

    def snapshot(self) -> Optional[dict[str, Any]]:
        """A consistent copy of the current (or last) job's state, or None if there never was one."""
        with self._lock:
            job = self._job
            if job is None:
                return None
            return {
                "id": job.id, "kind": job.kind, "state": job.state, "message": job.message,
                "step": job.step, "total_steps": job.total_steps, "epoch": job.epoch, "loss": job.loss,
                "lr": job.lr, "eta_seconds": job.eta_seconds, "losses": list(job.losses),
                "preview": job.preview, "preview_step": job.preview_step, "error": job.error,
                "elapsed": job.elapsed, "params": dict(job.params), "log": list(job.log[-20:]),
                "has_result": job.result is not None,
            }

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the job thread (tests and shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
