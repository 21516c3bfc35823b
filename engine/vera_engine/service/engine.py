"""The engine core: one spool, one job store and a pool of workers, and what the service reports about them.

:class:`Engine` is the API an embedding program uses, and the one the gRPC servicer (`servicer.py`) translates
RPCs onto: :meth:`~Engine.submit`, :meth:`~Engine.watch`, :meth:`~Engine.status`, :meth:`~Engine.cancel`,
:meth:`~Engine.fetch_paths`, :meth:`~Engine.info` and :meth:`~Engine.close` (or ``with Engine(...) as engine``).
It admits uploads (checked, spooled, queued durably: a restarted engine resumes its queued jobs and still serves
finished results) and purges results past their retention. Jobs run on a pool (`service/pool/`): one worker in
this process on one device by default, or one per device (local processes) or Ray actors across a cluster; every
kind runs a job through the same lifecycle. Refusals are the exceptions of `errors.py`, each with its gRPC code.
"""

from __future__ import annotations

import contextlib
import logging
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from grpc_health.v1 import health, health_pb2

from vera_engine.service import safe_files
from vera_engine.service import store as job_store
from vera_engine.service.errors import InputError, JobNotFound, QueueFull, ResultRemoved, WrongJobState
from vera_engine.service.limits import limits_message, quote
from vera_engine.service.pool.dispatch import Pool, PoolBackend
from vera_engine.service.pool.inprocess import InProcessBackend
from vera_engine.service.schema import resolve_header
from vera_engine.service.spool import Spool
from vera_engine.service.worker import Events, JobRunner
from vera_proto.vera.v1 import engine_pb2 as pb

