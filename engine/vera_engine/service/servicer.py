"""The ``vera.v1.Engine`` gRPC servicer: each RPC mapped onto the :class:`~vera_engine.service.engine.Engine`
(streaming RPCs are generators), and :func:`create_server`, which adds health checking, reflection and
authentication.

Every RPC answers errors the same way (:func:`_answers_errors`): bad input is INVALID_ARGUMENT naming the field,
the other refusals carry their own codes, and an unexpected exception is INTERNAL (logged with its traceback)
while the engine keeps serving. Messages are capped, so a reply's metadata never outgrows gRPC's limit.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vera_engine.service import auth, reflection, rpc_guard, safe_files
from vera_engine.service.engine import CHUNK_BYTES, MAX_MESSAGE_BYTES, SERVICE_NAME, Engine
from vera_engine.service.errors import InputError, ResultRemoved, ServiceError
from vera_engine.service.limits import MAX_PAGE_SIZE, PAGE_BYTES, cap_message, quote
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

log = logging.getLogger("vera_engine.service")

DEFAULT_PORT = 50051


class RpcFailure(Exception):
    """An RPC's answer other than OK, decided here rather than in the engine core (whose refusals are the
    :class:`~vera_engine.service.errors.ServiceError` subclasses, each with its code)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _abort(context: grpc.ServicerContext, exc: Exception, rpc: str) -> NoReturn:
    if isinstance(exc, RpcFailure):
        code, message = exc.code, exc.message
    elif isinstance(exc, ServiceError):
        code, message = grpc.StatusCode[exc.code], exc.message
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"the engine's spool disk is full: {exc.strerror}"
    else:
        log.error("%s failed:\n%s", rpc, traceback.format_exc())
        code = grpc.StatusCode.INTERNAL
        # The exception's text may name the engine's own files: it stays in the log with the traceback.
        message = (
            f"the engine failed in {rpc} ({type(exc).__name__}); it keeps serving, the details are in its log"
        )
    context.abort(code, cap_message(message))
    raise AssertionError("unreachable")  # context.abort raises


def _answers_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an RPC (plain or generator) so that every exception becomes a status code with a capped message."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except grpc.RpcError:
                raise  # the call itself broke (client gone, message over a limit): gRPC has answered already
            except Exception as exc:
                _abort(context, exc, method.__name__)

        return streaming

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except grpc.RpcError:
            raise  # the request stream broke (client gone, message over a limit): gRPC has answered already
        except Exception as exc:
            _abort(context, exc, method.__name__)

    return unary


_PAGE_TOKEN = re.compile(r"(\d{1,18})\.(\d{1,10})")


def _page_token(after_seq: int, remaining: int) -> str:
    """Where the next ListJobs page starts: after job ``after_seq``, ``remaining`` jobs left of a ``limit`` (0: all)."""
    return f"{after_seq}.{remaining}"


def _parse_page_token(token: str) -> tuple[int, int]:
    match = _PAGE_TOKEN.fullmatch(token)
    if match is None:
        raise InputError(
            "page_token",
            f"{quote(token)} is not a token this engine issued; pass the previous reply's next_page_token, "
            "or nothing for the first page",
        )
    return int(match.group(1)), int(match.group(2))


def _chunks(requests: Iterator[pb.SubmitRequest]) -> Iterator[pb.FrameChunk]:
    """The FrameChunks of a Submit stream after its header; a second header or an empty message is refused."""
    for number, message in enumerate(requests, start=2):
        if message.HasField("header"):
            raise InputError(
                "header", f"sent twice (again in message {number}); only the first message is one"
            )
        if not message.HasField("chunk"):
            raise InputError(
                "chunk",
                f"message {number} is empty (neither header nor chunk); every message after the header carries a "
                "FrameChunk",
            )
        yield message.chunk


