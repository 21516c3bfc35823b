"""``EngineClient``: the TD-facing Python API of a Vera Edit engine (gRPC, ``vera.v1.Engine``).

Needs only grpcio and protobuf; numpy is imported only by :meth:`EngineClient.submit_arrays`.

>>> from vera_plugin.client import EngineClient
>>> with EngineClient("127.0.0.1:50051") as engine:
...     job = engine.submit_files("/shots/sh010/plate.####.exr", range(1001, 1101),
...                               prompt="add a red ball rolling left to right")
...     final = engine.wait(job, callback=lambda s: print(s.stage_detail, s.step, s.total_steps))
...     files = engine.fetch(job, "/shots/sh010/vera")
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from vera_plugin.address import DEFAULT_ADDRESS, explain_failure
from vera_plugin.cache import take_and_frame
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_ADDRESS",
    "FINAL_STATES",
    "EngineClient",
    "EngineError",
    "check_job_id",
    "format_frames",
    "frame_path",
    "parse_frames",
    "sequence_files",
    "state_name",
]

CHUNK_BYTES = 3 * 1024 * 1024  # under gRPC's default 4 MiB limit, so any client can receive Fetch chunks
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
FINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})

# What a Vera engine's job ids look like (uuid4().hex, servicer.py). Ids become folder names, Nuke knob values and
# Resolve bin names on the host: anything else an engine answers is refused here, the one place every host passes.
JOB_ID = re.compile(r"[0-9a-f]{32}")

# JobHeader fields a caller may pass as options (the contract's own list, so a new field needs no change here).
_HEADER_FIELDS = {field.name for field in pb.JobHeader.DESCRIPTOR.fields} - {"prompt", "frames", "has_mask"}


class EngineError(Exception):
    """A call to the engine failed. ``code`` is the gRPC status name (e.g. ``"INVALID_ARGUMENT"``)."""

    def __init__(self, code: str, details: str, address: str = "") -> None:
        where = f" ({address})" if address else ""
        super().__init__(f"{code}: {details}{where}")
        self.code = code
        self.details = details
        self.address = address


def check_job_id(job_id: object) -> str:
    """``job_id`` if it is a Vera job id (32 lower-case hexadecimal characters), else :class:`EngineError`.

    For ids the engine sends: one that fails this check is an engine that lies (INTERNAL). Ids a caller passes
    go to the engine as they are (it answers NOT_FOUND); what comes back about them is checked.
    """
    if isinstance(job_id, str) and JOB_ID.fullmatch(job_id):
        return job_id
    raise EngineError(
        "INTERNAL",
        f"the engine answered the job id {repr(job_id)[:80]}, which is not 32 lower-case hexadecimal characters; "
        "refusing it (a Vera engine never sends such an id: check what listens at this address)",
    )


def _is_loopback_address(address: str) -> bool:
    """True when a gRPC target names this machine: 127.0.0.0/8, ::1, localhost or a unix socket."""
    import ipaddress

    target = address
    for scheme in ("unix:", "unix-abstract:"):
        if target.startswith(scheme):
            return True
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    if target.startswith("["):  # [::1]:50051
        host = target[1 : target.find("]")] if "]" in target else target
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target  # a bare host, or a bare IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def state_name(state: int) -> str:
    """``JOB_STATE_SUCCEEDED`` -> ``"succeeded"``."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


# ---------------------------------------------------------------------------------------------------------
# Sequences and frame ranges (no OpenImageIO on the host: the engine decodes the EXRs)

_TOKEN = re.compile(r"%0?(\d*)d|#+|@+")


def frame_path(pattern: str, frame: int) -> str:
    """The file of ``frame`` in ``pattern``: ``plate.####.exr``, ``plate.@@@@.exr`` or ``plate.%04d.exr``."""
    head, name = os.path.split(pattern)
    hits = list(_TOKEN.finditer(name))
    if len(hits) != 1:
        raise ValueError(
            f"sequence pattern {pattern!r} must contain exactly one frame token "
            f"(e.g. 'plate.####.exr' or 'plate.%04d.exr'); found {len(hits)}"
        )
    token = hits[0]
    pad = int(token.group(1) or 1) if token.group(0).startswith("%") else len(token.group(0))
    # printf's %0Nd, as Nuke, oiiotool and Resolve write sequences: the sign counts in the width (-2 -> -002).
    number = f"{frame:0{pad}d}"
    return os.path.join(head, name[: token.start()] + number + name[token.end() :])