log = logging.getLogger("vera_engine.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
CHUNK_BYTES = 3 * 1024 * 1024  # under gRPC's default 4 MiB limit, so any client can receive Fetch chunks
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_QUEUE = 32
DEFAULT_RETENTION_HOURS = 72.0


def engine_version() -> str:
    """The installed vera-edit version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vera-edit")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


SHOWN_FILES = 5  # result names an error lists


class Engine:
    """The engine core: owns the spool, the job store and the pool of workers.

    ``runner`` runs the jobs in this process, unless ``pool`` names another backend (local worker processes, Ray
    actors): it then only answers for the models' schema until a worker has loaded and reported its own.
    """

    def __init__(
        self,
        spool_dir: Path | str,
        runner: JobRunner,
        *,
        queue_capacity: int = DEFAULT_QUEUE,
        allowed_roots: Sequence[Path | str] = (),
        retention_seconds: float = DEFAULT_RETENTION_HOURS * 3600,
        preview_interval: float = 1.0,
        max_attempts: int = 3,
        cancel_wait_seconds: float = 10.0,
        pool: PoolBackend | None = None,
    ) -> None:
        if queue_capacity < 1:
            raise ValueError(f"queue_capacity={queue_capacity}; expected at least 1")
        self.spool = Spool(spool_dir)
        self.spool.lock()
        self.store = job_store.JobStore(self.spool.db_path)
        self.runner = runner
        self.queue_capacity = queue_capacity
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.retention_seconds = retention_seconds
        self.max_attempts = max_attempts
        # How long Cancel waits for a running job to stop before answering RUNNING with cancel_requested.
        self.cancel_wait_seconds = cancel_wait_seconds
        self.events = Events()
        self.health = health.HealthServicer()
        self._last_purge = 0.0
        self._phase = "new"  # then "started", then "closed"
        # Where GetInfo's models and device come from: the runner here, or the pool's workers once they report.
        self._workers_report = pool is not None
        self.pool = Pool(
            self.store,
            self.spool,
            pool if pool is not None else InProcessBackend(runner, preview_interval=preview_interval),
            self.events,
            runner,
            preview_interval=preview_interval,
            max_attempts=max_attempts,
            on_loaded=self._on_loaded,
            idle_hook=self._idle,
        )
        for name in ("", SERVICE_NAME):
            # Live but not ready until a worker has loaded the model.
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from a previous run (crash included) and start the pool (its workers load the model)."""
        if self._phase != "new":
            raise RuntimeError(f"Engine.start: the engine is {self._phase} already")
        dropped = self.spool.clean_incoming()
        known = {r.id for r in self.store.jobs()}
        for orphan in self.spool.orphans(known):
            self.spool.remove_job(orphan)
        requeued, failed = self.store.recover(self.max_attempts)
        self.purge_expired()
        if dropped or requeued or failed:
            log.info(
                "recovered: %d unfinished uploads removed, %d interrupted jobs requeued, %d given up",
                dropped,
                len(requeued),
                len(failed),
            )
        self._phase = "started"
        self.pool.start()

    def close(self) -> None:
        """Stop the pool, then close the store and free the spool for another engine (idempotent).

        A running job is asked to stop at its next step and goes back to the queue (it resumes at the next
        start); the store closes only once no job is inside a step.
        """
        if self._phase == "closed":
            return
        self._phase = "closed"
        self.pool.stop()
        self.store.close()
        self.spool.unlock()

    stop = close  # the name serve and older embedders use

    def __enter__(self) -> Engine:
        """``with Engine(...) as engine:`` starts it (if not started yet) and closes it at the end."""
        if self._phase == "new":
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_loaded(self) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("model loaded; serving")

    def _idle(self) -> None:
        if time.monotonic() - self._last_purge > 60.0:
            self.purge_expired()

    def purge_expired(self) -> list[str]:
        """Remove finished jobs older than the retention period, results included."""
        self._last_purge = time.monotonic()
        expired = self.store.expired(time.time() - self.retention_seconds)
        for job_id in expired:
            self.spool.remove_job(job_id)
            self.store.delete(job_id)
        return expired

    # -- jobs ----------------------------------------------------------------------------------------------

    def submit(self, header: pb.JobHeader, chunks: Iterable[pb.FrameChunk]) -> pb.JobStatus:
        """Admit a job: check ``header`` against the model's schema, spool ``chunks`` (the frames, streamed to disk
        as they come), queue it durably; returns its status (``job_id`` included).

        Refuses (before reading any chunk) a header the schema rejects or a job no worker can place
        (:class:`~vera_engine.service.errors.InputError`) and a full queue (``QueueFull``); then a bad frame
        (``InputError`` naming it). A refused or abandoned upload leaves nothing behind.
        """
        header = resolve_header(header, self.models())
        self.pool.check_placement()  # a pool whose nodes are too small for a job refuses it here
        if self.store.count(job_store.QUEUED) >= self.queue_capacity:
            # Refuse before the client spends minutes uploading a plate that cannot be queued.
            raise QueueFull(
                f"the queue is full ({self.queue_capacity} jobs waiting); retry later or use another engine"
            )
        upload = self.spool.new_upload(header, self.allowed_roots)
        committed = False
        try:
            for chunk in chunks:
                upload.add_chunk(chunk)
            upload.finish()
            job_id = uuid.uuid4().hex  # 32 lower-case hexadecimal characters, as the proto promises
            upload.commit(self.spool.inputs_dir(job_id))
            try:
                record = self.store.add(job_id, header, self.queue_capacity)
            except QueueFull as exc:
                self.spool.remove_job(job_id)
                raise QueueFull(f"{exc}; retry later or use another engine") from None
            committed = True
        finally:
            if not committed:
                upload.discard()
        self.pool.wake()
        self.events.bump()
        log.info("job %s: queued (%d frames, %s)", job_id, len(header.frames), header.task)
        return self.status_of(record)

    def record(self, job_id: str) -> job_store.JobRecord:
        """The stored job ``job_id``; :class:`JobNotFound` if there is none."""
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(
                f"job {quote(job_id)} is not known to this engine (finished jobs are kept for the retention "
                "period); see ListJobs / `vera jobs`"
            )
        return record

    def status(self, job_id: str, preview: bool = False) -> pb.JobStatus:
        """The job's status now, with live progress (and the latest preview, if asked) while it runs."""
        return self.status_of(self.record(job_id), preview)

    def watch(
        self, job_id: str, previews: bool = False, active: Callable[[], bool] = lambda: True
    ) -> Iterator[pb.JobStatus]:
        """The job's status each time it changes, until it reaches a final state (or ``active()`` turns false).

        With ``previews``, the job makes previews while this runs, and each new one is sent once.
        """
        with self.events.watching_previews(job_id) if previews else contextlib.nullcontext():
            last_sent = b""
            last_preview = None
            while active():
                version = self.events.version
                record = self.record(job_id)
                status = self.status_of(record, preview=previews)
                new_preview = (
                    status.HasField("preview") and status.preview.SerializeToString() != last_preview
                )
                if new_preview:
                    last_preview = status.preview.SerializeToString()
                else:
                    status.ClearField("preview")
                key = status.SerializeToString(deterministic=True)
                if new_preview or key != last_sent:
                    last_sent = key
                    yield status
                if record.final:
                    return
                self.events.wait(version, timeout=1.0)

    def cancel(
        self, job_id: str, wait: float | None = None, active: Callable[[], bool] = lambda: True
    ) -> pb.JobStatus:
        """Cancel a queued job at once, or ask a running one to stop within a step; returns its status.

        For a running job, waits up to ``wait`` seconds (default: the engine's ``cancel_wait_seconds``) for it
        to stop, so the answer shows CANCELLED; after that (or once ``active()`` turns false) it answers RUNNING
        with ``cancel_requested``. A job that already ended is :class:`WrongJobState`, its state in the message.
        """
        record = self.record(job_id)
        asked = False
        if not record.final:
            if self.store.cancel_if_queued(record.id):
                asked = True
                self.spool.remove_job(record.id)
                self.events.bump()
                log.info("job %s: cancelled while queued", record.id)
            elif self.pool.cancel_running(record.id):
                asked = True
                deadline = time.monotonic() + (self.cancel_wait_seconds if wait is None else wait)
                while time.monotonic() < deadline and active():
                    version = self.events.version
                    current = self.store.get(record.id)
                    if current is None or current.final:
                        break
                    self.events.wait(version, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        record = self.store.get(job_id) or record
        if not asked:
            raise WrongJobState(
                f"job {record.id} already ended ({pb.JobState.Name(record.state)}); only queued or running jobs "
                "can be cancelled"
            )
        return self.status_of(record)

    def fetch_paths(self, job_id: str, files: Sequence[str] = ()) -> list[Path]:
        """The result files of a succeeded job (``files``: some of its ``output_files``; default all), in order.

        :class:`WrongJobState` for a job that did not succeed, ``InputError`` for names that are not its
        results, :class:`ResultRemoved` for a result gone from the spool (or replaced by a link or anything not a
        regular file: the paths returned are the job's own files inside its output folder, docs/SECURITY.md).
        """
        record = self.record(job_id)
        if record.state != job_store.SUCCEEDED:
            raise WrongJobState(
                f"job {record.id} is {pb.JobState.Name(record.state)}; results exist only for "
                "JOB_STATE_SUCCEEDED jobs" + (f" (error: {record.error})" if record.error else "")
            )
        names = list(files) or record.outputs
        unknown = [n for n in names if n not in record.outputs]
        if unknown:
            shown = ", ".join(quote(n) for n in unknown[:SHOWN_FILES])
            results = ", ".join(record.outputs[:SHOWN_FILES])
            more = f" ... ({len(record.outputs)} in all; see JobStatus.output_files)"
            raise InputError(
                "files",
                f"{len(unknown)} not results of job {record.id}, first {shown}; its results are {results}"
                + (more if len(record.outputs) > SHOWN_FILES else ""),
            )
        out_dir = self.spool.output_dir(record.id)
        paths = [out_dir / name for name in safe_files.check_result_names(names)]
        for path in paths:
            try:
                info = path.lstat()  # the file itself: a result swapped for a link must not lead elsewhere
            except FileNotFoundError:
                raise ResultRemoved(f"result {path.name} of job {record.id} was removed") from None
            if not stat.S_ISREG(info.st_mode):
                raise ResultRemoved(
                    f"result {path.name} of job {record.id} was replaced by something not a regular file"
                )
        return paths

    # -- queries -------------------------------------------------------------------------------------------

    def models(self) -> list[pb.ModelInfo]:
        """The models jobs run with (the first is the default), with their options schema."""
        return self.pool.models() if self._workers_report else self.runner.models()

    def cancel_requested(self, job_id: str) -> bool:
        """Whether ``job_id`` runs (or is about to) and has been asked to stop."""
        return self.pool.cancel_requested(job_id)

    def status_of(self, record: job_store.JobRecord, preview: bool = False) -> pb.JobStatus:
        """The JobStatus of a stored job, with live progress if it is running."""
        status = pb.JobStatus(
            job_id=record.id,
            state=record.state,
            sequence=record.seq,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            seed=record.header.seed,
            header=record.header,
            error=record.error,
            output_files=record.outputs,
            attempts=record.attempts,
            worker=record.worker,
        )
        if record.state == job_store.QUEUED:
            queued = self.store.queued_ids()
            status.queue_position = queued.index(record.id) if record.id in queued else 0
            status.stage = pb.STAGE_QUEUED
            status.stage_detail = "queued" if self.pool.loaded.is_set() else "waiting for the model to load"
        elif record.state == job_store.RUNNING:
            status.cancel_requested = self.pool.cancel_requested(record.id)
            live = self.pool.live_for(record.id)
            if live is not None:
                status.stage, status.stage_detail = live.stage, live.stage_detail
                status.step, status.total_steps = live.step, live.total_steps
                status.progress = live.progress
                if live.eta_seconds is not None:
                    status.eta_seconds = live.eta_seconds
                if preview and live.preview is not None:
                    status.preview.CopyFrom(live.preview)
            else:
                status.stage, status.stage_detail = pb.STAGE_LOADING, "starting"
        elif record.state == job_store.SUCCEEDED:
            status.stage, status.stage_detail, status.progress = pb.STAGE_DONE, "done", 1.0
            status.step = status.total_steps = record.header.steps * max(1, record.header.takes)
        else:
            status.stage = pb.STAGE_DONE
            status.stage_detail = pb.JobState.Name(record.state).removeprefix("JOB_STATE_").lower()
            status.step, status.total_steps, status.progress = (
                record.step,
                record.total_steps,
                record.progress,
            )
        return status

    def info(self) -> pb.EngineInfo:
        """What GetInfo answers."""
        models = self.models()
        for i, m in enumerate(models):
            m.is_default = i == 0
        return pb.EngineInfo(
            engine_version=engine_version(),
            device=self.pool.device_info() if self._workers_report else self.runner.device_info(),
            queue_length=self.store.count(job_store.QUEUED),
            queue_capacity=self.queue_capacity,
            running=self.store.count(job_store.RUNNING),
            model_loaded=self.pool.loaded.is_set() and self.pool.load_error is None,
            models=models,
            max_message_bytes=MAX_MESSAGE_BYTES,
            chunk_bytes=CHUNK_BYTES,
            allowed_roots=[str(r) for r in self.allowed_roots],
            retention_seconds=self.retention_seconds,
            limits=limits_message(),
            workers=self.pool.workers(),
        )
