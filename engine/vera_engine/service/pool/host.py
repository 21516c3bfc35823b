"""The worker side of a pool: what runs in a worker process or Ray actor, the same for both backends.

A :class:`WorkerHost` builds its runner once (:class:`RunnerSpec`), loads the model once and keeps it warm, then
runs one job at a time with the runner the single-process engine uses, through the same
:class:`~vera_engine.service.worker.JobContext`. The front door follows a job by long-polling :meth:`WorkerHost.poll`
(stage, steps, ETA, preview) and stops it with :meth:`WorkerHost.cancel`, which the runner sees within one step.

Inputs and results travel either as files of a spool both sides see (``--shared-spool``, and always for local
workers) or as bytes (:func:`pack_inputs`, :attr:`JobOutcome.files`), which Ray carries in its object store.

A worker over several devices is a group of hosts, one per device (rank), joined in a ``torch.distributed`` group
with context parallelism on the transformer: every rank runs the same job and the same sampling call, rank 0
reports progress and writes the layers, and a cancel is agreed over the group so that all ranks stop at the same
step.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vera_engine.service import safe_files
from vera_engine.service import store as job_store
from vera_engine.service.limits import job_error
from vera_engine.service.pool.streamed import LazyFiles
from vera_engine.service.spool import MANIFEST, InputError, SpooledInputs
from vera_engine.service.worker import Events, JobCancelled, JobContext, JobRunner, LiveState, free_memory
from vera_proto.vera.v1 import engine_pb2 as pb

log = logging.getLogger("vera_engine.service")

# JobContext live fields a poll carries back to the front door.
_LIVE_FIELDS = ("stage", "stage_detail", "step", "total_steps", "progress", "eta_seconds")


@dataclass(frozen=True)
class RunnerSpec:
    """How a worker builds its runner: a picklable callable and its keyword arguments.

    The worker's device is passed as ``device=`` when the callable takes one (`PipelineRunner` does; the model-free
    `PassThroughRunner` of the tests does not).
    """

    factory: Callable[..., JobRunner]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, device: str) -> JobRunner:
        """A new runner for ``device``."""
        kwargs = dict(self.kwargs)
        if "device" in inspect.signature(self.factory).parameters:
            kwargs["device"] = device
        return self.factory(**kwargs)


@dataclass
class JobTicket:
    """One job as the front door hands it to a worker."""

    job_id: str
    header: bytes  # pb.JobHeader, serialised
    attempt: int
    # Shared spool: the worker reads the inputs and writes the results here. Otherwise both are None and the
    # inputs come as bytes (pack_inputs) and the results go back as bytes (JobOutcome.files).
    inputs_dir: str | None = None
    output_dir: str | None = None


@dataclass
class JobOutcome:
    """How a job ended on a worker."""

    state: int  # job_store.SUCCEEDED, FAILED or CANCELLED
    error: str = ""
    outputs: list[str] = field(default_factory=list)  # result file names, sorted
    files: Mapping[str, bytes] | None = None  # the results' bytes when the spool is not shared
    progress: tuple[int, int, float] = (0, 0, 0.0)  # (step, total steps, fraction) where the job stopped


@dataclass
class WorkerReport:
    """What a worker tells the front door once its model is loaded."""

    node: str  # the Ray node id, or the host name of a local worker
    host: str
    device: bytes  # pb.DeviceInfo
    models: list[bytes]  # pb.ModelInfo of each model the runner serves (first: the default)


def pack_inputs(inputs_dir: Path) -> LazyFiles:
    """A committed job's inputs as bytes, for a worker that does not see the spool: read one file at a time, as
    each is asked for (:class:`LazyFiles`), never the whole job at once.

    Frames that were sent by path are read here, on the front door, which is where they were checked: the worker
    gets their bytes as if they had been sent as EXR files.
    """
    manifest = json.loads((inputs_dir / MANIFEST).read_text())
    files: dict[str, Callable[[], bytes]] = {}
    for layer in ("plate", "mask"):
        for frame, entry in manifest[layer].items():
            if entry["encoding"] == "path":
                name = f"{layer}.{frame}.by-path.exr"
                files[name] = functools.partial(_read_by_path, layer, frame, entry)
                manifest[layer][frame] = {**entry, "encoding": "exr", "file": name}
            else:
                files[entry["file"]] = (inputs_dir / entry["file"]).read_bytes
    encoded = json.dumps(manifest).encode()
    files[MANIFEST] = lambda: encoded
    return LazyFiles(files)


def _read_by_path(layer: str, frame: str, entry: dict[str, Any]) -> bytes:
    try:  # opened as Submit checked it: no link followed, same file (safe_files)
        return safe_files.read_recorded(entry)
    except (safe_files.UnsafeFile, OSError) as exc:
        raise InputError(f"{layer} frame {frame}.path", f"{entry['path']} {exc}") from None


def unpack_inputs(files: Mapping[str, bytes], directory: Path) -> Path:
    """Write :func:`pack_inputs`' files into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if (
            Path(name).name != name
        ):  # names come from our own manifest; refuse anything that is not a plain name
            raise ValueError(f"input file name {name!r} is not a plain file name")
        (directory / name).write_bytes(data)
    return directory