def sequence_files(
    source: str | Sequence[str | os.PathLike[str]], frames: Sequence[int], what: str
) -> list[str]:
    """The file of each frame: ``source`` is a pattern (``plate.####.exr``) or one path per frame.

    Raises FileNotFoundError naming how many frames are missing and the first one (``what``: "plate", "mask").
    """
    if isinstance(source, (str, os.PathLike)):
        paths = [frame_path(os.fspath(source), f) for f in frames]
    else:
        paths = [os.fspath(p) for p in source]
        if len(paths) != len(frames):
            raise ValueError(f"{what}: {len(paths)} files for {len(frames)} frames; pass one file per frame")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(paths)} frames missing, first {missing[0]}; "
            "render them or choose a frame range that exists"
        )
    return paths


def parse_frames(text: str) -> list[int]:
    """``"1001-1100"``, ``"1001"`` or ``"1,3,10-12"`` -> the frame numbers, in order, each once."""
    frames: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise ValueError(f"frame range {text!r}: {part!r} is not N or A-B (e.g. 1001-1100 or 1,3,5-9)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"frame range {text!r}: {part!r} ends before it starts")
        frames.extend(range(first, last + 1))
    if len(set(frames)) != len(frames):
        raise ValueError(f"frame range {text!r} lists a frame more than once")
    return frames


def format_frames(frames: Sequence[int]) -> str:
    """The inverse of :func:`parse_frames`, compact: ``[1,2,3,7]`` -> ``"1-3,7"``."""
    parts: list[str] = []
    i = 0
    while i < len(frames):
        j = i
        while j + 1 < len(frames) and frames[j + 1] == frames[j] + 1:
            j += 1
        parts.append(str(frames[i]) if i == j else f"{frames[i]}-{frames[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Health checking without grpcio-health-checking: the two tiny messages are encoded by hand.

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _encode_health_request(service: str) -> bytes:
    data = service.encode()
    if len(data) > 127:
        raise ValueError("service name too long")
    return (b"\x0a" + bytes([len(data)]) + data) if data else b""


def _decode_health_response(data: bytes) -> str:
    # HealthCheckResponse { ServingStatus status = 1; }: tag 0x08 then a one-byte varint.
    if len(data) >= 2 and data[0] == 0x08:
        return _HEALTH_STATUS.get(data[1], "UNKNOWN")
    return "UNKNOWN"


# ---------------------------------------------------------------------------------------------------------


class EngineClient:
    """A connection to one engine. Thread-safe; close it (or use ``with``) when done.

    ``token`` / ``token_file``: bearer token for engines started with ``--token-file``. ``tls=True`` (implied
    by ``ca_cert``) uses TLS, verifying the engine against ``ca_cert`` (PEM) or the system roots.
    ``timeout`` bounds the unary calls (GetInfo, Cancel, ListJobs), not uploads, watches or downloads.

    A token is never sent in plain text to another machine: without TLS, a token and a non-loopback address are
    refused (ValueError) unless ``allow_plaintext_token=True`` (a network trusted as a whole). Whatever the engine
    answers is checked before a host sees it: job ids (:func:`check_job_id`), result names, what Fetch writes
    (docs/SECURITY.md).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: bool = False,
        ca_cert: str | os.PathLike[str] | None = None,
        server_name: str | None = None,
        timeout: float | None = 30.0,
        chunk_bytes: int = CHUNK_BYTES,
        allow_plaintext_token: bool = False,
    ) -> None:
        if token is None and token_file is not None:
            lines = [ln.strip() for ln in Path(token_file).read_text().splitlines()]
            tokens = [ln for ln in lines if ln and not ln.startswith("#")]
            if not tokens:
                raise ValueError(f"token file {token_file}: contains no token")
            token = tokens[0]
        secure = tls or ca_cert is not None
        if token and not secure and not allow_plaintext_token and not _is_loopback_address(address):
            # A bearer token in plain text can be read by anyone on the path and replayed against the engine.
            raise ValueError(
                f"refusing to send the token to {address} without TLS (anyone on the network could read it); "
                "connect with TLS (tls=True or ca_cert=..., `vera --tls` or `--ca-cert`, $VERA_CA_CERT), or "
                "reach the engine through 127.0.0.1 (an SSH tunnel), or pass allow_plaintext_token=True where "
                "the network itself is trusted"
            )
        if not 0 < chunk_bytes <= MAX_MESSAGE_BYTES // 2:
            raise ValueError(f"chunk_bytes={chunk_bytes}; expected 1..{MAX_MESSAGE_BYTES // 2}")
        self.address = address
        self.timeout = timeout
        self.uses_tls = tls or ca_cert is not None
        self.server_name = server_name
        self.chunk_bytes = chunk_bytes
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Reconnect quickly after an engine restart (gRPC's default backoff grows to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if secure:
            roots = Path(ca_cert).read_bytes() if ca_cert is not None else None
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.EngineStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, exc: grpc.RpcError) -> EngineError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        name = code.name if code is not None else "UNKNOWN"
        # gRPC's own text ("failed to connect to all addresses; last error: ...") says little to a person: an
        # untrusted certificate or a refused token is said as such, with gRPC's words kept after it.
        details = explain_failure(
            name,
            details,
            self.address,
            tls=self.uses_tls,
            token_sent=bool(self._metadata),
            server_name=self.server_name,
        )
        return EngineError(name, details, self.address)

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    # -- queries -------------------------------------------------------------------------------------------

    def health(self, service: str = "") -> str:
        """The engine's health: ``"SERVING"`` once its model is loaded, ``"NOT_SERVING"`` before."""
        check = self._channel.unary_unary(
            _HEALTH_CHECK, request_serializer=lambda s: _encode_health_request(s), response_deserializer=None
        )
        try:
            return _decode_health_response(check(service, timeout=self.timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until the engine answers SERVING (model loaded); EngineError on timeout."""
        import time

        deadline = time.monotonic() + timeout
        last = "UNAVAILABLE"
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if last == "SERVING":
                    return
            except EngineError as exc:
                last = exc.code
            time.sleep(0.1)
        raise EngineError(
            "DEADLINE_EXCEEDED", f"engine not serving after {timeout:g}s (last: {last})", self.address
        )

    def info(self) -> pb.EngineInfo:
        """Engine version, device, queue and the models with their options schema."""
        return self._unary(self._stub.GetInfo, pb.GetInfoRequest())

    def list_jobs(self, states: Iterable[int | str] = (), limit: int = 0) -> list[pb.JobStatus]:
        """Jobs known to the engine, in submission order; ``states`` like ``["queued", "running"]``.

        ``limit``: only the newest that many (0: all). The engine answers a page at a time; this follows the pages.
        """
        wanted = [s if isinstance(s, int) else pb.JobState.Value("JOB_STATE_" + s.upper()) for s in states]
        request = pb.ListJobsRequest(states=wanted, limit=limit)
        jobs: list[pb.JobStatus] = []
        while True:
            reply = self._unary(self._stub.ListJobs, request)
            jobs.extend(self._checked(status) for status in reply.jobs)
            if not reply.next_page_token:
                return jobs
            request.page_token = reply.next_page_token

    def _checked(self, status: pb.JobStatus, job_id: str | None = None) -> pb.JobStatus:
        """``status`` once its job id and result names are what a Vera engine sends (EngineError otherwise).

        ``job_id``: the job asked about, which the status must be about.
        """
        check_job_id(status.job_id)
        if job_id is not None and status.job_id != job_id:
            raise EngineError(
                "INTERNAL",
                f"asked about job {job_id}, the engine answered about {status.job_id}",
                self.address,
            )
        bad = [name for name in status.output_files if take_and_frame(name) is None]
        if bad:
            raise EngineError(
                "INTERNAL",
                f"job {status.job_id}: the engine lists the result {bad[0][:80]!r}, which is not a Vera result name "
                "(vera_edit[_take<k>].<frame>.exr); refusing it",
                self.address,
            )
        return status

    def status(self, job_id: str) -> pb.JobStatus:
        """The current status of one job."""
        for status in self.watch(job_id):
            return status
        raise EngineError("NOT_FOUND", f"job {job_id!r}: no status", self.address)

    def cancel(self, job_id: str, *, ended_ok: bool = False) -> pb.JobStatus:
        """Cancel a job; returns its status: CANCELLED, or RUNNING with ``cancel_requested`` until it stops.

        A job that already ended is an EngineError (FAILED_PRECONDITION), unless ``ended_ok``: then its final
        status is returned (for a UI whose cancel may cross the job's end).
        """
        try:
            return self._checked(self._unary(self._stub.Cancel, pb.CancelRequest(job_id=job_id)), job_id)
        except EngineError as exc:
            if ended_ok and exc.code == "FAILED_PRECONDITION":
                return self.status(job_id)
            raise

    # -- submitting ----------------------------------------------------------------------------------------

    def _header(
        self, prompt: str, frames: Sequence[int], has_mask: bool, options: dict[str, Any]
    ) -> pb.JobHeader:
        unknown = set(options) - _HEADER_FIELDS
        if unknown:
            raise TypeError(f"unknown job options {sorted(unknown)}; known: {sorted(_HEADER_FIELDS)}")
        fields = {k: v for k, v in options.items() if v is not None}
        fields.setdefault("submitted_by", f"{getpass.getuser()}@{socket.gethostname()}")
        return pb.JobHeader(prompt=prompt, frames=[int(f) for f in frames], has_mask=has_mask, **fields)

    def _chunks(
        self, layer: int, frame: int, data: memoryview | bytes, **first: Any
    ) -> Iterator[pb.SubmitRequest]:
        total = len(data)
        for offset in range(0, total, self.chunk_bytes):
            extra = first if offset == 0 else {}
            chunk = pb.FrameChunk(
                layer=layer,
                frame=frame,
                total_size=total,
                offset=offset,
                data=bytes(data[offset : offset + self.chunk_bytes]),
                **extra,
            )
            yield pb.SubmitRequest(chunk=chunk)

    def _file_chunks(self, layer: int, frame: int, path: str) -> Iterator[pb.SubmitRequest]:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            offset = 0
            while offset < size:
                data = handle.read(self.chunk_bytes)
                if not data:
                    raise OSError(f"{path}: file shrank while it was being sent")
                chunk = pb.FrameChunk(layer=layer, frame=frame, total_size=size, offset=offset, data=data)
                if offset == 0:
                    chunk.encoding = pb.ENCODING_EXR
                offset += len(data)
                yield pb.SubmitRequest(chunk=chunk)

    def submit(self, header: pb.JobHeader, requests: Iterable[pb.SubmitRequest]) -> pb.SubmitResponse:
        """Low level: stream ``header`` then ``requests`` (FrameChunks). Most callers want submit_files/arrays."""

        def stream() -> Iterator[pb.SubmitRequest]:
            yield pb.SubmitRequest(header=header)
            yield from requests

        try:
            reply = self._stub.Submit(stream(), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        check_job_id(reply.job_id)
        return reply

    def submit_files(
        self,
        plate: str | Sequence[str | os.PathLike[str]],
        frames: Iterable[int],
        *,
        prompt: str,
        mask: str | Sequence[str | os.PathLike[str]] | None = None,
        send_paths: bool = False,
        progress: Callable[[int, int, int, int], None] | None = None,
        **options: Any,
    ) -> str:
        """Submit an EXR sequence; returns the job id.

        ``plate`` (and ``mask``) is a pattern (``plate.####.exr``, ``plate.%04d.exr``) or one path per frame.
        ``send_paths=True`` sends absolute paths instead of bytes, for engines that share the storage (the
        paths must lie under the engine's allowed roots). ``options`` are JobHeader fields: task,
        negative_prompt, seed, steps, guidance, model, colorspace, bit_depth, compression, hdr, name.
        ``progress(files_sent, files_total, bytes_sent, bytes_total)`` is called as each file has been handed
        to gRPC (plate and mask files together; bytes are 0 with ``send_paths``).
        """
        frame_list = [int(f) for f in frames]
        plate_paths = sequence_files(plate, frame_list, "plate")
        mask_paths = sequence_files(mask, frame_list, "mask") if mask is not None else None
        header = self._header(prompt, frame_list, mask_paths is not None, options)
        layers = [(pb.LAYER_PLATE, plate_paths)] + ([(pb.LAYER_MASK, mask_paths)] if mask_paths else [])
        files_total = sum(len(paths) for _layer, paths in layers)
        bytes_total = 0 if send_paths else sum(os.path.getsize(p) for _layer, paths in layers for p in paths)

        def frames_stream() -> Iterator[pb.SubmitRequest]:
            files_sent = bytes_sent = 0
            for layer, paths in layers:
                for frame, path in zip(frame_list, paths, strict=True):
                    if send_paths:
                        chunk = pb.FrameChunk(
                            layer=layer, frame=frame, encoding=pb.ENCODING_PATH, path=os.path.abspath(path)
                        )
                        yield pb.SubmitRequest(chunk=chunk)
                    else:
                        for request in self._file_chunks(layer, frame, path):
                            bytes_sent += len(request.chunk.data)
                            yield request
                    files_sent += 1
                    if progress is not None:
                        progress(files_sent, files_total, bytes_sent, bytes_total)

        return self.submit(header, frames_stream()).job_id

    def submit_arrays(
        self,
        plate: Any,
        frames: Iterable[int] | None = None,
        *,
        prompt: str,
        mask: Any = None,
        **options: Any,
    ) -> str:
        """Submit a plate held in memory: ``plate`` (F, H, W, 3|4) float32/float16 numpy array in the
        declared scene-linear colour space, ``mask`` (F, H, W) or (F, H, W, 1); returns the job id.

        ``frames`` are the plate's frame numbers (default 1..F). Needs numpy.
        """
        import numpy as np

        plate = np.asarray(plate)
        if plate.ndim != 4 or plate.shape[-1] not in (3, 4):
            raise ValueError(f"plate has shape {plate.shape}; expected (frames, height, width, 3 or 4)")
        frame_list = list(range(1, len(plate) + 1)) if frames is None else [int(f) for f in frames]
        if len(frame_list) != len(plate):
            raise ValueError(f"{len(frame_list)} frame numbers for a plate of {len(plate)} frames")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim == 3:
                mask = mask[..., None]
            if mask.shape[:3] != plate.shape[:3] or mask.shape[-1] != 1:
                raise ValueError(f"mask has shape {mask.shape}; expected {plate.shape[:3]} like the plate")
        header = self._header(prompt, frame_list, mask is not None, options)

        def raw(array: Any) -> tuple[memoryview, pb.RawFormat]:
            half = array.dtype == np.float16
            data = np.ascontiguousarray(array, dtype="<f2" if half else "<f4")
            fmt = pb.RawFormat(
                width=data.shape[1],
                height=data.shape[0],
                channels=data.shape[2],
                sample_type=pb.SAMPLE_TYPE_FLOAT16 if half else pb.SAMPLE_TYPE_FLOAT32,
            )
            return data.data.cast("B"), fmt

        def frames_stream() -> Iterator[pb.SubmitRequest]:
            layers = [(pb.LAYER_PLATE, plate)] + ([(pb.LAYER_MASK, mask)] if mask is not None else [])
            for layer, video in layers:
                for i, frame in enumerate(frame_list):
                    data, fmt = raw(video[i])
                    yield from self._chunks(layer, frame, data, encoding=pb.ENCODING_RAW, raw=fmt)

        return self.submit(header, frames_stream()).job_id

    # -- following and fetching ----------------------------------------------------------------------------

    def watch(self, job_id: str, *, previews: bool = False) -> Iterator[pb.JobStatus]:
        """Iterate over the job's status updates until it reaches a final state."""
        try:
            for status in self._stub.Watch(
                pb.WatchRequest(job_id=job_id, previews=previews), metadata=self._metadata
            ):
                yield self._checked(status, job_id)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def wait(
        self,
        job_id: str,
        callback: Callable[[pb.JobStatus], None] | None = None,
        *,
        previews: bool = False,
        reconnect_seconds: float = 120.0,
    ) -> pb.JobStatus:
        """Block until the job finishes, calling ``callback(status)`` on every update; returns the final status.

        Jobs survive engine restarts, so a dropped connection is retried for up to ``reconnect_seconds``
        (the engine resumes the job when it comes back); only then does the EngineError propagate.
        """
        import time

        last: pb.JobStatus | None = None
        lost_since: float | None = None
        while True:
            try:
                for status in self.watch(job_id, previews=previews):
                    lost_since = None
                    last = status
                    if callback is not None:
                        callback(status)
            except EngineError as exc:
                if exc.code not in ("UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN"):
                    raise
                now = time.monotonic()
                lost_since = now if lost_since is None else lost_since
                if now - lost_since > reconnect_seconds:
                    raise
                time.sleep(0.5)
                continue
            if last is not None and last.state in FINAL_STATES:
                return last
            raise EngineError(
                "UNAVAILABLE", f"job {job_id}: the watch ended before the job finished", self.address
            )

    def fetch(
        self,
        job_id: str,
        out_dir: str | os.PathLike[str],
        *,
        files: Sequence[str] = (),
        progress: Callable[[int, int, str], None] | None = None,
    ) -> list[Path]:
        """Download a finished job's results into ``out_dir`` (created); returns the files written.

        Each file appears atomically (written as ``.part``, then renamed). ``progress(index, count, name)`` is
        called as each file completes. Only the files the job's status lists are accepted, and only under Vera's
        result names (``vera_edit[_take<k>].<frame>.exr``): an engine cannot write anywhere else in ``out_dir``,
        let alone outside it.
        """
        for name in files:
            if take_and_frame(name) is None:
                raise ValueError(
                    f"files: {name[:80]!r} is not a Vera result name (vera_edit[_take<k>].<frame>.exr)"
                )
        listed = set(self.status(job_id).output_files)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        handle: int | None = None
        part: Path | None = None
        current = ""
        size = 0
        try:
            for chunk in self._stub.Fetch(
                pb.FetchRequest(job_id=job_id, files=files), metadata=self._metadata
            ):
                if chunk.file_name != current or handle is None:
                    current = chunk.file_name
                    if current not in listed or take_and_frame(current) is None:
                        raise EngineError(
                            "INTERNAL",
                            f"the engine sent the file {current[:80]!r}, which is not one of job {job_id}'s "
                            "results as its status lists them; refusing it",
                            self.address,
                        )
                    part = out / (current + ".part")
                    handle, size = _create_part(part), 0
                assert part is not None
                if chunk.offset != size:
                    raise EngineError("DATA_LOSS", f"{current}: chunk at {chunk.offset}, expected {size}")
                if size + len(chunk.data) > chunk.file_size:
                    raise EngineError(
                        "DATA_LOSS", f"{current}: more data than its declared size {chunk.file_size}"
                    )
                os.write(handle, chunk.data)
                size += len(chunk.data)
                if size == chunk.file_size:
                    os.close(handle)
                    handle = None
                    final = out / current
                    os.replace(part, final)
                    written.append(final)
                    if progress is not None:
                        progress(chunk.file_index + 1, chunk.file_count, current)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            if handle is not None:
                os.close(handle)
                if part is not None:
                    part.unlink(missing_ok=True)
        return written


def _create_part(part: Path) -> int:
    """A new, empty ``.part`` file for writing, never through a link someone left in its place.

    A stale ``.part`` (an interrupted fetch) is removed first; ``unlink`` removes a symlink itself, not its
    target, and ``O_EXCL | O_NOFOLLOW`` refuse a name that reappears in between.
    """
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.open(part, flags, 0o666)
