"""One Generate, host-neutral: submit a rendered EXR sequence, follow the job, fetch results into the cache.

Hosts (the Nuke node, the Qt panel) render their input, fill a :class:`GenerateRequest` on their main
thread, then call :func:`run_generate` on a worker thread with a :class:`ProgressSink` of their own (Nuke's
``ProgressTask``, a Qt signal). Cancelling the sink cancels the job on the engine. Failures raise
:class:`GenerateError` whose message a person can act on (never a bare traceback).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vera_plugin.cache import CachedResult, find_takes, job_dir, take_and_frame
from vera_plugin.client import EngineClient, EngineError, state_name
from vera_plugin.connection import connection_settings
from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = [
    "GenerateCancelled",
    "GenerateError",
    "GenerateRequest",
    "GenerateResult",
    "ProgressSink",
    "check_final",
    "client_options_from_env",
    "describe_engine_error",
    "follow_job",
    "result_names",
    "run_generate",
    "status_text",
]


class GenerateError(RuntimeError):
    """Generate failed; the message says why and what to do."""


class GenerateCancelled(GenerateError):
    """The artist cancelled; the job was cancelled on the engine too."""


class ProgressSink(Protocol):
    """Where progress goes: ``update(fraction 0..1, message)``; ``cancelled()`` is polled several times a second."""

    def update(self, fraction: float, message: str) -> None:
        """Show progress."""

    def cancelled(self) -> bool:
        """True once the artist asked to cancel."""


def client_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``EngineClient`` keyword arguments from the environment, read as every Vera client reads them
    (:mod:`vera_plugin.connection`): ``$VERA_TOKEN_FILE``, ``$VERA_CA_CERT``, ``$VERA_TLS``, ``$VERA_SERVER_NAME``."""
    return connection_settings(env=env).client_options()


@dataclass
class GenerateRequest:
    """Everything a worker thread needs; filled on the host's main thread."""

    address: str
    prompt: str
    options: dict[str, Any]
    frames: list[int]
    plate: str  # EXR sequence pattern, e.g. /tmp/x/src.####.exr
    cache_root: Path
    mask: str | None = None
    previews: bool = False
    client_options: dict[str, Any] = field(default_factory=client_options_from_env)


@dataclass
class GenerateResult:
    """A finished Generate: the job, the seed used (of take 1) and the cached result files of every take."""

    job_id: str
    seed: int
    takes: dict[int, CachedResult]
    final: pb.JobStatus

    @property
    def result(self) -> CachedResult:
        """Take 1 (the only take unless the job asked for more)."""
        return self.takes[1]


def describe_engine_error(error: EngineError, address: str) -> str:
    """An engine error as a sentence saying what happened and what to do."""
    if error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (
            f"Cannot reach the Vera engine at {address} ({error.details or error.code}). Start it on that "
            "machine with `vera-engine serve --model <folder>`, or give the right engine address ($VERA_ENGINE)."
        )
    if error.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return f"The Vera engine at {address} refused the token ({error.details}); set $VERA_TOKEN_FILE to the engine's token file."
    if error.code == "RESOURCE_EXHAUSTED":
        return f"The Vera engine at {address} has a full queue ({error.details}); try again later."
    if error.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"):
        return f"The Vera engine rejected the job: {error.details}"
    if error.code == "NOT_FOUND":
        return f"The Vera engine at {address} does not know this job ({error.details}); Generate again."
    return f"Vera engine error at {address}: {error.code}: {error.details}"


def status_text(status: pb.JobStatus) -> str:
    """A one-line description of a job status, for status knobs and job lists."""
    state = state_name(status.state)
    if status.state == pb.JOB_STATE_QUEUED:
        return f"queued, {status.queue_position} ahead"
    if status.state == pb.JOB_STATE_RUNNING:
        text = f"{status.stage_detail or 'running'}"
        if status.total_steps:
            text += f" step {status.step}/{status.total_steps}"
        if status.HasField("eta_seconds"):
            text += f", about {status.eta_seconds:.0f}s left"
        return text
    if status.state == pb.JOB_STATE_FAILED:
        return f"failed: {status.error}"
    return state


class _StopFollowing(Exception):
    """Raised inside the watch callback to leave the stream (the follower was told to stop, not to cancel)."""


