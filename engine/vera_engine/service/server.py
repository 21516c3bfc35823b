"""The ``vera.v1.Engine`` gRPC service: servicer, engine core and ``vera-engine serve``.

:class:`Engine` ties the spool, the job store and the worker together; :class:`EngineServicer` maps the
RPCs onto it (streaming RPCs are generators); :func:`create_server` adds health checking, reflection and
authentication; :func:`serve_main` is the command line.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

from . import auth
from . import store as st
from .schema import resolve_header
from .spool import InputError, Spool, SpoolInUse, Upload
from .worker import Events, JobRunner, Worker

log = logging.getLogger("vera_engine.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
CHUNK_BYTES = 3 * 1024 * 1024  # under gRPC's default 4 MiB limit, so any client can receive Fetch chunks
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_PORT = 50051
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
    ) -> None:
        if queue_capacity < 1:
            raise ValueError(f"queue_capacity={queue_capacity}; expected at least 1")
        self.spool = Spool(spool_dir)
        self.spool.lock()
        self.store = st.JobStore(self.spool.db_path)
        self.runner = runner
        self.queue_capacity = queue_capacity
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.retention_seconds = retention_seconds
        self.max_attempts = max_attempts
        self.events = Events()
        self.health = health.HealthServicer()
        self._last_purge = 0.0
        self.worker = Worker(
            self.store,
            self.spool,
            runner,
            self.events,
            preview_interval=preview_interval,
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

    def status(self, record: st.JobRecord, preview: bool = False) -> pb.JobStatus:
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
        )
        if record.state == st.QUEUED:
            queued = self.store.queued_ids()
            status.queue_position = queued.index(record.id) if record.id in queued else 0
            status.stage = "queued" if self.worker.loaded.is_set() else "waiting for the model to load"
        elif record.state == st.RUNNING:
            live = self.worker.live
            if live is not None and live.job_id == record.id:
                status.stage = live.stage
                status.step, status.total_steps = live.step, live.total_steps
                status.progress = live.progress
                if live.eta_seconds is not None:
                    status.eta_seconds = live.eta_seconds
                if preview and live.preview is not None:
                    status.preview.CopyFrom(live.preview)
            else:
                status.stage = "starting"
        elif record.state == st.SUCCEEDED:
            status.stage, status.progress = "done", 1.0
            status.step = status.total_steps = record.header.steps
        else:
            status.stage = pb.JobState.Name(record.state).removeprefix("JOB_STATE_").lower()
        return status

    def info(self) -> pb.EngineInfo:
        """What GetInfo answers."""
        models = self.runner.models()
        for i, m in enumerate(models):
            m.is_default = i == 0
        return pb.EngineInfo(
            engine_version=engine_version(),
            device=self.runner.device_info(),
            queue_length=self.store.count(st.QUEUED),
            queue_capacity=self.queue_capacity,
            running=self.store.count(st.RUNNING),
            model_loaded=self.worker.loaded.is_set() and self.worker.load_error is None,
            models=models,
            max_message_bytes=MAX_MESSAGE_BYTES,
            chunk_bytes=CHUNK_BYTES,
            allowed_roots=[str(r) for r in self.allowed_roots],
            retention_seconds=self.retention_seconds,
        )


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
        eng = self.engine
        upload: Upload | None = None
        committed = False
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise InputError("header", "the first message of a Submit stream must be the JobHeader")
            header = resolve_header(first.header, eng.runner.models())
            if eng.store.count(st.QUEUED) >= eng.queue_capacity:
                # Refuse before the client spends minutes uploading a plate that cannot be queued.
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the queue is full ({eng.queue_capacity} jobs waiting); retry later or use another engine",
                )
            upload = eng.spool.new_upload(header, eng.allowed_roots)
            for message in request_iterator:
                if not message.HasField("chunk"):
                    raise InputError("header", "sent twice; only the first message may be a JobHeader")
                upload.add_chunk(message.chunk)
            upload.finish()
            job_id = uuid.uuid4().hex[:16]
            upload.commit(eng.spool.inputs_dir(job_id))
            try:
                record = eng.store.add(job_id, header, eng.queue_capacity)
            except st.QueueFull as exc:
                eng.spool.remove_job(job_id)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later or use another engine")
            committed = True
            eng.worker.wake()
            eng.events.bump()
            log.info("job %s: queued (%d frames, %s)", job_id, len(header.frames), header.task)
            return pb.SubmitResponse(job_id=job_id, status=eng.status(record))
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
        eng = self.engine
        last_sent = b""
        last_preview = None
        while context.is_active():
            version = eng.events.version
            record = eng.store.get(request.job_id)
            if record is None:
                _not_found(context, request.job_id)
                return
            status = eng.status(record, preview=request.previews)
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
            eng.events.wait(version, timeout=1.0)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchChunk]:
        """Stream the result files of a finished job, chunk by chunk."""
        eng = self.engine
        record = eng.store.get(request.job_id)
        if record is None:
            _not_found(context, request.job_id)
            return
        if record.state != st.SUCCEEDED:
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
        out_dir = eng.spool.output_dir(record.id)
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
        eng = self.engine
        record = eng.store.get(request.job_id)
        if record is None:
            _not_found(context, request.job_id)
        assert record is not None
        if not record.final:
            if eng.store.cancel_if_queued(record.id):
                eng.spool.remove_job(record.id)
                eng.events.bump()
                log.info("job %s: cancelled while queued", record.id)
            elif eng.worker.cancel_running(record.id):
                # Wait (bounded) for the worker to stop the job so the answer shows the final state.
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and context.is_active():
                    version = eng.events.version
                    current = eng.store.get(record.id)
                    if current is None or current.final:
                        break
                    eng.events.wait(version, timeout=0.5)
        record = eng.store.get(request.job_id) or record
        return eng.status(record)

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        """The known jobs in submission order."""
        eng = self.engine
        records = eng.store.jobs(request.states, request.limit)
        return pb.ListJobsResponse(jobs=[eng.status(r) for r in records])


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


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``vera-engine``'s subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC engine service",
        description="Run the Vera Edit engine: a gRPC service (vera.v1.Engine) with a durable job queue.",
    )
    _serve_arguments(parser)
    parser.set_defaults(handler=run_serve)
    return parser


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        metavar="DIR|default",
        help="model folder, or 'default' (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port, 0 = any free (default: %(default)s)"
    )
    parser.add_argument(
        "--spool", type=Path, required=True, metavar="DIR", help="folder for job inputs, results and state"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    perf = parser.add_argument_group("speed and memory (docs/BENCHMARKS.md has the figures)")
    perf.add_argument(
        "--attention-backend",
        metavar="NAME",
        help="diffusers attention backend for the joint attention: native (default), _native_cudnn, flash, "
        "_flash_3, sage (8-bit, approximate), ...",
    )
    perf.add_argument(
        "--compile", action="store_true", help="torch.compile the repeated MoT block (the first job compiles)"
    )
    perf.add_argument(
        "--text-encoder-offload",
        choices=("none", "cpu", "swap"),
        default="none",
        help="cpu: the text encoder stays on the CPU and encodes there; swap: it visits the GPU only to encode "
        "(default: none)",
    )
    perf.add_argument(
        "--group-offload",
        type=int,
        metavar="BLOCKS",
        help="keep the transformer in CPU memory and bring BLOCKS MoT blocks at a time onto the device",
    )
    perf.add_argument(
        "--offload-to-disk", metavar="DIR", help="with --group-offload: page the blocks from files in DIR"
    )
    perf.add_argument(
        "--offload-stream",
        action="store_true",
        help="with --group-offload 1 on CUDA: prefetch the next block on a side stream",
    )
    perf.add_argument(
        "--model-cpu-offload", action="store_true", help="whole components visit the device one at a time"
    )
    perf.add_argument("--vae-tiling", action="store_true", help="encode and decode the Wan VAE in tiles")
    parser.add_argument(
        "--allow-root",
        dest="allowed_roots",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="folder under which clients may send frames by path (repeatable; default: none)",
    )
    parser.add_argument(
        "--queue-size", type=int, default=DEFAULT_QUEUE, help="jobs that may wait (default: %(default)s)"
    )
    parser.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_RETENTION_HOURS,
        help="keep finished jobs' results this long (default: %(default)s)",
    )
    parser.add_argument(
        "--preview-interval", type=float, default=1.0, help="seconds between previews (default: %(default)s)"
    )
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE", help="file with accepted bearer tokens, one per line"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="PEM certificate chain for TLS")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="PEM private key for TLS")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without token and TLS (not advised)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")


def memory_options(args: argparse.Namespace) -> Any:
    """The serve flags as `vera_engine.memory.MemoryOptions`, or None when none is given (all on the device)."""
    from ..memory import MemoryOptions

    if args.group_offload is not None and args.group_offload < 1:
        raise ValueError(f"--group-offload {args.group_offload}: expected 1 or more MoT blocks at a time")
    if args.model_cpu_offload and (args.group_offload is not None or args.text_encoder_offload != "none"):
        raise ValueError(
            "--model-cpu-offload moves whole components itself: drop --group-offload / --text-encoder-offload"
        )
    if args.offload_to_disk and args.group_offload is None:
        raise ValueError("--offload-to-disk needs --group-offload BLOCKS")
    if args.offload_stream and args.group_offload is None:
        raise ValueError("--offload-stream needs --group-offload 1")
    options = MemoryOptions(
        text_encoder_offload=args.text_encoder_offload,
        group_offload="block" if args.group_offload is not None else None,
        num_blocks_per_group=args.group_offload if args.group_offload is not None else 1,
        use_stream=args.offload_stream,
        offload_to_disk=args.offload_to_disk,
        model_cpu_offload=args.model_cpu_offload,
        vae_tiling=args.vae_tiling,
    )
    return None if options == MemoryOptions() else options


def run_serve(args: argparse.Namespace) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code (2 for bad options)."""
    import sys

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        auth.check_bind_policy(args.host, args.token_file, args.tls_cert, args.tls_key, args.insecure)
        tokens = auth.read_tokens(args.token_file) if args.token_file else []
        for root in args.allowed_roots:
            if not root.is_dir():
                raise auth.PolicyError(f"--allow-root {root}: not a folder")
        if args.queue_size < 1:
            raise auth.PolicyError(f"--queue-size {args.queue_size}: expected at least 1")
        from .runner import PipelineRunner

        runner = PipelineRunner(
            args.model,
            device=args.device,
            memory=memory_options(args),
            attention_backend=args.attention_backend,
            compile_blocks=args.compile,
        )
    except (auth.PolicyError, ValueError, FileNotFoundError) as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        return 2
    if args.insecure and not auth.is_loopback(args.host):
        log.warning("--insecure: %s accepts unauthenticated plain-text connections", args.host)
    try:
        engine = Engine(
            args.spool,
            runner,
            queue_capacity=args.queue_size,
            allowed_roots=args.allowed_roots,
            retention_seconds=args.retention_hours * 3600,
            preview_interval=args.preview_interval,
        )
    except SpoolInUse as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        return 2
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        server, port = create_server(engine, args.host, args.port, tokens=tokens, tls=tls)
    except OSError as exc:
        print(f"vera-engine serve: error: {exc}", file=sys.stderr)
        engine.store.close()
        engine.spool.unlock()
        return 1
    engine.start()
    server.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # A machine-readable line: tests and wrappers that pass --port 0 read the port from it.
    print(f"vera-engine listening on {args.host}:{port}", flush=True)
    done.wait()
    log.info("shutting down")
    server.stop(grace=5.0).wait()
    engine.stop()
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """``vera-engine serve`` as a standalone entry point."""
    parser = argparse.ArgumentParser(
        prog="vera-engine serve", description="Run the Vera Edit engine service."
    )
    _serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
