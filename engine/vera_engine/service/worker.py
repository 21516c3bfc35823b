"""The job worker: one thread per device running queued jobs in submission (FIFO) order.

The actual work is an injected :class:`JobRunner`, so the queue, spool, cancellation and restart mechanics
do not depend on the model. A runner reports progress through :meth:`JobContext.progress` once per
denoising step and must stop (raising :class:`JobCancelled`) within one step of :meth:`JobContext.cancelled`
turning true.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from vera_engine.service import store as job_store
from vera_engine.service.limits import job_error
from vera_engine.service.spool import InputError, Spool, SpooledInputs
from vera_proto.vera.v1 import engine_pb2 as pb

log = logging.getLogger("vera_engine.service")


class JobCancelled(Exception):
    """Raised inside a runner to stop a job that was cancelled."""


@dataclass
class LiveState:
    """What the worker knows about the running job beyond the store: stage, steps, ETA, preview."""

    job_id: str
    stage: int = pb.STAGE_LOADING
    stage_detail: str = "starting"
    step: int = 0
    total_steps: int = 0
    progress: float = 0.0
    eta_seconds: float | None = None
    preview: pb.Preview | None = None
    preview_version: int = 0
    step_times: list[float] = field(default_factory=list)
    last_step_at: float = field(default_factory=time.monotonic)

    def stopped_at(self) -> tuple[int, int, float]:
        """(step, total steps, fraction): what the store keeps when the job ends, however it ends."""
        return (self.step, self.total_steps, self.progress)


class Events:
    """A version counter and condition that Watch streams wait on; bumped on every change of any job.

    Also counts, per job, the Watch streams that asked for previews: a job decodes previews only while someone
    looks at them.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.version = 0
        self._preview_watchers: dict[str, int] = {}

    @contextlib.contextmanager
    def watching_previews(self, job_id: str) -> Iterator[None]:
        """Count a Watch stream that wants ``job_id``'s previews for as long as the block runs."""
        with self._cond:
            self._preview_watchers[job_id] = self._preview_watchers.get(job_id, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._preview_watchers.pop(job_id) - 1
                if left:
                    self._preview_watchers[job_id] = left

    def set_previews_watched(self, job_id: str, watched: bool) -> None:
        """Mirror another process's watchers (a pool worker is told by its front door)."""
        with self._cond:
            if watched:
                self._preview_watchers[job_id] = max(1, self._preview_watchers.get(job_id, 0))
            else:
                self._preview_watchers.pop(job_id, None)

    def previews_watched(self, job_id: str) -> bool:
        """Whether any Watch stream wants ``job_id``'s previews now."""
        with self._cond:
            return self._preview_watchers.get(job_id, 0) > 0

    def bump(self) -> None:
        """Wake every waiter."""
        with self._cond:
            self.version += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the version differs from ``seen`` or ``timeout`` passes; returns the version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen, timeout=timeout)
            return self.version