class EngineServicer(pb_grpc.EngineServicer):
    """The RPCs of vera.v1.Engine over an :class:`Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @_answers_errors
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.EngineInfo:
        """Engine, device, queue, limits and models with their options schema."""
        return self.engine.info()

    @_answers_errors
    def Submit(
        self, request_iterator: Iterator[pb.SubmitRequest], context: grpc.ServicerContext
    ) -> pb.SubmitResponse:
        """The header, then the frames' chunks, handed to :meth:`Engine.submit` as they arrive."""
        request_iterator = rpc_guard.idle_timeout(request_iterator, context)  # an idle upload holds no thread
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InputError("header", "the first message of a Submit stream must be the JobHeader")
        status = self.engine.submit(first.header, _chunks(request_iterator))
        return pb.SubmitResponse(job_id=status.job_id, status=status)

    @_answers_errors
    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.JobStatus]:
        """Yield the job's status whenever it changes, until it reaches a final state."""
        yield from self.engine.watch(request.job_id, previews=request.previews, active=context.is_active)

    @_answers_errors
    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.FetchChunk]:
        """Stream the result files of a finished job, chunk by chunk."""
        paths = self.engine.fetch_paths(request.job_id, list(request.files))
        for index, path in enumerate(paths):
            # A result name only, inside the job's output folder (fetch_paths' folder), no link followed
            # (safe_files); closed below, as the generator may be abandoned.
            try:
                handle = safe_files.open_result(path.parent, path.name)
            except FileNotFoundError:
                raise ResultRemoved(f"result {path.name} of job {request.job_id} was removed") from None
            with handle:
                size = os.fstat(handle.fileno()).st_size
                offset = 0
                while True:
                    data = handle.read(CHUNK_BYTES)
                    yield pb.FetchChunk(
                        file_name=path.name,
                        file_size=size,
                        offset=offset,
                        data=data,
                        file_index=index,
                        file_count=len(paths),
                    )
                    offset += len(data)
                    if offset >= size or not data:
                        break

    @_answers_errors
    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        """Cancel a queued job at once or a running one within a step; answers with the job's new status.

        A job that already ended is FAILED_PRECONDITION (the proto's convention), with its state in the message.
        """
        return self.engine.cancel(request.job_id, active=context.is_active)

    @_answers_errors
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        """The known jobs in submission order, a page at a time (at most MAX_PAGE_SIZE jobs and ~PAGE_BYTES)."""
        store, states = self.engine.store, list(request.states)
        page_size = min(request.page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
        if request.page_token:
            after_seq, remaining = _parse_page_token(request.page_token)
        else:
            # `limit` keeps the newest jobs: start just before the limit-th newest, then page forwards.
            remaining = request.limit
            after_seq = max(store.newest_seq(states, request.limit) - 1, 0) if request.limit else 0
        wanted = min(page_size, remaining) if remaining else page_size
        records = store.page(states, after_seq, wanted + 1)  # one more than wanted: is there a next page?
        more = len(records) > wanted
        response = pb.ListJobsResponse()
        used = 0
        for record in records[:wanted]:
            status = self.engine.status_of(record)
            size = status.ByteSize()
            if response.jobs and used + size > PAGE_BYTES:
                more = True  # the byte budget ends the page early: replies stay well under 4 MiB
                break
            response.jobs.append(status)
            used += size
            after_seq = record.seq
        if remaining:
            remaining -= len(response.jobs)
            more = more and remaining > 0
        if more:
            response.next_page_token = _page_token(after_seq, remaining)
        return response


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

    interceptors: list[grpc.ServerInterceptor] = [auth.TokenInterceptor(tokens)] if tokens else []
    interceptors.append(rpc_guard.StreamCaps())  # no client takes every thread with idle streams
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vera-rpc"),
        interceptors=interceptors,
        # Watch streams hold a thread each: past the pool size, answer RESOURCE_EXHAUSTED instead of queueing.
        maximum_concurrent_rpcs=max_workers,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # grpcio sets SO_REUSEPORT by default: a second engine on the same port would bind too, and clients
            # would be split at random between the two. One engine per port.
            ("grpc.so_reuseport", 0),
            *rpc_guard.SERVER_OPTIONS,  # keepalive and maximum connection age
        ],
    )
    pb_grpc.add_EngineServicer_to_server(EngineServicer(engine), server)
    health_pb2_grpc.add_HealthServicer_to_server(engine.health, server)
    reflection.enable(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, auth.server_credentials(*tls))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if not bound:
        raise OSError(
            f"cannot listen on {address}: the port is in use (another engine? `vera info --engine {host}:{port}` "
            "asks) or the address is not this machine's; stop that process or choose another --port"
        )
    return server, bound


# ---------------------------------------------------------------------------------------------------------
# vera-engine serve
