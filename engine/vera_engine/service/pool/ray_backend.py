"""The Ray backend: the engine's workers as Ray actors across a Ray cluster (``vera-engine serve --cluster``).

Ray does the scheduling, placement and failure detection: each worker is an actor asking for one GPU
(``num_gpus=1``), or for ``--gpus-per-job N`` a placement group of N GPUs packed on one node with one actor per
GPU. The front door asks for as many workers as the live nodes have room for (every few seconds, so nodes that
join are used and workers lost with a node are replaced), and learns from Ray when an actor or its node died
(``RayActorError``): the job then goes back to the queue (`dispatch.Pool`).

Inputs go to the workers and results come back through Ray's object store, one object per file, put and fetched
one file at a time (neither the front door nor a worker holds a whole job in memory), unless ``--shared-spool``
says the workers see the front door's spool path. Actors belong to the front
door's Ray job: a front door that dies takes its actors with it, and a restarted one starts new ones and reruns
what was queued or running.

``--worker-resource NAME`` asks for another resource instead of GPUs: ``CPU`` (one worker per CPU, through Ray's
``num_cpus``), or a custom one (nodes started with ``ray start --resources '{"NAME": 1}'``); such workers run on
the CPU. A name Ray cannot place a worker with is refused at start. The tests use it to stand in for GPUs, so
the placement code they run is the one that places GPU workers.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vera_engine.service import safe_files
from vera_engine.service import store as job_store
from vera_engine.service.errors import ClusterError, InputError, WorkerLost
from vera_engine.service.pool.dispatch import WorkerHandle
from vera_engine.service.pool.host import (
    GroupSpec,
    JobOutcome,
    JobTicket,
    LiveSnapshot,
    RunnerSpec,
    WorkerHost,
    WorkerReport,
    unpack_inputs,
)
from vera_engine.service.pool.streamed import LazyFiles

log = logging.getLogger("vera_engine.service")

POLL_SECONDS = 0.5  # longest wait of one progress long-poll inside the actor
CONNECT_SECONDS = 60.0  # longest wait for ray.init once the address answers
ACTOR_CONCURRENCY = 4  # run + poll + cancel at the same time on one actor


class RayWorkerHost(WorkerHost):
    """A WorkerHost as a Ray actor: knows its Ray node and uses the GPU Ray gave it (if any)."""

    def __init__(self, runner: RunnerSpec, preview_interval: float) -> None:
        import ray

        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs of this actor: it sees its own as cuda:0.
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        super().__init__(
            runner, device, preview_interval=preview_interval, node=ray.get_runtime_context().get_node_id()
        )

    def rendezvous(self) -> str:
        """Where the ranks of a group meet: a file store on this node, readable by the engine's user only."""
        # The group is packed on this node (STRICT_PACK): a file store, and no TCP store listening on every
        # interface of the node.
        return safe_files.rendezvous_file()

    def load_in_group(self, group: GroupSpec | None) -> WorkerReport:
        """Load as one rank of ``group`` (or alone)."""
        self.group = group
        return self.load()

    def run(self, ticket: JobTicket, inputs: Mapping[str, Any] | None = None) -> JobOutcome:
        """Run a job whose inputs come through the object store one frame at a time (``inputs``: file name ->
        ObjectRef), and hand its results back the same way (``JobOutcome.files``: name -> ObjectRef).

        The frames are written to a scratch folder on this node as each is fetched, and the results put in the
        object store as each is read: the actor never holds more than one file of the job.
        """
        if inputs is None or ticket.inputs_dir is not None:
            return super().run(ticket, inputs)  # type: ignore[arg-type]
        import ray

        scratch = Path(tempfile.mkdtemp(prefix=f"vera-{ticket.job_id}-"))  # 0700
        try:
            inputs_dir = unpack_inputs(_fetched(inputs), scratch / "inputs")
            out_dir = scratch / "out"
            out_dir.mkdir()
            here = dataclasses.replace(ticket, inputs_dir=str(inputs_dir), output_dir=str(out_dir))
            outcome = super().run(here, None)
            if self.lead and outcome.state == job_store.SUCCEEDED:
                safe_files.check_result_names(outcome.outputs)
                outcome.files = {name: ray.put((out_dir / name).read_bytes()) for name in outcome.outputs}
            return outcome
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


MIN_RAY_VERSION = (2, 52)  # the first Ray with token authentication (RAY_AUTH_MODE=token)