class JobContext:
    """Everything a runner gets for one job."""

    def __init__(
        self,
        job_id: str,
        header: pb.JobHeader,
        inputs: SpooledInputs,
        output_dir: Path,
        live: LiveState,
        events: Events,
        cancel: threading.Event,
        preview_interval: float,
        lead: bool = True,
    ) -> None:
        self.job_id = job_id
        # False on the other ranks of a job spread over several devices: they run the same sampling call, and only
        # the lead (rank 0) writes the results.
        self.lead = lead
        self.header = header
        self.inputs = inputs
        self.output_dir = output_dir
        self._live = live
        self._events = events
        self._cancel = cancel
        self._preview_interval = preview_interval
        self._last_preview = -1e9

    def cancelled(self) -> bool:
        """True once the job was cancelled (or the engine is shutting down); stop within one step."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled."""
        if self._cancel.is_set():
            raise JobCancelled(self.job_id)

    def cancelled_here(self) -> bool:
        """Whether this process was told to cancel, with no agreement among ranks: for work only the lead rank does
        (writing the layers), where a group-wide check would wait for ranks that never make it."""
        return self._cancel.is_set()

    def stage(self, stage: int, detail: str = "", progress: float | None = None) -> None:
        """Report a stage change: a ``pb.Stage`` value and free text for people (e.g. unknown words)."""
        self._live.stage, self._live.stage_detail = stage, detail
        if progress is not None:
            self._live.progress = float(progress)
        self._events.bump()

    def progress(self, step: int, total_steps: int, progress: float | None = None) -> None:
        """Report that ``step`` of ``total_steps`` denoising steps are done; updates the ETA."""
        live = self._live
        now = time.monotonic()
        if step > live.step:
            live.step_times.append((now - live.last_step_at) / (step - live.step))
        live.last_step_at = now
        live.step, live.total_steps = step, total_steps
        live.progress = float(progress if progress is not None else step / max(total_steps, 1))
        recent = live.step_times[-5:]
        live.eta_seconds = (total_steps - step) * (sum(recent) / len(recent)) if recent else None
        self._events.bump()

    def wants_preview(self) -> bool:
        """True when someone watches this job's previews and enough time passed since the last one (previews
        cost a decode: they are made only for a watcher, at a bounded rate)."""
        return (
            time.monotonic() - self._last_preview >= self._preview_interval
            and self._events.previews_watched(self.job_id)
        )

    def preview(
        self, image: np.ndarray, frame: int, step: int, max_side: int = 256, notify: bool = True
    ) -> None:
        """Publish a preview of the predicted composite: ``image`` (H, W, 3) float in [0, 1], sRGB-encoded.

        ``notify=False`` lets the next :meth:`progress` call announce it (one Watch message instead of two).
        """
        self._last_preview = time.monotonic()
        image = np.asarray(image, dtype=np.float32)
        stride = max(1, int(np.ceil(max(image.shape[:2]) / max_side)))
        small = image[::stride, ::stride, :3]
        rgb8 = (np.clip(small, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        self._live.preview = pb.Preview(
            frame=frame, step=step, width=rgb8.shape[1], height=rgb8.shape[0], rgb8=rgb8.tobytes()
        )
        self._live.preview_version += 1
        if notify:
            self._events.bump()


class JobRunner(Protocol):
    """Does one job's work. ``load`` runs once on the worker thread before the first job."""

    def load(self) -> None:
        """Load the model (may take minutes); the engine reports SERVING once it returns."""

    def models(self) -> list[pb.ModelInfo]:
        """The models this runner serves, with their options schema (first one is the default)."""

    def run(self, ctx: JobContext) -> list[Path]:
        """Run the job; write results into ``ctx.output_dir`` and return their paths."""

    def device_info(self) -> pb.DeviceInfo:
        """The device jobs run on, with its memory."""


def free_memory() -> None:
    """Give a finished or cancelled job's memory back (host and, if torch uses one, the GPU)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Worker:
    """Runs queued jobs one at a time on one device, in the engine's process (a pool's is `service.pool.Pool`)."""

    name = "local"

    def __init__(
        self,
        store: job_store.JobStore,
        spool: Spool,
        runner: JobRunner,
        events: Events,
        *,
        preview_interval: float = 1.0,
        on_loaded: Callable[[], None] | None = None,
        idle_hook: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.runner = runner
        self.events = events
        self.preview_interval = preview_interval
        self.on_loaded = on_loaded
        self.idle_hook = idle_hook
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.live: LiveState | None = None
        self._cancel: dict[str, threading.Event] = {}
        # Jobs cancelled after the store marked them RUNNING but before _run registered them: stopped as they start.
        self._cancel_on_start: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vera-worker", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker thread (it loads the model first)."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after interrupting the running job, which goes back to the queue and resumes next start."""
        self._stop.set()
        with self._lock:
            for event in self._cancel.values():
                event.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        """Tell the worker a job was queued."""
        self._wake.set()

    def live_for(self, job_id: str) -> LiveState | None:
        """The live state of ``job_id`` if it runs here now."""
        live = self.live
        return live if live is not None and live.job_id == job_id else None

    def check_placement(self) -> None:
        """Every job fits: it runs on this engine's one device."""

    def workers(self) -> list[pb.WorkerInfo]:
        """This worker, as GetInfo reports it."""
        live = self.live
        if not self.loaded.is_set():
            state = pb.WORKER_STATE_STARTING
        elif live is not None:
            state = pb.WORKER_STATE_BUSY
        else:
            state = pb.WORKER_STATE_IDLE
        models = self.runner.models()
        return [
            pb.WorkerInfo(
                name=self.name,
                node=socket.gethostname(),
                device=self.runner.device_info(),
                model=models[0].name if models else "",
                state=state,
                job_id=live.job_id if live is not None else "",
                devices=1,
            )
        ]

    def cancel_requested(self, job_id: str) -> bool:
        """True while ``job_id`` runs here and has been asked to stop."""
        with self._lock:
            event = self._cancel.get(job_id)
            return job_id in self._cancel_on_start or (event is not None and event.is_set())

    def cancel_running(self, job_id: str) -> bool:
        """Ask ``job_id``, which the store shows RUNNING, to stop within a step; False if the worker is stopping.

        A job claimed from the queue but not yet started by the loop is stopped as it starts.
        """
        with self._lock:
            if self._stop.is_set():
                return False
            event = self._cancel.get(job_id)
            if event is None:
                self._cancel_on_start.add(job_id)
                return True
        event.set()
        return True

    # -- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self.runner.load()
        except Exception as exc:
            self.load_error = f"the model failed to load: {job_error(exc)}"
            log.error("%s\n%s", self.load_error, traceback.format_exc())
        else:
            if self.on_loaded is not None:
                self.on_loaded()
        self.loaded.set()
        self.events.bump()
        while not self._stop.is_set():
            record = self.store.claim_next(worker=self.name)
            if record is None:
                if self.idle_hook is not None:
                    self.idle_hook()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._run(record)

    def _run(self, record: job_store.JobRecord) -> None:
        cancel = threading.Event()
        live = LiveState(job_id=record.id)
        with self._lock:
            self._cancel[record.id] = cancel
            self.live = live
            if record.id in self._cancel_on_start:
                cancel.set()
        self.events.bump()
        log.info("job %s: started (attempt %d)", record.id, record.attempts)
        out_dir = self.spool.output_dir(record.id)
        # A previous attempt (before a crash) may have left part of the results: start clean.
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        state, error, outputs = job_store.FAILED, "", []
        try:
            if self.load_error is not None:
                raise RuntimeError(self.load_error)
            ctx = JobContext(
                record.id,
                record.header,
                SpooledInputs(self.spool.inputs_dir(record.id)),
                out_dir,
                live,
                self.events,
                cancel,
                self.preview_interval,
            )
            paths = self.runner.run(ctx)
            del ctx
            # A cancel that arrives after the last step is too late: the results exist, keep them.
            outputs = sorted(Path(p).name for p in paths)
            state = job_store.SUCCEEDED
        except JobCancelled:
            state = job_store.CANCELLED
        except InputError as exc:
            error = str(exc)
        except Exception as exc:
            error = job_error(exc)  # no server paths to clients
            log.error("job %s failed:\n%s", record.id, traceback.format_exc())
        finally:
            with self._lock:
                self._cancel.pop(record.id, None)
                self._cancel_on_start.discard(record.id)
                self.live = None
        if self._stop.is_set() and state != job_store.SUCCEEDED:
            # Shutting down: leave the job RUNNING so the next start resumes it.
            log.info("job %s: interrupted by shutdown; it resumes when the engine restarts", record.id)
            self.store.requeue(record.id)
            free_memory()
            return
        if state == job_store.CANCELLED:
            shutil.rmtree(out_dir, ignore_errors=True)
        # A cancelled or failed job keeps the progress it had when it stopped (the proto's JobStatus promise).
        stopped_at = live.stopped_at()
        self.store.finish(record.id, state, error=error, outputs=outputs, progress=stopped_at)
        self.spool.remove_inputs(record.id)
        free_memory()
        self.events.bump()
        log.info("job %s: %s %s", record.id, pb.JobState.Name(state), error)
