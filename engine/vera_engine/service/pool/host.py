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
from typing import Any, TypedDict

from vera_engine.service import store as job_store
from vera_engine.service.errors import InputError, JobCancelled, WorkerLost
from vera_engine.service.limits import job_error
from vera_engine.service.pool.streamed import LazyFiles
from vera_engine.service.spool import MANIFEST, SpooledInputs
from vera_engine.service.worker import CancelBook, Events, JobContext, JobRunner, LiveState, free_memory
from vera_proto.vera.v1 import engine_pb2 as pb

log = logging.getLogger("vera_engine.service")

FREE_MEMORY_AFTER_SECONDS = 2.0  # after a job's outcome is returned, time for it to reach the front door

# JobContext live fields a poll carries back to the front door.
_LIVE_FIELDS = ("stage", "stage_detail", "step", "total_steps", "progress", "eta_seconds")


class LiveSnapshot(TypedDict):
    """A running job's live fields as a worker sends them to its front door (picklable, for pipes and Ray)."""

    stage: int
    stage_detail: str
    step: int
    total_steps: int
    progress: float
    eta_seconds: float | None
    preview: bytes | None  # pb.Preview, serialised
    preview_version: int


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


def job_outcome(job_id: str, body: Callable[[], JobOutcome], where: str = "") -> JobOutcome:
    """Run ``body`` (a job's work) and map how it ended: the one place every worker's outcomes are decided.

    Cancelled (:class:`JobCancelled`) is CANCELLED; bad input (:class:`InputError`, e.g. a frame sent by path that
    changed) is FAILED with its message; anything else is FAILED with the exception named (its text without the
    engine's own paths: :func:`~vera_engine.service.limits.job_error`), its traceback in the log.
    :class:`WorkerLost` passes through: the pool puts the job back in the queue instead.
    """
    try:
        return body()
    except JobCancelled:
        return JobOutcome(job_store.CANCELLED)
    except InputError as exc:
        return JobOutcome(job_store.FAILED, error=str(exc))
    except WorkerLost:
        raise
    except Exception as exc:
        log.error("job %s failed%s:\n%s", job_id, f" on {where}" if where else "", traceback.format_exc())
        return JobOutcome(job_store.FAILED, error=job_error(exc))  # no server paths to clients


