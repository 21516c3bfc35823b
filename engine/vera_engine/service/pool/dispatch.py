"""The front door's side of a pool: how every job is claimed, followed and finished, whatever runs it.

:class:`Pool` is the engine's worker in every mode: jobs stay in the durable SQLite queue; the pool hands the oldest
queued job to an idle worker (as many jobs in flight as idle workers, in submission order), relays the worker's
stage, steps, ETA and previews into the front door's live state (which Watch streams), stores the results in the
spool, and records the job's end (:meth:`Pool._end`). Cancels are kept in one :class:`~vera_engine.service.worker.
CancelBook`, so one asked between the claim and the worker's start is met as the job starts.

A worker that dies mid-job (its process exits, Ray reports the actor or its node dead) raises
:class:`WorkerLost`: the job goes back to the queue, whose order puts it at the head, counting the attempt as the
kill -9 recovery does, and fails naming the cause once it reached the attempt limit. The backend replaces lost
workers where their devices still exist.

A backend (:class:`PoolBackend`) only makes workers (:class:`WorkerHandle`): `inprocess.InProcessBackend` (one
worker in the engine's process: the default), `local.LocalBackend` (one process per device) and
`ray_backend.RayBackend` (Ray actors, scheduled and watched by Ray).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from vera_engine.service import safe_files
from vera_engine.service import store as job_store
from vera_engine.service.errors import JobCancelled, WorkerLost
from vera_engine.service.limits import job_error
from vera_engine.service.pool.host import (
    JobOutcome,
    JobTicket,
    LiveSnapshot,
    WorkerReport,
    apply_snapshot,
    job_outcome,
    pack_inputs,
)
from vera_engine.service.spool import Spool
from vera_engine.service.worker import CancelBook, Events, JobRunner, LiveState
from vera_proto.vera.v1 import engine_pb2 as pb

log = logging.getLogger("vera_engine.service")

RECONCILE_SECONDS = 5.0  # how often the backend is asked for workers for new (or recovered) devices
LOST_SHOWN = 16  # lost workers GetInfo keeps listing, newest first
LOST_SHOWN_SECONDS = 600.0  # ... for this long after they were lost: a worker killed yesterday is not news


class WorkerHandle(ABC):
    """The front door's handle on one worker (one device, or a group of devices for one job at a time)."""

    def __init__(self, name: str, devices: int) -> None:
        self.name = name
        self.devices = devices
        self.state = pb.WORKER_STATE_STARTING
        self.job_id = ""
        self.lost_cause = ""
        self.lost_at = 0.0  # time.monotonic() when the pool lost it
        self.report: WorkerReport | None = None

    @abstractmethod
    def load(self) -> WorkerReport:
        """Start the worker and block until its model is loaded (raises if it cannot load or dies)."""

    @abstractmethod
    def run(
        self, ticket: JobTicket, inputs: Mapping[str, bytes] | None, on_update: Callable[[LiveSnapshot], None]
    ) -> JobOutcome:
        """Run a job on the worker, calling ``on_update`` with its live fields as they change; blocks until it
        ends. Raises :class:`WorkerLost` if the worker dies meanwhile."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop ``job_id`` within one step (returns at once)."""

    @abstractmethod
    def want_previews(self, job_id: str, wanted: bool) -> None:
        """Tell the worker whether anyone watches ``job_id``'s previews (returns at once)."""

    @abstractmethod
    def lost_reason(self) -> str | None:
        """Why this worker is gone although it holds no job (its process or node died), or None if it lives."""

    @abstractmethod
    def close(self) -> None:
        """Stop the worker and free its devices."""

    @property
    @abstractmethod
    def shares_spool(self) -> bool:
        """True if the worker reads inputs from and writes results to the front door's spool folder itself."""

    def info(self) -> pb.WorkerInfo:
        """This worker as GetInfo reports it."""
        info = pb.WorkerInfo(name=self.name, state=self.state, job_id=self.job_id, devices=self.devices)
        if self.report is not None:
            info.node = self.report.node
            info.device.ParseFromString(self.report.device)
            if self.report.models:
                info.model = pb.ModelInfo.FromString(self.report.models[0]).name
        return info


