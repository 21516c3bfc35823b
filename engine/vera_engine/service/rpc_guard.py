"""Keeping one client from exhausting the engine's RPC threads: per-client stream caps, an upload idle timeout,
keepalive and a maximum connection age.

Every RPC holds one of the server's threads while it runs, and Submit, Watch and Fetch are streams that can last
as long as the client likes. Without caps, one client opening idle Submit or Watch streams takes every thread
and ``GetInfo`` answers RESOURCE_EXHAUSTED to everyone. So:

* :class:`StreamCaps` admits at most :data:`STREAMS_PER_CLIENT` streams per client address and
  :data:`STREAMS_TOTAL` in all, leaving threads for the short calls (GetInfo, Cancel, ListJobs, health checks);
* :func:`idle_timeout` cancels a Submit stream that sends nothing for :data:`UPLOAD_IDLE_SECONDS`;
* :data:`SERVER_OPTIONS` make gRPC ping idle connections (a vanished peer's streams end) and close connections
  after :data:`MAX_CONNECTION_AGE_SECONDS` (clients reconnect; ``EngineClient.wait`` resumes its watch).

A client address is its IP: every local user of a loopback engine counts as one client (docs/SECURITY.md).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

log = logging.getLogger("vera_engine.service")

STREAMS_PER_CLIENT = 16  # concurrent Submit/Watch/Fetch streams of one client address
STREAMS_TOTAL = 48  # of the server's 64 threads: 16 stay for short calls whatever the streams do
UPLOAD_IDLE_SECONDS = 300.0  # a Submit stream with no message for this long is cancelled
KEEPALIVE_SECONDS = 60  # ping a connection idle this long...
KEEPALIVE_TIMEOUT_SECONDS = 20  # ...and drop it (with its streams) if the ping is not answered in this time
MAX_CONNECTION_AGE_SECONDS = 24 * 3600  # then the server asks the client to reconnect (GOAWAY)...
MAX_CONNECTION_AGE_GRACE_SECONDS = 3600  # ...letting calls in flight finish for up to this long

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients may ping as often as every 10 s (EngineClient does not ping; others may) without being cut off.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_SECONDS * 1000),
    ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_SECONDS * 1000),
]
"""gRPC server options for keepalive and connection age (add them to ``grpc.server(options=...)``)."""

T = TypeVar("T")


def client_of(peer: str) -> str:
    """The client address of a gRPC peer string, without its port: ``ipv4:10.0.0.5:41234`` -> ``ipv4:10.0.0.5``."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer  # unix sockets and others: the whole string


class StreamCaps(grpc.ServerInterceptor):
    """Refuses a streaming call (RESOURCE_EXHAUSTED) past ``per_client`` streams of its client or ``total`` in all."""

    def __init__(self, per_client: int = STREAMS_PER_CLIENT, total: int = STREAMS_TOTAL) -> None:
        self.per_client, self.total = per_client, total
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def open_streams(self) -> dict[str, int]:
        """Streams open now, by client address."""
        with self._lock:
            return {k: v for k, v in self._open.items() if v}

    def _enter(self, context: grpc.ServicerContext) -> str:
        client = client_of(context.peer())
        with self._lock:
            mine, everyone = self._open[client], sum(self._open.values())
            if mine < self.per_client and everyone < self.total:
                self._open[client] += 1
                return client
        if mine >= self.per_client:
            message = (
                f"this client already has {mine} open streams (Submit, Watch, Fetch), the most one client may hold; "
                "close some (finish or cancel uploads, stop watches) and retry"
            )
        else:
            message = f"the engine serves {everyone} streams already, its most; retry in a moment"
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        raise AssertionError("abort returns by raising")  # pragma: no cover

    def _leave(self, client: str) -> None:
        with self._lock:
            self._open[client] -= 1

    def _counted(self, behaviour: Callable[[Any, grpc.ServicerContext], T]) -> Callable[..., T]:
        def call(request: Any, context: grpc.ServicerContext) -> T:
            client = self._enter(context)
            try:
                return behaviour(request, context)
            finally:
                self._leave(client)

        return call

    def _counted_stream(
        self, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[T]]
    ) -> Callable[..., Iterator[T]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[T]:
            client = self._enter(context)
            try:
                yield from behaviour(request, context)
            finally:
                self._leave(client)

        return call

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Count the streaming calls; pass the others through untouched."""
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._counted_stream(handler.stream_stream), **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._counted(handler.stream_unary), **kw)
        return grpc.unary_stream_rpc_method_handler(self._counted_stream(handler.unary_stream), **kw)


def idle_timeout(
    requests: Iterator[T], context: grpc.ServicerContext, seconds: float | None = None
) -> Iterator[T]:
    """``requests`` that cancel the call when the client sends nothing for ``seconds`` (an idle upload).

    The stream's thread is blocked reading, so a timer cancels the call; the read then fails and the servicer
    discards the upload as for any broken stream.
    """
    limit = UPLOAD_IDLE_SECONDS if seconds is None else seconds
    timer: threading.Timer | None = None

    def expire() -> None:
        log.warning("Submit from %s sent nothing for %g s: cancelled", context.peer(), limit)
        context.cancel()

    try:
        while True:
            timer = threading.Timer(limit, expire)
            timer.daemon = True
            timer.start()
            try:
                message = next(requests)
            except StopIteration:
                return
            finally:
                timer.cancel()
            yield message
    finally:
        if timer is not None:
            timer.cancel()