def pack_inputs(inputs_dir: Path) -> LazyFiles:
    """A committed job's inputs as bytes, for a worker that does not see the spool: read one file at a time, as
    each is asked for (:class:`LazyFiles`), never the whole job at once.

    Frames that were sent by path are read here, on the front door, which is where they were checked: the worker
    gets their bytes as if they had been sent as EXR files.
    """
    spooled = SpooledInputs(inputs_dir)
    manifest = json.loads((inputs_dir / MANIFEST).read_text())
    files: dict[str, Callable[[], bytes]] = {}
    for layer, layer_number in (("plate", pb.LAYER_PLATE), ("mask", pb.LAYER_MASK)):
        for frame, entry in manifest[layer].items():
            if entry["encoding"] == "path":
                name = f"{layer}.{frame}.by-path.exr"
                # Read when asked, as SpooledInputs finds it: opened as Submit checked it (no link followed, the
                # same file), failing naming the frame if it changed.
                files[name] = functools.partial(spooled.exr_bytes, layer_number, int(frame))
                manifest[layer][frame] = {**entry, "encoding": "exr", "file": name}
            else:
                files[entry["file"]] = (inputs_dir / entry["file"]).read_bytes
    encoded = json.dumps(manifest).encode()
    files[MANIFEST] = lambda: encoded
    return LazyFiles(files)


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
        self._cancels = CancelBook()
        self._free_lock = threading.Lock()
        self._free_timer: threading.Timer | None = (
            None  # gives the last job's memory back, unless a job comes first
        )

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

    def run(self, ticket: JobTicket, inputs: Mapping[str, bytes] | None = None) -> JobOutcome:
        """Run one job to its end; the outcome says how it ended (never raises for the job's own errors)."""
        if self.runner is None:
            raise RuntimeError("WorkerHost.run before load()")
        self._free_memory_now()  # the last job's memory is back before this one takes any
        live = LiveState(job_id=ticket.job_id)
        outcome = self._run(ticket, inputs, live)
        # Every job keeps the progress it had when it stopped (the proto's JobStatus promise): the front door
        # records it, as the relayed live fields may have been sampled a step earlier.
        outcome.progress = live.stopped_at()
        # The outcome goes back first, the memory a moment later: a full garbage collection holds the GIL, for
        # seconds in a Ray worker on a loaded machine (9 s measured on 2 busy cores), and the front door would
        # hear of a cancelled or finished job only after it.
        with self._free_lock:
            self._free_timer = threading.Timer(FREE_MEMORY_AFTER_SECONDS, self._free_memory_now)
            self._free_timer.daemon = True
            self._free_timer.start()
        return outcome

    def _free_memory_now(self) -> None:
        """Give the last job's memory back if that is still to do (from the timer, or before the next job)."""
        with self._free_lock:
            timer, self._free_timer = self._free_timer, None
        if timer is not None:
            timer.cancel()
            free_memory()

    def _run(self, ticket: JobTicket, inputs: Mapping[str, bytes] | None, live: LiveState) -> JobOutcome:
        assert self.runner is not None
        runner = self.runner
        header = pb.JobHeader.FromString(ticket.header)
        # A cancel that arrived before this point (while the front door packed the inputs, or the job travelled
        # here) is in the book: the event starts set and the job stops before the runner starts it.
        cancel = self._cancels.begin(ticket.job_id, only=True)
        with self._lock:
            self._live = live
        scratch: list[Path] = []

        def stop_if_cancelled() -> None:
            if cancel.is_set() and self._control_group is None:
                # (The ranks of a group agree on a cancel at the runner's first check instead: one rank that did
                # not start would leave the others waiting in a collective.)
                raise JobCancelled(ticket.job_id)

        def work() -> JobOutcome:
            stop_if_cancelled()
            if ticket.inputs_dir is not None and ticket.output_dir is not None:
                inputs_dir, out_dir = Path(ticket.inputs_dir), Path(ticket.output_dir)
                if not self.lead:
                    # Only rank 0 writes the results; the other ranks' (empty) output folder is their own.
                    scratch.append(Path(tempfile.mkdtemp(prefix=f"vera-{ticket.job_id}-")))
                    out_dir = scratch[0] / "out"
                    out_dir.mkdir()
            else:
                if inputs is None:
                    raise ValueError(f"job {ticket.job_id}: no shared spool and no inputs sent")
                scratch.append(Path(tempfile.mkdtemp(prefix=f"vera-{ticket.job_id}-")))
                # Streamed inputs are read here, one file at a time (pack_inputs): a cancel during the read
                # stops the job before the runner starts it.
                inputs_dir = unpack_inputs(inputs, scratch[0] / "inputs")
                stop_if_cancelled()
                out_dir = scratch[0] / "out"
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
            paths = runner.run(ctx)
            del ctx
            # A cancel that arrives after the last step is too late: the results exist, keep them.
            names = sorted(Path(p).name for p in paths)
            files = None
            if ticket.output_dir is None and self.lead:
                files = {name: (out_dir / name).read_bytes() for name in names}
            return JobOutcome(job_store.SUCCEEDED, outputs=names, files=files)

        try:
            return job_outcome(ticket.job_id, work)
        finally:
            self._cancels.end(ticket.job_id)
            with self._lock:
                self._live = None
            self._events.bump()
            for folder in scratch:
                shutil.rmtree(folder, ignore_errors=True)

    def poll(self, job_id: str, seen: int, timeout: float) -> tuple[int, LiveSnapshot | None]:
        """Wait up to ``timeout`` for news of ``job_id`` newer than version ``seen``.

        Returns (version, live fields) with the preview as ``preview`` (serialised pb.Preview, or None) and
        ``preview_version``; the fields are None when the job is not running here (not started yet, or ended).
        """
        version = self._events.wait(seen, timeout)
        with self._lock:
            live = self._live if self._live is not None and self._live.job_id == job_id else None
            if live is None:
                return version, None
            snapshot = LiveSnapshot(
                stage=live.stage,
                stage_detail=live.stage_detail,
                step=live.step,
                total_steps=live.total_steps,
                progress=live.progress,
                eta_seconds=live.eta_seconds,
                preview=live.preview.SerializeToString() if live.preview is not None else None,
                preview_version=live.preview_version,
            )
        return version, snapshot

    def want_previews(self, job_id: str, wanted: bool) -> None:
        """Whether someone at the front door watches ``job_id``'s previews (they cost a decode: made only then)."""
        self._events.set_previews_watched(job_id, wanted)

    def cancel(self, job_id: str) -> None:
        """Ask ``job_id`` to stop within one step; one that has not started here yet stops as it starts."""
        self._cancels.request(job_id)

    def pid(self) -> int:
        """The process this host runs in."""
        return os.getpid()


def run_relaying(
    host: WorkerHost,
    ticket: JobTicket,
    inputs: Mapping[str, bytes] | None,
    on_update: Callable[[LiveSnapshot], None],
    poll_seconds: float = 0.5,
) -> JobOutcome:
    """Run ``ticket`` on ``host`` in this thread while a second thread relays its live fields to ``on_update``.

    What a worker process does with its front door's "run" command, and what the in-process worker does itself.
    """
    done = threading.Event()

    def relay() -> None:
        seen = -1
        while not done.is_set():
            seen, snapshot = host.poll(ticket.job_id, seen, poll_seconds)
            if snapshot is not None and not done.is_set():
                on_update(snapshot)

    if host.lead:
        threading.Thread(target=relay, name=f"vera-relay-{ticket.job_id}", daemon=True).start()
    try:
        return host.run(ticket, inputs)
    finally:
        done.set()


def apply_snapshot(live: LiveState, snapshot: LiveSnapshot) -> bool:
    """Copy a worker's live fields into the front door's LiveState; returns True if anything changed."""
    changed = False
    for name in _LIVE_FIELDS:
        if getattr(live, name) != snapshot[name]:  # type: ignore[literal-required]
            setattr(live, name, snapshot[name])  # type: ignore[literal-required]
            changed = True
    if snapshot["preview"] is not None and snapshot["preview_version"] != live.preview_version:
        live.preview = pb.Preview.FromString(snapshot["preview"])
        live.preview_version = snapshot["preview_version"]
        changed = True
    return changed