class PoolBackend(Protocol):
    """Where a pool's workers come from."""

    def describe(self) -> str:
        """The pool in words, for logs (e.g. "Ray cluster at 10.0.0.1:6379, resource GPU")."""

    def reconcile(self, current: list[WorkerHandle]) -> list[WorkerHandle]:
        """New workers for devices that have none among ``current`` (live workers); may be empty."""

    def check_placement(self) -> None:
        """Raise :class:`InputError` if no node can hold one job's devices now."""

    def close(self) -> None:
        """Release what the backend holds (after every worker was closed)."""


class Pool:
    """Runs queued jobs on a backend's workers: the engine's worker when it serves with ``--devices`` or ``--cluster``."""

    def __init__(
        self,
        store: job_store.JobStore,
        spool: Spool,
        backend: PoolBackend,
        events: Events,
        schema_runner: JobRunner,
        *,
        preview_interval: float = 1.0,
        max_attempts: int = 3,
        on_loaded: Callable[[], None] | None = None,
        idle_hook: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.backend = backend
        self.events = events
        self.schema_runner = schema_runner
        self.preview_interval = preview_interval
        self.max_attempts = max_attempts
        self.on_loaded = on_loaded
        self.idle_hook = idle_hook
        self.loaded = threading.Event()  # set once any worker loaded its model (or every worker failed to)
        self.load_error: str | None = None
        self._handles: list[WorkerHandle] = []
        self._lost: list[WorkerHandle] = []
        self._live: dict[str, LiveState] = {}
        self._running: dict[str, WorkerHandle] = {}
        # The one record of cancels at the front door: asked of a running job, or of one claimed from the queue
        # (the store shows it RUNNING) that no worker has yet.
        self._cancels = CancelBook()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, name="vera-pool", daemon=True)

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatch thread; it asks the backend for workers, which load their models."""
        log.info("pool: %s", self.backend.describe())
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: running jobs are interrupted and go back to the queue uncounted; the workers are closed.

        Returns only once no job is inside a step any more (the store may then close): a job's own thread ends at
        its next step boundary; one on a worker that does not stop within ``timeout`` ends when the worker is
        closed (its process killed). A job in this process cannot be killed: the wait goes on, logged.
        """
        self._stop.set()
        for job_id in self._cancels.request_all():
            with self._lock:
                handle = self._running.get(job_id)
            if handle is not None:
                handle.cancel(job_id)
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        jobs = [t for t in list(self._threads) if t.name.startswith("vera-job-")]
        for thread in jobs:
            thread.join(timeout)  # the interrupted jobs go back to the queue before their workers close
        with self._lock:
            handles = list(self._handles)
        for handle in handles:
            # Closing also ends the wait of a worker still starting (e.g. an actor Ray cannot place), and the
            # run of a worker process that did not stop in time.
            handle.close()
        for thread in jobs:
            while thread.is_alive():
                log.warning("stopping: waiting for %s to end its step", thread.name.removeprefix("vera-"))
                thread.join(timeout)
        for thread in list(self._threads):
            thread.join(timeout)
        self.backend.close()

    def wake(self) -> None:
        """Tell the pool a job was queued."""
        self._wake.set()

    # -- what the engine asks ------------------------------------------------------------------------------

    def live_for(self, job_id: str) -> LiveState | None:
        """The live state of ``job_id`` if a worker runs it now."""
        with self._lock:
            return self._live.get(job_id)

    def cancel_running(self, job_id: str) -> bool:
        """Ask ``job_id``, which the store shows RUNNING, to stop within a step; False if the pool is stopping.

        A job claimed from the queue that no worker has yet is stopped as it starts (the book remembers it).
        """
        if self._stop.is_set():
            return False
        self._cancels.request(job_id)
        with self._lock:
            handle = self._running.get(job_id)
        if handle is not None:
            handle.cancel(job_id)
        record = self.store.get(job_id)
        if record is None or record.final:
            # It ended meanwhile (its end forgot its cancels before this one came): nothing to remember.
            self._cancels.end(job_id)
        return True

    def cancel_requested(self, job_id: str) -> bool:
        """True while ``job_id`` runs (or is about to) and has been asked to stop."""
        return self._cancels.requested(job_id)

    def check_placement(self) -> None:
        """INVALID_ARGUMENT at Submit when no node can hold a job's devices (see the backend)."""
        self.backend.check_placement()

    def handle(self, name: str) -> WorkerHandle:
        """The live worker called ``name`` (as GetInfo lists it); KeyError if there is none."""
        with self._lock:
            for handle in self._handles:
                if handle.name == name:
                    return handle
        raise KeyError(f"no live worker {name!r} in this pool")

    def workers(self) -> list[pb.WorkerInfo]:
        """Every worker with its node, device, model, state and job; then the most recently lost ones."""
        recent = time.monotonic() - LOST_SHOWN_SECONDS
        with self._lock:
            self._lost = [h for h in self._lost if h.lost_at >= recent]
            handles = list(self._handles) + list(reversed(self._lost))
        return [h.info() for h in handles]

    def models(self) -> list[pb.ModelInfo]:
        """The models of the first worker that loaded (with its weights hash), else the front door's view."""
        with self._lock:
            reports = [h.report for h in self._handles if h.report is not None]
        if reports:
            return [pb.ModelInfo.FromString(m) for m in reports[0].models]
        return self.schema_runner.models()

    def device_info(self) -> pb.DeviceInfo:
        """The pool's devices in one line (each worker's own is in GetInfo's workers)."""
        with self._lock:
            reports = [
                (h.report.node, pb.DeviceInfo.FromString(h.report.device)) for h in self._handles if h.report
            ]
        if not reports:
            return pb.DeviceInfo(name="pool: no worker loaded yet", kind="")
        devices = [device for _, device in reports]
        names = sorted({d.name for d in devices})
        kinds = sorted({d.kind for d in devices})
        # Memory counted once per device: CPU workers on one node share that node's memory (two local CPU workers
        # reported 33.1 of 47.1 GiB free on a 23.5 GiB machine), GPU workers each have their own.
        memory: dict[tuple[str, str], pb.DeviceInfo] = {}
        for index, (node, device) in enumerate(reports):
            memory.setdefault((node, "cpu") if device.kind == "cpu" else (node, str(index)), device)
        return pb.DeviceInfo(
            name=f"pool of {len(devices)} workers: {', '.join(names)}",
            kind=kinds[0] if len(kinds) == 1 else ",".join(kinds),
            memory_total_bytes=sum(d.memory_total_bytes for d in memory.values()),
            memory_free_bytes=sum(d.memory_free_bytes for d in memory.values()),
        )

    # -- dispatch ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_reconcile = -1e9
        while not self._stop.is_set():
            # Cleared before looking at the queue: a wake (job queued, job ended, worker loaded) during the look
            # makes the wait below return at once instead of after its timeout.
            self._wake.clear()
            if time.monotonic() - last_reconcile > RECONCILE_SECONDS:
                last_reconcile = time.monotonic()
                self._reconcile()
            dispatched = self._dispatch()
            if not dispatched and self.idle_hook is not None:
                self.idle_hook()
            self._wake.wait(timeout=1.0)

    def _reconcile(self) -> None:
        with self._lock:
            idle = [h for h in self._handles if h.state == pb.WORKER_STATE_IDLE]
        for handle in idle:
            # A worker that died between jobs is replaced before a job is sent to it (and counted against it).
            try:
                cause = handle.lost_reason()
            except Exception as exc:
                log.warning("pool: cannot check worker %s: %s", handle.name, exc)
                continue
            if cause is not None and handle.state == pb.WORKER_STATE_IDLE:
                log.warning("worker %s lost while idle: %s", handle.name, cause)
                self._lose(handle, cause)
                self.events.bump()
        with self._lock:
            current = list(self._handles)
        try:
            new = self.backend.reconcile(current)
        except Exception as exc:  # a cluster hiccup must not stop the front door; the next round retries
            log.warning("pool: cannot ask the backend for workers: %s", exc)
            return
        for handle in new:
            with self._lock:
                self._handles.append(handle)
            self._spawn(self._load, handle, name=f"vera-load-{handle.name}")

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _load(self, handle: WorkerHandle) -> None:
        try:
            handle.report = handle.load()
        except Exception as exc:
            error = f"worker {handle.name} failed to load the model: {job_error(exc)}"
            log.error("%s\n%s", error, traceback.format_exc())
            self._lose(handle, error)
            with self._lock:
                alive = [h for h in self._handles if h.state != pb.WORKER_STATE_LOST]
            if not alive and not self.loaded.is_set():
                # Like the single worker: the engine reports the error and fails jobs with it, rather than
                # leaving them queued for a model no worker can load.
                self.load_error = error
                self.loaded.set()
            self.events.bump()
            return
        handle.state = pb.WORKER_STATE_IDLE
        log.info("worker %s: loaded on %s", handle.name, handle.report.node)
        if not self.loaded.is_set() or self.load_error is not None:
            self.load_error = None
            self.loaded.set()
            if self.on_loaded is not None:
                self.on_loaded()
        self.events.bump()
        self._wake.set()

    def _lose(self, handle: WorkerHandle, cause: str) -> None:
        handle.state = pb.WORKER_STATE_LOST
        handle.lost_cause = cause
        handle.lost_at = time.monotonic()
        handle.job_id = ""
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)
                self._lost = [*self._lost, handle][-LOST_SHOWN:]
        try:
            handle.close()
        except Exception as exc:
            log.warning("worker %s: closing a lost worker: %s", handle.name, exc)

    def _dispatch(self) -> bool:
        dispatched = False
        if self.load_error is not None:
            # No worker could load the model: fail what is queued with that reason, rather than leave it queued for
            # a model no worker can load.
            while (record := self.store.claim_next(worker="")) is not None:
                self._end(record.id, JobOutcome(job_store.FAILED, error=self.load_error), "")
                dispatched = True
            return dispatched
        while not self._stop.is_set():
            with self._lock:
                idle = [h for h in self._handles if h.state == pb.WORKER_STATE_IDLE]
            if not idle:
                break
            handle = idle[0]
            record = self.store.claim_next(worker=handle.name)
            if record is None:
                break
            handle.state, handle.job_id = pb.WORKER_STATE_BUSY, record.id
            live = LiveState(job_id=record.id)
            self._cancels.begin(
                record.id
            )  # a cancel since the claim is kept: the job stops before its worker runs it
            with self._lock:
                self._running[record.id] = handle
                self._live[record.id] = live
            self.events.bump()
            self._spawn(self._follow, handle, record, live, name=f"vera-job-{record.id}")
            dispatched = True
        return dispatched

    def _follow(self, handle: WorkerHandle, record: job_store.JobRecord, live: LiveState) -> None:
        """Run one job on ``handle`` (its own thread) and record how it ended."""
        log.info("job %s: started on %s (attempt %d)", record.id, handle.name, record.attempts)
        out_dir = self.spool.output_dir(record.id)
        # A previous attempt (before a crash, or on a lost worker) may have left part of the results: start clean.
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)

        previews = [self.events.previews_watched(record.id)]

        def on_update(snapshot: LiveSnapshot) -> None:
            if apply_snapshot(live, snapshot):
                self.events.bump()
            # Previews are decoded on the worker only while someone here watches them: pass changes along.
            wanted = self.events.previews_watched(record.id)
            if wanted != previews[0]:
                previews[0] = wanted
                handle.want_previews(record.id, wanted)

        def run() -> JobOutcome:
            shared = handle.shares_spool
            ticket = JobTicket(
                job_id=record.id,
                header=record.header.SerializeToString(),
                attempt=record.attempts,
                inputs_dir=str(self.spool.inputs_dir(record.id)) if shared else None,
                output_dir=str(out_dir) if shared else None,
            )
            inputs = None if shared else pack_inputs(self.spool.inputs_dir(record.id))
            if self._cancels.requested(record.id):
                # Cancelled before the worker got it (a later cancel reaches the worker, which remembers it).
                raise JobCancelled(record.id)
            handle.want_previews(record.id, previews[0])
            outcome = handle.run(ticket, inputs, on_update)
            safe_files.check_result_names([*outcome.outputs, *(outcome.files or ())])  # a worker may lie
            if outcome.files is not None:
                _write_results(out_dir, outcome.files)
            return outcome

        try:
            outcome = job_outcome(record.id, run, where=handle.name)
        except WorkerLost as exc:
            self._on_lost(handle, record, str(exc))
            return
        if outcome.progress == JobOutcome(outcome.state).progress:
            # Ended here, not on the worker (its inputs unreadable, cancelled before it got there): the progress
            # the front door saw is what the job keeps.
            outcome.progress = live.stopped_at()
        self._release(handle, record.id)
        self._end(record.id, outcome, handle.name)

    def _end(self, job_id: str, outcome: JobOutcome, worker: str) -> None:
        """The end of a job, however it ended, on whichever worker: the one place a job's end is recorded.

        Stopping: an unfinished job goes back to the queue (it resumes when the engine restarts). Otherwise the
        store keeps its state, error, results and the progress it stopped at; a cancelled job's partial results
        go; its inputs go; Watch streams wake, and the dispatcher looks for the next job.
        """
        if self._stop.is_set() and outcome.state != job_store.SUCCEEDED:
            log.info("job %s: interrupted by shutdown; it resumes when the engine restarts", job_id)
            self.store.requeue(job_id)
            self._cancels.end(job_id)
            self.events.bump()
            return
        if outcome.state == job_store.CANCELLED:
            shutil.rmtree(self.spool.output_dir(job_id), ignore_errors=True)
        self.store.finish(
            job_id, outcome.state, error=outcome.error, outputs=outcome.outputs, progress=outcome.progress
        )
        self._cancels.end(job_id)
        self.spool.remove_inputs(job_id)
        self.events.bump()
        self._wake.set()
        where = f" on {worker}" if worker else ""
        log.info("job %s: %s%s %s", job_id, pb.JobState.Name(outcome.state), where, outcome.error)

    def _release(self, handle: WorkerHandle, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            self._live.pop(job_id, None)
        if handle.state == pb.WORKER_STATE_BUSY:
            handle.state, handle.job_id = pb.WORKER_STATE_IDLE, ""

    def _on_lost(self, handle: WorkerHandle, record: job_store.JobRecord, cause: str) -> None:
        self._release(handle, record.id)
        self._cancels.end(record.id)
        self._lose(handle, cause)
        shutil.rmtree(self.spool.output_dir(record.id), ignore_errors=True)
        if self._stop.is_set():
            self.store.requeue(record.id)
        elif self.store.requeue_lost(record.id, self.max_attempts, cause):
            log.warning("job %s: worker %s lost (%s); the job is queued again", record.id, handle.name, cause)
        else:
            log.error(
                "job %s: worker %s lost (%s); attempts used up, the job failed", record.id, handle.name, cause
            )
            self.spool.remove_inputs(record.id)
        self.events.bump()
        self._wake.set()


def _write_results(out_dir: Path, files: Mapping[str, bytes]) -> None:
    """Results that came back as bytes, written into the spool; each appears atomically (write, then rename)."""
    for name, data in files.items():
        if Path(name).name != name:
            raise ValueError(f"result file name {name!r} is not a plain file name")
        tmp = out_dir / f".{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, out_dir / name)