class GroupJobContext(JobContext):
    """The JobContext of one rank of a job over several devices: every cancel check is agreed over the group.

    The runner checks for a cancel at the same points on every rank (they run the same code), so each check is a
    collective: the group stops at the same step, and no rank is left waiting in the next step's attention.
    """

    def __init__(self, *args: Any, control_group: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group = control_group

    def cancelled(self) -> bool:
        """True on every rank once the job was cancelled on any rank (rank 0 receives the Cancel)."""
        import torch

        flag = torch.tensor([1 if self._cancel.is_set() else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` on every rank if the job was cancelled on any."""
        if self.cancelled():
            raise JobCancelled(self.job_id)


@dataclass(frozen=True)
class GroupSpec:
    """One rank's place in a worker over several devices."""

    rank: int
    world_size: int
    init_method: str  # tcp://HOST:PORT of rank 0
    context_parallel: str = "ulysses"  # or "ring"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host`` (for rank 0 of a group to listen on)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class WorkerHost:
    """One worker (or one rank of a worker over several devices): a runner loaded once, running one job at a time.

    Thread-safe: :meth:`run` blocks for the job while :meth:`poll` and :meth:`cancel` are called from other threads
    (a threaded Ray actor, or a local worker process's command loop).
    """

    def __init__(
        self,
        runner: RunnerSpec,
        device: str,
        *,
        group: GroupSpec | None = None,
        preview_interval: float = 1.0,
        node: str = "",
    ) -> None:
        self.spec = runner
        self.device = device
        self.group = group
        self.preview_interval = preview_interval
        self.node = node or socket.gethostname()
        self.runner: JobRunner | None = None
        self._control_group: Any = None
        self._lock = threading.Lock()
        self._events = Events()
        self._live: LiveState | None = None
        self._cancel: dict[str, threading.Event] = {}

    @property
    def lead(self) -> bool:
        """True for a single-device worker and for rank 0 of a group."""
        return self.group is None or self.group.rank == 0

    def load(self) -> WorkerReport:
        """Build the runner, load its model, join the group if any; returns what the front door shows of it."""
        runner = self.spec.build(self.device)
        runner.load()
        if self.group is not None and self.group.world_size > 1:
            self._join_group(runner)
        self.runner = runner
        return WorkerReport(
            node=self.node,
            host=socket.gethostname(),
            device=runner.device_info().SerializeToString(),
            models=[m.SerializeToString() for m in runner.models()],
        )

    def _join_group(self, runner: JobRunner) -> None:
        import torch

        from vera_engine.acceleration.parallel import enable_context_parallel

        group = self.group
        assert group is not None
        pipe = getattr(runner, "pipe", None)
        if pipe is None:
            raise TypeError(
                f"{type(runner).__name__} has no pipeline to split over devices; --gpus-per-job needs the "
                "Vera pipeline runner"
            )
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=group.init_method, rank=group.rank, world_size=group.world_size
        )
        # Cancel checks travel over gloo whatever carries the attention (NCCL needs device tensors).
        self._control_group = torch.distributed.new_group(backend="gloo")
        enable_context_parallel(pipe.transformer, group.context_parallel)  # type: ignore[arg-type]

    def run(self, ticket: JobTicket, inputs: dict[str, bytes] | None = None) -> JobOutcome:
        """Run one job to its end; the outcome says how it ended (never raises for the job's own errors)."""
        if self.runner is None:
            raise RuntimeError("WorkerHost.run before load()")
        live = LiveState(job_id=ticket.job_id)
        outcome = self._run(ticket, inputs, live)
        # Every job keeps the progress it had when it stopped (the proto's JobStatus promise): the front door
        # records it, as the relayed live fields may have been sampled a step earlier.
        outcome.progress = live.stopped_at()
        return outcome

    def _run(self, ticket: JobTicket, inputs: dict[str, bytes] | None, live: LiveState) -> JobOutcome:
        assert self.runner is not None
        header = pb.JobHeader.FromString(ticket.header)
        cancel = threading.Event()
        with self._lock:
            self._cancel[ticket.job_id] = cancel
            self._live = live
        scratch: Path | None = None
        try:
            if ticket.inputs_dir is not None and ticket.output_dir is not None:
                inputs_dir, out_dir = Path(ticket.inputs_dir), Path(ticket.output_dir)
                if not self.lead:
                    # Only rank 0 writes the results; the other ranks' (empty) output folder is their own.
                    scratch = Path(tempfile.mkdtemp(prefix=f"vera-{ticket.job_id}-"))
                    out_dir = scratch / "out"
                    out_dir.mkdir()
            else:
                if inputs is None:
                    raise ValueError(f"job {ticket.job_id}: no shared spool and no inputs sent")
                scratch = Path(tempfile.mkdtemp(prefix=f"vera-{ticket.job_id}-"))
                inputs_dir = unpack_inputs(inputs, scratch / "inputs")
                out_dir = scratch / "out"
                out_dir.mkdir()
            args = (
                ticket.job_id,
                header,
                SpooledInputs(inputs_dir),
                out_dir,
                live,
                self._events,
                cancel,
                self.preview_interval,
            )
            if self._control_group is not None:
                ctx: JobContext = GroupJobContext(*args, lead=self.lead, control_group=self._control_group)
            else:
                ctx = JobContext(*args, lead=self.lead)
            paths = self.runner.run(ctx)
            del ctx
            names = sorted(Path(p).name for p in paths)
            files = None
            if ticket.output_dir is None and self.lead:
                files = {name: (out_dir / name).read_bytes() for name in names}
            return JobOutcome(job_store.SUCCEEDED, outputs=names, files=files)
        except JobCancelled:
            return JobOutcome(job_store.CANCELLED)
        except InputError as exc:
            return JobOutcome(job_store.FAILED, error=str(exc))
        except Exception as exc:
            log.error("job %s failed:\n%s", ticket.job_id, traceback.format_exc())
            return JobOutcome(job_store.FAILED, error=job_error(exc))  # no server paths to clients
        finally:
            with self._lock:
                self._cancel.pop(ticket.job_id, None)
                self._live = None
            self._events.bump()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            free_memory()

    def poll(self, job_id: str, seen: int, timeout: float) -> tuple[int, dict[str, Any] | None]:
        """Wait up to ``timeout`` for news of ``job_id`` newer than version ``seen``.

        Returns (version, live fields) with the preview as ``preview`` (serialised pb.Preview, or None) and
        ``preview_version``; the fields are None when the job is not running here (not started yet, or ended).
        """
        version = self._events.wait(seen, timeout)
        with self._lock:
            live = self._live if self._live is not None and self._live.job_id == job_id else None
            if live is None:
                return version, None
            snapshot: dict[str, Any] = {name: getattr(live, name) for name in _LIVE_FIELDS}
            snapshot["preview_version"] = live.preview_version
            snapshot["preview"] = live.preview.SerializeToString() if live.preview is not None else None
        return version, snapshot

    def want_previews(self, job_id: str, wanted: bool) -> None:
        """Whether someone at the front door watches ``job_id``'s previews (they cost a decode: made only then)."""
        self._events.set_previews_watched(job_id, wanted)

    def cancel(self, job_id: str) -> bool:
        """Ask ``job_id`` to stop within one step; False if it does not run here."""
        with self._lock:
            event = self._cancel.get(job_id)
        if event is None:
            return False
        event.set()
        return True

    def pid(self) -> int:
        """The process this host runs in."""
        return os.getpid()


def apply_snapshot(live: LiveState, snapshot: dict[str, Any]) -> bool:
    """Copy a worker's live fields into the front door's LiveState; returns True if anything changed."""
    changed = False
    for name in _LIVE_FIELDS:
        if getattr(live, name) != snapshot[name]:
            setattr(live, name, snapshot[name])
            changed = True
    if snapshot["preview"] is not None and snapshot["preview_version"] != live.preview_version:
        live.preview = pb.Preview.FromString(snapshot["preview"])
        live.preview_version = snapshot["preview_version"]
        changed = True
    return changed