def follow_job(
    client: EngineClient,
    job_id: str,
    sink: ProgressSink,
    *,
    previews: bool = False,
    on_status: Callable[[pb.JobStatus], None] | None = None,
    stop: Callable[[], bool] | None = None,
    poll: float = 0.1,
) -> pb.JobStatus | None:
    """Follow ``job_id`` to its end: every host's one way to follow a job (the Nuke node, the Resolve window and
    adapter, the Qt panel's job list, ``vera edit``).

    Progress goes to ``sink.update(progress, status_text(status))``; ``on_status`` sees every status (previews
    included with ``previews=True``). When ``sink.cancelled()`` turns true the job is cancelled on the engine
    and followed until it has stopped. ``stop()`` turning true leaves the job alone and returns ``None`` (a list
    that stops watching one job to watch another). A dropped connection is retried as
    :meth:`EngineClient.wait` does. Returns the final status, checked by :func:`check_final`:
    :class:`GenerateCancelled` or :class:`GenerateError` with the sentences every host shows; an engine error
    propagates as :class:`~vera_plugin.client.EngineError` (see :func:`describe_engine_error`).
    """
    # The Watch stream blocks between updates (a queued job may be silent for minutes), so it runs on its own
    # thread while this one polls the sink for a cancel request.
    latest: list[pb.JobStatus] = []
    failure: list[BaseException] = []
    done = threading.Event()
    stopping = threading.Event()

    def collect(status: pb.JobStatus) -> None:
        latest.append(status)
        if stopping.is_set():
            raise _StopFollowing

    def watch() -> None:
        try:
            client.wait(job_id, callback=collect, previews=previews)
        except _StopFollowing:
            pass
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=watch, name=f"vera-watch-{job_id}", daemon=True).start()
    cancel_sent = False
    shown = 0
    while not done.wait(poll):
        if stop is not None and stop():
            stopping.set()  # the stream closes at its next update; nobody waits for it
            return None
        if not cancel_sent and sink.cancelled():
            cancel_sent = True
            sink.update(latest[-1].progress if latest else 0.0, "cancelling ...")
            client.cancel(job_id, ended_ok=True)
        while shown < len(latest):
            status = latest[shown]
            shown += 1
            if on_status is not None:
                on_status(status)
            if not cancel_sent:
                sink.update(status.progress, status_text(status))
    if failure:
        raise failure[0]
    for status in latest[shown:]:
        if on_status is not None:
            on_status(status)
    if not latest:
        raise GenerateError(f"job {job_id}: the engine sent no status; Generate again")
    return check_final(job_id, latest[-1])


def result_names(job_id: str, final: pb.JobStatus) -> list[str]:
    """The result files a finished job lists, each checked to be a Vera result name (``vera_edit.<frame>.exr``,
    ``vera_edit_take<k>.<frame>.exr``): an engine is not trusted to name files on this machine."""
    names = list(final.output_files)
    foreign = [name for name in names if take_and_frame(name) is None]
    if not names or foreign:
        raise GenerateError(
            f"the engine listed {foreign[:3] or 'no files'} as job {job_id}'s results; expected names like "
            "vera_edit.1001.exr. Not fetched"
        )
    return names


def check_final(job_id: str, final: pb.JobStatus) -> pb.JobStatus:
    """``final`` when the job succeeded; else the sentence every host shows, as :class:`GenerateCancelled`
    ("job ... was cancelled") or :class:`GenerateError` ("job ... failed on the engine: why")."""
    if final.state == pb.JOB_STATE_CANCELLED:
        raise GenerateCancelled(f"job {job_id} was cancelled")
    if final.state != pb.JOB_STATE_SUCCEEDED:
        raise GenerateError(f"job {job_id} failed on the engine: {final.error or state_name(final.state)}")
    return final


def run_generate(
    request: GenerateRequest,
    sink: ProgressSink,
    *,
    on_submitted: Callable[[str], None] | None = None,
    on_status: Callable[[pb.JobStatus], None] | None = None,
    poll: float = 0.1,
) -> GenerateResult:
    """Submit, follow and fetch one job (blocking: call it on a worker thread).

    ``on_submitted(job_id)`` runs as soon as the engine accepted the upload (hosts record the id so a crash
    or a closed script can still find the job); ``on_status`` sees every status update.
    """
    address = request.address
    try:
        with EngineClient(address, **request.client_options) as client:
            sink.update(0.0, f"uploading {len(request.frames)} frames to {address}")
            job_id = client.submit_files(
                request.plate, request.frames, prompt=request.prompt, mask=request.mask, **request.options
            )
            if on_submitted is not None:
                on_submitted(job_id)
            if sink.cancelled():
                client.cancel(job_id, ended_ok=True)
                raise GenerateCancelled(f"job {job_id} was cancelled")
            final = follow_job(
                client, job_id, sink, previews=request.previews, on_status=on_status, poll=poll
            )
            assert final is not None  # no stop() given
            out = job_dir(request.cache_root, job_id)
            count = len(final.output_files)

            def fetched(index: int, total: int, name: str) -> None:
                sink.update(index / max(total, 1), f"fetched {index}/{total} {name}")

            names = result_names(job_id, final)
            sink.update(0.0, f"fetching {count} frames into {out}")
            client.fetch(job_id, out, files=names, progress=fetched)
    except EngineError as exc:
        raise GenerateError(describe_engine_error(exc, address)) from None
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise GenerateError(f"Cannot submit: {exc}") from None
    takes = find_takes(request.cache_root, job_id)
    for take in range(1, max(1, final.header.takes) + 1):
        result = takes.get(take)
        if result is None or list(result.frames) != sorted(request.frames):
            found = list(result.frames) if result else []
            which = f" of take {take}" if take > 1 else ""
            raise GenerateError(
                f"job {job_id}: expected result frames{which} {_span(request.frames)} in {out}, found "
                f"{_span(found)}; the engine returned an incomplete result, Generate again"
            )
    return GenerateResult(job_id=job_id, seed=final.seed, takes=takes, final=final)


def _span(frames: Sequence[int]) -> str:
    from vera_plugin.client import format_frames

    return format_frames(sorted(frames)) or "none"
