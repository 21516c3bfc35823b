"""The ``vera.v1.Engine`` gRPC servicer: each RPC mapped onto the :class:`~vera_engine.service.engine.Engine`
(streaming RPCs are generators), and :func:`create_server`, which adds health checking, reflection and
authentication.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vera_engine.service import auth
from vera_engine.service import store as job_store
from vera_engine.service.engine import CHUNK_BYTES, MAX_MESSAGE_BYTES, SERVICE_NAME, Engine
from vera_engine.service.schema import resolve_header
from vera_engine.service.spool import InputError, Upload
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

log = logging.getLogger("vera_engine.service")

DEFAULT_PORT = 50051


def _not_found(context: grpc.ServicerContext, job_id: str) -> None:
    context.abort(
        grpc.StatusCode.NOT_FOUND,
        f"job {job_id!r} is not known to this engine (finished jobs are kept for the retention period); "
        "see ListJobs / `vera jobs`",
    )


class EngineServicer(pb_grpc.EngineServicer):
    """The RPCs of vera.v1.Engine over an :class:`Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.EngineInfo:
        """Engine, device, queue and models with their options schema."""
        return self.engine.info()

    def Submit(
        self, request_iterator: Iterator[pb.SubmitRequest], context: grpc.ServicerContext
    ) -> pb.SubmitResponse:
        """Receive a header and frames, spooling them to disk; queue the job once all arrived and validated."""
        engine = self.engine
        upload: Upload | None = None
        committed = False
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise InputError("header", "the first message of a Submit stream must be the JobHeader")
            header = resolve_header(first.header, engine.runner.models())
            engine.worker.check_placement()  # a pool whose nodes are too small for a job refuses it here
            if engine.store.count(job_store.QUEUED) >= engine.queue_capacity:
                # Refuse before the client spends minutes uploading a plate that cannot be queued.
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the queue is full ({engine.queue_capacity} jobs waiting); retry later or use another engine",
                )
            upload = engine.spool.new_upload(header, engine.allowed_roots)
            for message in request_iterator:
                if not message.HasField("chunk"):
                    raise InputError("header", "sent twice; only the first message may be a JobHeader")
                upload.add_chunk(message.chunk)
            upload.finish()
            job_id = uuid.uuid4().hex[:16]
            upload.commit(engine.spool.inputs_dir(job_id))
            try:
                record = engine.store.add(job_id, header, engine.queue_capacity)
            except job_store.QueueFull as exc:
                engine.spool.remove_job(job_id)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later or use another engine")
            committed = True
            engine.worker.wake()
            engine.events.bump()
            log.info("job %s: queued (%d frames, %s)", job_id, len(header.frames), header.task)
            return pb.SubmitResponse(job_id=job_id, status=engine.status(record))
        except InputError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the engine's spool disk is full: {exc}")
            raise
        finally:
            # A failed, refused or abandoned upload (client gone mid-stream) leaves nothing behind.
            if upload is not None and not committed:
                upload.discard()
        raise AssertionError("unreachable")  # context.abort raises

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.JobStatus]:
        """Yield the job's status whenever it changes, until it reaches a final state."""
        engine = self.engine
        last_sent = b""
        last_preview = None
        while context.is_active():
            version = engine.events.version
            record = engine.store.get(request.job_id)
            if record is None:
                _not_found(context, request.job_id)
                return
            status = engine.status(record, preview=request.previews)
            new_preview = status.HasField("preview") and status.preview.SerializeToString() != last_preview
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
            engine.events.wait(version, timeout=1.0)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchChunk]:
        """Stream the result files of a finished job, chunk by chunk."""
        engine = self.engine
        record = engine.store.get(request.job_id)
        if record is None:
            _not_found(context, request.job_id)
            return
        if record.state != job_store.SUCCEEDED:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {record.id} is {pb.JobState.Name(record.state)}; results exist only for "
                "JOB_STATE_SUCCEEDED jobs" + (f" (error: {record.error})" if record.error else ""),
            )
        names = list(request.files) or record.outputs
        unknown = [n for n in names if n not in record.outputs]
        if unknown:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"files: {unknown} are not results of job {record.id}; its results are {record.outputs}",
            )
        out_dir = engine.spool.output_dir(record.id)
        for index, name in enumerate(names):
            path = out_dir / name
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed below; the generator may be abandoned
            except FileNotFoundError:
                context.abort(grpc.StatusCode.NOT_FOUND, f"result {name} of job {record.id} was removed")
            with handle:
                size = path.stat().st_size
                offset = 0
                while True:
                    data = handle.read(CHUNK_BYTES)
                    yield pb.FetchChunk(
                        file_name=name,
                        file_size=size,
                        offset=offset,
                        data=data,
                        file_index=index,
                        file_count=len(names),
                    )
                    offset += len(data)
                    if offset >= size or not data:
                        break

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        """Cancel a queued job at once or a running one within a step; answers with the job's new status."""
        engine = self.engine
        record = engine.store.get(request.job_id)
        if record is None:
            _not_found(context, request.job_id)
        assert record is not None
        if not record.final:
            if engine.store.cancel_if_queued(record.id):
                engine.spool.remove_job(record.id)
                engine.events.bump()
                log.info("job %s: cancelled while queued", record.id)
            elif engine.worker.cancel_running(record.id):
                # Wait (bounded) for the worker to stop the job so the answer shows the final state.
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and context.is_active():
                    version = engine.events.version
                    current = engine.store.get(record.id)
                    if current is None or current.final:
                        break
                    engine.events.wait(version, timeout=0.5)
        record = engine.store.get(request.job_id) or record
        return engine.status(record)

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        """The known jobs in submission order."""
        engine = self.engine
        records = engine.store.jobs(request.states, request.limit)
        return pb.ListJobsResponse(jobs=[engine.status(r) for r in records])


def create_server(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    tokens: Sequence[str] = (),
    tls: tuple[Path, Path] | None = None,
    max_workers: int = 64,
) -> tuple[grpc.Server, int]:
    """A gRPC server for ``engine`` with health checking and reflection, bound but not started.

    Returns the server and the bound port (useful with ``port=0``).
    """
    from concurrent import futures

    interceptors = [auth.TokenInterceptor(tokens)] if tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vera-rpc"),
        interceptors=interceptors,
        # Watch streams hold a thread each: past the pool size, answer RESOURCE_EXHAUSTED instead of queueing.
        maximum_concurrent_rpcs=max_workers,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_EngineServicer_to_server(EngineServicer(engine), server)
    health_pb2_grpc.add_HealthServicer_to_server(engine.health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, auth.server_credentials(*tls))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind {address}: port in use or address not available")
    return server, bound


# ---------------------------------------------------------------------------------------------------------
# vera-engine serve