def check_ray_version(version: str) -> None:
    """Refuse a Ray older than token authentication: its clusters run any code anyone who reaches them sends."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_RAY_VERSION:
        want = ".".join(str(p) for p in MIN_RAY_VERSION)
        raise ClusterError(
            f"Ray {version} has no token authentication (Ray {want} added it): anyone who reaches its ports can run "
            f"code on every node; install ray>={want} (pip install -e '.[cluster]' in the checkout) and start the "
            "cluster with RAY_AUTH_MODE=token (docs/SECURITY.md)"
        )


def is_this_machine(host: str) -> bool:
    """True when ``host`` names this machine: a loopback address, or one of its own (bindable) addresses."""
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        if host == "localhost":
            return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _type, _proto, _name, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))  # only an address of one of this machine's interfaces binds
                return True
            except OSError:
                continue
    return False


def check_remote(address: str, allow_remote: bool) -> None:
    """Refuse a cluster on another machine unless the operator says it is secured (``--allow-remote-ray``).

    A Ray cluster runs whatever code its clients send: one reachable from other machines without Ray's token
    authentication is remote code execution for anyone on the network.
    """
    if address == "auto" or allow_remote:
        return
    host = address.removeprefix("ray://").rpartition(":")[0]
    if host and not is_this_machine(host):
        raise ClusterError(
            f"--cluster {address} is on another machine: a Ray cluster runs any code its clients send, so make sure "
            "it requires Ray's token authentication (RAY_AUTH_MODE=token on every node and here, Ray >= 2.52), uses "
            "TLS on a shared network and has its ports firewalled (docs/SECURITY.md), then pass --allow-remote-ray"
        )


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where nothing listens (ray.init would retry it for minutes)."""
    if address == "auto":
        return  # Ray finds the local cluster itself and says so when there is none
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"--cluster {address!r}: expected auto, HOST:PORT (the head's GCS, port 6379 by default) or "
            "ray://HOST:10001 (Ray Client)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: {exc}; start one with `ray start --head` and pass its "
            "address"
        ) from None


def connect(address: str, timeout: float = CONNECT_SECONDS) -> bool:
    """Connect this process to the Ray cluster at ``address``; returns False if it already was connected."""
    import ray

    if ray.is_initialized():
        return False
    check_ray_version(ray.__version__)
    check_address(address)
    if address != "auto" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        log.warning(
            "connecting to the Ray cluster at %s without RAY_AUTH_MODE=token: unless the cluster requires tokens, "
            "anyone who reaches its ports can run code on its nodes (docs/SECURITY.md)",
            address,
        )
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=init, name="vera-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ClusterError(f"the Ray cluster at {address} did not answer within {timeout:g} s")
    error = outcome[0]
    if error is not None:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {type(error).__name__}: {error}")
    return True


def _fetched(refs: Mapping[str, Any]) -> LazyFiles:
    """File name -> ObjectRef as file name -> bytes, each ``ray.get`` when indexed (one file in memory at a time)."""
    import ray

    return LazyFiles({name: functools.partial(ray.get, ref) for name, ref in refs.items()})


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _death_cause(exc: BaseException) -> str:
    """The line of a RayActorError that says why the actor died."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "died because" in line or ("node" in line.lower() and "died" in line.lower()):
            return line
    return lines[0] if lines else type(exc).__name__


_actor_class: Any = None


def _remote_host_class() -> Any:
    """RayWorkerHost as a Ray actor class (made once per process)."""
    global _actor_class
    if _actor_class is None:
        import ray

        _actor_class = ray.remote(RayWorkerHost)
    return _actor_class


def worker_resource(name: str) -> str:
    """``--worker-resource`` as Ray spells it: ``CPU`` and ``GPU`` (any case) are Ray's own, others are custom."""
    name = name.strip()
    if not name:
        raise ClusterError(
            "--worker-resource is empty; name GPU, CPU or a custom resource of the cluster's nodes"
        )
    if name in ("memory", "object_store_memory") or name.startswith(("node:", "accelerator_type:")):
        # Ray's byte counts and node markers: one unit of them is not a device (a node's `memory` would count as
        # billions of worker slots).
        raise ClusterError(
            f"--worker-resource {name!r} is one of Ray's byte counts or node markers, not a device; name GPU, CPU "
            "or a custom resource the nodes offer per device (`ray start --resources '{\"NAME\": N}'`)"
        )
    return name.upper() if name.upper() in ("CPU", "GPU") else name


