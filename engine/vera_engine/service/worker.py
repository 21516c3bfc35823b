"""What every worker runs a job with: its context, live state, cancels and the events Watch streams wait on.

The actual work is an injected :class:`JobRunner`, so the queue, spool, cancellation and restart mechanics
do not depend on the model. A runner reports progress through :meth:`JobContext.progress` once per
denoising step and must stop (raising :class:`JobCancelled`) within one step of :meth:`JobContext.cancelled`
turning true.

Jobs are claimed, run and finished by `service.pool`: the engine's own process is a pool of one worker
(`pool/inprocess.py`), so one lifecycle serves it, local worker processes and Ray actors alike.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from vera_engine.service.errors import JobCancelled
from vera_engine.service.spool import SpooledInputs
from vera_proto.vera.v1 import engine_pb2 as pb

log = logging.getLogger("vera_engine.service")
# At most this many previews over one job (each costs a decode of a latent frame), however fast its steps are.
PREVIEWS_PER_JOB = 10


class CancelBook:
    """The cancels asked of the jobs one party holds (a pool's front door, or one worker host), in one place.

    A cancel asked before the job started there (claimed from the queue but not yet dispatched; sent to a worker
    that is still receiving the job's inputs) is remembered and met as the job starts, so no cancel is lost in
    the hand-over from the store to the front door to the worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._early: set[str] = set()

    def request(self, job_id: str) -> None:
        """Ask ``job_id`` to stop: at once if it runs, else as it starts."""
        with self._lock:
            event = self._running.get(job_id)
            if event is None:
                self._early.add(job_id)
                return
        event.set()

    def requested(self, job_id: str) -> bool:
        """Whether ``job_id`` was asked to stop (and has not ended)."""
        with self._lock:
            event = self._running.get(job_id)
            return job_id in self._early or (event is not None and event.is_set())

    def begin(self, job_id: str, *, only: bool = False) -> threading.Event:
        """``job_id`` starts here: its cancel event, already set if a cancel came first.

        ``only``: this party runs one job at a time, so a remembered cancel of any other job is stale.
        """
        with self._lock:
            event = threading.Event()
            if job_id in self._early:
                event.set()
            if only:
                self._early.clear()
            else:
                self._early.discard(job_id)
            self._running[job_id] = event
            return event

    def end(self, job_id: str) -> None:
        """``job_id`` ended here: forget it."""
        with self._lock:
            self._running.pop(job_id, None)
            self._early.discard(job_id)

    def request_all(self) -> list[str]:
        """Ask every running job to stop (shutdown); returns their ids."""
        with self._lock:
            events = list(self._running.items())
        for _, event in events:
            event.set()
        return [job_id for job_id, _ in events]


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
        self._last_preview_step = -(10**9)

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

    def wants_preview(self, step: int = 0, total_steps: int = 0) -> bool:
        """True when someone watches this job's previews and enough time passed since the last one (previews
        cost a decode: they are made only for a watcher, at a bounded rate). Given the job's ``step`` of
        ``total_steps``, also at most :data:`PREVIEWS_PER_JOB` of them over the job: on a GPU a step takes a few
        seconds, so the time bound alone would decode a preview at nearly every step."""
        every = max(1, total_steps // PREVIEWS_PER_JOB) if total_steps else 1
        return (
            time.monotonic() - self._last_preview >= self._preview_interval
            and step - self._last_preview_step >= every
            and self._events.previews_watched(self.job_id)
        )

    def preview(
        self, image: np.ndarray, frame: int, step: int, max_side: int = 256, notify: bool = True
    ) -> None:
        """Publish a preview of the predicted composite: ``image`` (H, W, 3) float in [0, 1], sRGB-encoded.

        ``notify=False`` lets the next :meth:`progress` call announce it (one Watch message instead of two).
        """
        self._last_preview = time.monotonic()
        self._last_preview_step = step
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
    # torch only if it is loaded, and fully: another thread may be importing it now (no `cuda` yet).
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    if cuda is not None and hasattr(cuda, "is_available") and cuda.is_available():
        cuda.empty_cache()
