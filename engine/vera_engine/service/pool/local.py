"""The local backend: every device of this machine behind one front door, one worker process per device, no Ray.

``vera-engine serve --devices cuda:0,cuda:1,...`` starts one process per device (each sees only its GPU, through
``CUDA_VISIBLE_DEVICES``), each a :class:`~vera_engine.service.pool.host.WorkerHost` that loads the model once.
With ``--gpus-per-job N`` the devices are taken N at a time: the N processes of a worker join one
``torch.distributed`` group (NCCL on GPUs, gloo on CPUs) and run each job with context parallelism.

The processes see the front door's spool, so inputs and results are read and written there directly. A process
that dies (``kill -9``, a driver crash, out of memory) is noticed when its pipe closes: its job goes back to the
queue and a new process takes the device.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from vera_engine.service import safe_files
from vera_engine.service.errors import WorkerLost
from vera_engine.service.pool.dispatch import WorkerHandle
from vera_engine.service.pool.host import (
    GroupSpec,
    JobOutcome,
    JobTicket,
    LiveSnapshot,
    RunnerSpec,
    WorkerHost,
    WorkerReport,
    run_relaying,
)

POLL_SECONDS = 0.5  # how long one long-poll of a job's progress waits inside the worker process


def parse_devices(spec: str) -> list[str]:
    """``--devices`` as a list: ``cpu`` (may repeat: one process each) or ``cuda:N`` (each once)."""
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(
            f"--devices {spec!r}: expected a comma-separated list such as cuda:0,cuda:1 or cpu,cpu"
        )
    seen: set[str] = set()
    for device in devices:
        kind, _, index = device.partition(":")
        if device == "cpu":
            continue
        if kind != "cuda" or not index.isdigit():
            raise ValueError(f"--devices: {device!r} is not a device; expected cpu or cuda:N (e.g. cuda:0)")
        if device in seen:
            raise ValueError(f"--devices: {device} is listed twice; each GPU runs one worker")
        seen.add(device)
    return devices


def check_devices(devices: Sequence[str], gpus_per_job: int) -> None:
    """Refuse device lists this machine cannot serve: missing GPUs, or a count that ``--gpus-per-job`` cannot split."""
    if gpus_per_job < 1:
        raise ValueError(f"--gpus-per-job {gpus_per_job}: expected 1 or more devices per job")
    if len(devices) < gpus_per_job:
        raise ValueError(
            f"--gpus-per-job {gpus_per_job}: a job needs {gpus_per_job} devices but --devices lists only "
            f"{len(devices)} ({','.join(devices)})"
        )
    if len(devices) % gpus_per_job:
        raise ValueError(
            f"--devices lists {len(devices)} devices, not a multiple of --gpus-per-job {gpus_per_job}: "
            f"{','.join(devices[-(len(devices) % gpus_per_job) :])} would stay unused"
        )
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda:
        import torch

        count = torch.cuda.device_count()
        missing = [d for d in cuda if int(d.split(":")[1]) >= count]
        if missing:
            raise ValueError(
                f"--devices: {', '.join(missing)} not present; this machine has {count} CUDA devices"
            )
    if 0 < len(cuda) < len(devices):
        raise ValueError("--devices: mix of cpu and cuda devices; a pool serves one kind")


def _worker_main(
    conn: Connection,
    runner: RunnerSpec,
    device: str,
    group: GroupSpec | None,
    preview_interval: float,
    threads: int,
) -> None:
    """A local worker process: load, then run the front door's commands ("run", "cancel", "stop")."""
    if device.startswith("cuda"):
        # Each process sees only its own GPU, as cuda:0: torch.distributed and diffusers' parallel setup then place
        # every rank on the right device.
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
        device = "cuda"
    elif threads > 0:
        import torch

        torch.set_num_threads(threads)
    send_lock = threading.Lock()

    def send(*message: Any) -> None:
        with send_lock:
            conn.send(message)

    host = WorkerHost(runner, device, group=group, preview_interval=preview_interval)
    try:
        send("loaded", host.load())
    except Exception as exc:
        send("load_failed", f"{type(exc).__name__}: {exc}")
        return

    def run(ticket: JobTicket) -> None:
        outcome = run_relaying(
            host, ticket, None, lambda snapshot: send("update", ticket.job_id, snapshot), POLL_SECONDS
        )
        send("outcome", ticket.job_id, outcome)

    while True:
        try:
            command, *args = conn.recv()
        except EOFError:  # the front door is gone
            return
        if command == "run":
            threading.Thread(target=run, args=args, daemon=True).start()
        elif command == "cancel":
            host.cancel(*args)
        elif command == "previews":
            host.want_previews(*args)
        elif command == "stop":
            return