def actor_options(resource: str) -> dict[str, Any]:
    """The Ray options of one worker actor that takes one unit of ``resource`` (see :func:`worker_resource`).

    Ray asks for its own CPUs and GPUs by ``num_cpus`` / ``num_gpus`` and refuses them in ``resources``.
    """
    if resource == "GPU":
        # num_cpus=0: a worker's arithmetic is on its device; CPU counts must not limit how many GPUs are used.
        request: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0}
    elif resource == "CPU":
        request = {"num_cpus": 1}  # the worker computes on that CPU
    else:
        request = {"resources": {resource: 1}, "num_cpus": 0}
    return {**request, "max_concurrency": ACTOR_CONCURRENCY, "max_restarts": 0}


def check_actor_options(resource: str) -> None:
    """Refuse at start a worker request Ray would refuse for every actor (by Ray's own option checks)."""
    try:
        _remote_host_class().options(**actor_options(resource))
    except ValueError as exc:
        raise ClusterError(
            f"--worker-resource {resource!r}: Ray cannot place a worker with it: {exc}"
        ) from None


class RayWorker(WorkerHandle):
    """A worker of the Ray backend: one actor, or a placement group of N actors on one node for N devices per job."""

    def __init__(self, name: str, backend: RayBackend) -> None:
        super().__init__(name, backend.gpus_per_job)
        self.backend = backend
        self._actors: list[Any] = []
        self._placement_group: Any = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def shares_spool(self) -> bool:
        """Only with --shared-spool: otherwise frames and results go through the object store."""
        return self.backend.shared_spool

    def load(self) -> WorkerReport:
        """Create the actor(s) where Ray places them and wait until every rank loaded the model."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        backend = self.backend
        actor_class = _remote_host_class()
        options = actor_options(backend.resource)
        count = backend.gpus_per_job
        try:
            with self._lock:
                if self._closed:
                    raise WorkerLost(f"worker {self.name} was closed while starting")
                if count > 1:
                    bundle = {backend.resource: 1}  # bundles name Ray's CPU and GPU like any resource
                    self._placement_group = placement_group([bundle] * count, strategy="STRICT_PACK")
            if count > 1:
                ray.get(self._placement_group.ready())  # waits until one node has the N devices free
            with self._lock:
                if self._closed:
                    raise WorkerLost(f"worker {self.name} was closed while starting")
                for rank in range(count):
                    rank_options = dict(options)
                    if count > 1:
                        rank_options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                            placement_group=self._placement_group, placement_group_bundle_index=rank
                        )
                    self._actors.append(
                        actor_class.options(**rank_options).remote(backend.runner, backend.preview_interval)
                    )
            if count > 1:
                init = ray.get(self._actors[0].rendezvous.remote())
                groups: list[GroupSpec | None] = [
                    GroupSpec(rank, count, init, backend.context_parallel) for rank in range(count)
                ]
            else:
                groups = [None]
            reports = ray.get([a.load_in_group.remote(g) for a, g in zip(self._actors, groups, strict=True)])
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(_death_cause(exc)) from None
        return reports[0]

    def run(
        self,
        ticket: JobTicket,
        inputs: Mapping[str, bytes] | None,
        on_update: Callable[[LiveSnapshot], None],
    ) -> JobOutcome:
        """Run the job on every rank, following rank 0's progress; the outcome is rank 0's."""
        import ray

        try:
            # Each frame goes into the object store once, read and put one at a time (``inputs`` reads a frame
            # when indexed); every rank of a group fetches the same objects, one at a time too.
            frame_refs = {name: ray.put(inputs[name]) for name in inputs} if inputs is not None else None
            refs = [actor.run.remote(ticket, frame_refs) for actor in self._actors]
            seen = -1
            while True:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                if len(done) == len(refs):
                    outcome: JobOutcome = ray.get(refs)[0]
                    if outcome.files is not None:  # ObjectRefs: fetched one at a time as they are written
                        outcome.files = _fetched(outcome.files)
                    return outcome
                seen, snapshot = ray.get(self._actors[0].poll.remote(ticket.job_id, seen, POLL_SECONDS))
                if snapshot is not None:
                    on_update(snapshot)
                else:  # not started yet, or just ended: wait for the result rather than poll again
                    ray.wait(refs, num_returns=len(refs), timeout=POLL_SECONDS)
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"{self.name}: {_death_cause(exc)}") from None

    def cancel(self, job_id: str) -> None:
        """Tell rank 0 (it answers on its own thread, while the job's thread samples)."""
        if self._actors:
            self._actors[0].cancel.remote(job_id)

    def want_previews(self, job_id: str, wanted: bool) -> None:
        """Tell rank 0, which makes the previews."""
        if self._actors:
            self._actors[0].want_previews.remote(job_id, wanted)

    def lost_reason(self) -> str | None:
        """The worker's node is no longer alive in the cluster."""
        if self.report is None:
            return None
        alive = {n["NodeID"] for n in _alive_nodes()}
        return None if self.report.node in alive else f"{self.name}: its node {self.report.node} died"

    def close(self) -> None:
        """Kill the actors and free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not ray.is_initialized():
            return
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already dead with its node
                log.debug("worker %s: kill: %s", self.name, exc)
        if self._placement_group is not None:
            try:
                remove_placement_group(self._placement_group)
            except Exception as exc:
                log.debug("worker %s: removing its placement group: %s", self.name, exc)


class RayBackend:
    """Workers as Ray actors on a Ray cluster, one per GPU (or per ``gpus_per_job`` GPUs of one node)."""

    def __init__(
        self,
        address: str,
        runner: RunnerSpec,
        *,
        resource: str = "GPU",
        gpus_per_job: int = 1,
        context_parallel: str = "ulysses",
        shared_spool: bool = False,
        preview_interval: float = 1.0,
        allow_remote: bool = False,
    ) -> None:
        if gpus_per_job < 1:
            raise ValueError(f"--gpus-per-job {gpus_per_job}: expected 1 or more devices per job")
        check_remote(address, allow_remote)
        self.address = address
        self.runner = runner
        self.resource = worker_resource(resource)
        check_actor_options(
            self.resource
        )  # before connecting: a request Ray refuses fails every job otherwise
        self.gpus_per_job = gpus_per_job
        self.context_parallel = context_parallel
        self.shared_spool = shared_spool
        self.preview_interval = preview_interval
        self._owns_connection = connect(address)
        self._count = 0
        try:
            self._check_resource()
        except ClusterError:
            self.close()
            raise

    def _check_resource(self) -> None:
        nodes = _alive_nodes()
        if not any(n["Resources"].get(self.resource, 0) >= 1 for n in nodes):
            if self.resource in ("GPU", "CPU"):
                how = f"start nodes with them (`ray start --address HEAD:6379 --num-{self.resource.lower()}s N`)"
            else:
                how = f"start nodes with `ray start --address HEAD:6379 --resources '{{\"{self.resource}\": 1}}'`"
            raise ClusterError(
                f"the Ray cluster at {self.address} has no worker resource {self.resource!r} on any of its "
                f"{len(nodes)} live node(s): {how}, or name the resource with --worker-resource"
            )
        largest = self.largest_node()
        if largest < self.gpus_per_job:
            log.warning(
                "--gpus-per-job %d: no node of the cluster has more than %d %r yet; jobs are refused until one joins",
                self.gpus_per_job,
                largest,
                self.resource,
            )

    def largest_node(self) -> int:
        """The most worker resources (GPUs) any live node offers."""
        return max((int(n["Resources"].get(self.resource, 0)) for n in _alive_nodes()), default=0)

    def slots(self) -> int:
        """How many workers the live nodes have room for: each node's devices, ``gpus_per_job`` at a time."""
        return sum(int(n["Resources"].get(self.resource, 0)) // self.gpus_per_job for n in _alive_nodes())

    def describe(self) -> str:
        """The cluster and what a worker asks of it."""
        return (
            f"Ray cluster at {self.address}: {self.slots()} worker(s) of {self.gpus_per_job} {self.resource!r} each, "
            f"{'shared spool' if self.shared_spool else 'frames through the object store'}"
        )

    def reconcile(self, current: list[WorkerHandle]) -> list[WorkerHandle]:
        """New actors for the room the live nodes have beyond the current workers (Ray places them)."""
        missing = self.slots() - len(current)
        new: list[WorkerHandle] = []
        for _ in range(max(0, missing)):
            self._count += 1
            new.append(RayWorker(f"ray:{self._count}", self))
        return new

    def check_placement(self) -> None:
        """INVALID_ARGUMENT when a job's devices do not fit on any live node."""
        largest = self.largest_node()
        if self.gpus_per_job > largest:
            raise InputError(
                "job",
                f"needs {self.gpus_per_job} {self.resource!r} devices on one node (this engine runs each job over "
                f"--gpus-per-job {self.gpus_per_job}), but the largest live node of the Ray cluster has {largest}; "
                "add a bigger node or restart the engine with a smaller --gpus-per-job",
            )

    def close(self) -> None:
        """Disconnect from the cluster if this backend connected."""
        import ray

        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
