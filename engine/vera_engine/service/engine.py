"""The engine core: one spool, one job store and the worker(s), and what the service reports about them.

:class:`Engine` accepts uploads, keeps the queue durable (a restarted engine resumes its queued jobs and still
serves finished results), runs jobs one at a time on its in-process worker, or on a pool of workers (one per
device, local or Ray actors: `service/pool/`), and purges results past their retention. The
gRPC servicer (`servicer.py`) calls into it; `serve.py` builds one from the command line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

from vera_engine.service import store as job_store
from vera_engine.service.limits import limits_message
from vera_engine.service.spool import Spool
from vera_engine.service.worker import Events, JobRunner, Worker
from vera_proto.vera.v1 import engine_pb2 as pb

if TYPE_CHECKING:
    from vera_engine.service.pool import Pool, PoolBackend

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


class Engine:
    """The engine core: owns the spool, the job store and the worker; the servicer calls into it."""

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
        self.worker: Worker | Pool
        if pool is None:
            self.worker = Worker(
                self.store,
                self.spool,
                runner,
                self.events,
                preview_interval=preview_interval,
                on_loaded=self._on_loaded,
                idle_hook=self._idle,
            )
        else:
            # Jobs run on the pool's workers (local processes or Ray actors); `runner` is not loaded here, it only
            # answers for the schema until a worker has loaded and reported its own.
            from vera_engine.service.pool import Pool

            self.worker = self.runner = Pool(
                self.store,
                self.spool,
                pool,
                self.events,
                runner,
                preview_interval=preview_interval,
                max_attempts=max_attempts,
                on_loaded=self._on_loaded,
                idle_hook=self._idle,
            )
        for name in ("", SERVICE_NAME):
            # Live but not ready until the worker has loaded the model.
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from a previous run (crash included) and start the worker."""
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
        self.worker.start()

    def stop(self) -> None:
        """Stop the worker (the running job is requeued) and close the store."""
        self.worker.stop()
        self.store.close()
        self.spool.unlock()

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

    # -- queries -------------------------------------------------------------------------------------------

    def status(self, record: job_store.JobRecord, preview: bool = False) -> pb.JobStatus:
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
            status.stage_detail = "queued" if self.worker.loaded.is_set() else "waiting for the model to load"
        elif record.state == job_store.RUNNING:
            status.cancel_requested = self.worker.cancel_requested(record.id)
            live = self.worker.live_for(record.id)
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
        models = self.runner.models()
        for i, m in enumerate(models):
            m.is_default = i == 0
        return pb.EngineInfo(
            engine_version=engine_version(),
            device=self.runner.device_info(),
            queue_length=self.store.count(job_store.QUEUED),
            queue_capacity=self.queue_capacity,
            running=self.store.count(job_store.RUNNING),
            model_loaded=self.worker.loaded.is_set() and self.worker.load_error is None,
            models=models,
            max_message_bytes=MAX_MESSAGE_BYTES,
            chunk_bytes=CHUNK_BYTES,
            allowed_roots=[str(r) for r in self.allowed_roots],
            retention_seconds=self.retention_seconds,
            limits=limits_message(),
            workers=self.worker.workers(),
        )