class _Process:
    """One worker process and the messages it sent, read by a thread so the pipe never fills."""

    def __init__(self, context: Any, args: tuple[Any, ...], name: str) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, *args), name=name, daemon=True)
        self.process.start()
        child.close()
        self.messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(5)
                code = self.process.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                self.messages.put(("lost", f"worker process {self.process.pid} ended ({how})"))
                return
            self.messages.put(message)

    def send(self, *message: Any) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (BrokenPipeError, OSError):
            pass  # the reader reports the process as lost

    def close(self) -> None:
        self.send("stop")
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class LocalWorker(WorkerHandle):
    """A worker of the local backend: one process, or one per device of a group."""

    def __init__(
        self,
        slot: int,
        devices: Sequence[str],
        runner: RunnerSpec,
        *,
        context_parallel: str,
        preview_interval: float,
        threads: int,
        generation: int,
    ) -> None:
        super().__init__(f"local:{slot}" + (f".{generation}" if generation else ""), len(devices))
        self.slot = slot
        self.device_names = list(devices)
        self._args = (runner, context_parallel, preview_interval, threads)
        self._processes: list[_Process] = []
        self._closed = False

    @property
    def shares_spool(self) -> bool:
        """Local processes see the front door's spool."""
        return True

    def load(self) -> WorkerReport:
        """Start the process(es) and wait for every rank to load."""
        runner, kind, preview_interval, threads = self._args
        context = multiprocessing.get_context("spawn")
        init = safe_files.rendezvous_file()  # no TCP store: it would listen on every interface
        world = len(self.device_names)
        for rank, device in enumerate(self.device_names):
            group = GroupSpec(rank, world, init, kind) if world > 1 else None
            self._processes.append(
                _Process(
                    context, (runner, device, group, preview_interval, threads), f"vera-{self.name}-{rank}"
                )
            )
        reports = []
        for process in self._processes:
            kind_, *args = process.messages.get()
            if kind_ != "loaded":
                raise RuntimeError(args[0])
            reports.append(args[0])
        return reports[0]

    def run(
        self, ticket: JobTicket, inputs: Mapping[str, bytes] | None, on_update: Callable[[LiveSnapshot], None]
    ) -> JobOutcome:
        """Send the job to every rank; follow rank 0's updates; the outcome is rank 0's."""
        for process in self._processes:
            process.send("run", ticket)
        outcomes: list[JobOutcome | None] = [None] * len(self._processes)
        while any(o is None for o in outcomes):
            for rank, process in enumerate(self._processes):
                if outcomes[rank] is not None:
                    continue
                try:
                    kind, *args = process.messages.get(timeout=0.05 if len(self._processes) > 1 else 1.0)
                except queue.Empty:
                    continue
                if kind == "lost":
                    raise WorkerLost(args[0])
                if kind == "update" and args[0] == ticket.job_id:
                    on_update(args[1])
                elif kind == "outcome" and args[0] == ticket.job_id:
                    outcomes[rank] = args[1]
        lead = outcomes[0]
        assert lead is not None
        return lead

    def cancel(self, job_id: str) -> None:
        """Rank 0 hears the cancel; the group agrees on it at the next check."""
        if self._processes:
            self._processes[0].send("cancel", job_id)

    def want_previews(self, job_id: str, wanted: bool) -> None:
        """Rank 0 makes the previews."""
        if self._processes:
            self._processes[0].send("previews", job_id, wanted)

    def lost_reason(self) -> str | None:
        """Why this idle worker is gone (a process of it ended), or None."""
        for process in self._processes:
            if not process.process.is_alive():
                return f"worker process {process.process.pid} ended (exit code {process.process.exitcode})"
        return None

    def close(self) -> None:
        """Stop the processes (killed if they do not stop)."""
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            process.close()

    def pids(self) -> list[int]:
        """The worker's process ids (tests kill them)."""
        return [p.process.pid for p in self._processes if p.process.pid is not None]


class LocalBackend:
    """One worker process per device of this machine (``--devices``), or one group per N devices."""

    def __init__(
        self,
        devices: Sequence[str],
        runner: RunnerSpec,
        *,
        gpus_per_job: int = 1,
        context_parallel: str = "ulysses",
        preview_interval: float = 1.0,
    ) -> None:
        check_devices(devices, gpus_per_job)
        self.devices = list(devices)
        self.runner = runner
        self.gpus_per_job = gpus_per_job
        self.context_parallel = context_parallel
        self.preview_interval = preview_interval
        slots = len(self.devices) // gpus_per_job
        # CPU workers share the machine's cores; GPUs bring their own.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, cores // len(self.devices)) if self.devices[0] == "cpu" else 0
        self._groups = [self.devices[i * gpus_per_job : (i + 1) * gpus_per_job] for i in range(slots)]
        self._generation = [0] * slots
        self._lock = threading.Lock()

    def describe(self) -> str:
        """The devices and how they are grouped."""
        return f"{len(self._groups)} local worker(s) on {','.join(self.devices)}, {self.gpus_per_job} device(s) per job"

    def reconcile(self, current: list[WorkerHandle]) -> list[WorkerHandle]:
        """A worker for every device group that has none (at start, and after a worker process died)."""
        taken = {h.slot for h in current if isinstance(h, LocalWorker)}
        new: list[WorkerHandle] = []
        with self._lock:
            for slot, devices in enumerate(self._groups):
                if slot in taken:
                    continue
                new.append(
                    LocalWorker(
                        slot,
                        devices,
                        self.runner,
                        context_parallel=self.context_parallel,
                        preview_interval=self.preview_interval,
                        threads=self.threads,
                        generation=self._generation[slot],
                    )
                )
                self._generation[slot] += 1
        return new

    def check_placement(self) -> None:
        """Every job fits: `check_devices` refused at start a --gpus-per-job the devices cannot hold."""

    def close(self) -> None:
        """Nothing beyond the workers' processes."""
