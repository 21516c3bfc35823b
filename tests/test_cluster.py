"""The engine on a real local Ray cluster (``ray.cluster_utils.Cluster``), no mocks of Ray.

The head node offers no worker resource (the tests' driver attaches to it, so it is never removed); two worker nodes
each offer one ``vera_gpu``, a custom resource standing in for a GPU, so the placement code that runs is the one
that places GPU workers (``num_gpus=1`` is the same request under Ray's name for GPUs). Jobs of the shipped checkpoint
are compared with the same jobs on a single-process engine run here, at the same thread count (Ray runs its workers
with one thread per process).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest
import ray
from ray.cluster_utils import Cluster

from tests.service_helpers import assert_split_equals_one_process, wait_for
from vera_engine.service import Engine, create_server
from vera_engine.service.pool import RunnerSpec
from vera_engine.service.pool.ray_backend import RayBackend
from vera_engine.service.runner import PipelineRunner
from vera_engine.service.testing import EngineProcess, PassThroughRunner
from vera_plugin.client import EngineClient, EngineError
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RESOURCE = "vera_gpu"
NODE_ARGS = dict(num_cpus=1, object_store_memory=100 * 2**20)
SHIPPED = RunnerSpec(PipelineRunner, {"model": "default"})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray's workers run: the single-process reference must sum in the same order
    cluster = Cluster(
        initialize_head=True, connect=False, head_node_args=dict(**NODE_ARGS, include_dashboard=False)
    )
    cluster.worker_nodes_by_test = [cluster.add_node(**NODE_ARGS, resources={RESOURCE: 1}) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="WARNING")
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    torch.set_num_threads(threads)


class Front:
    """A front door (Engine with a Ray pool) in this process on a free loopback port, and a client."""

    def __init__(
        self,
        spool: Path,
        runner: RunnerSpec,
        *,
        gpus_per_job: int = 1,
        shared_spool: bool = False,
        resource: str = RESOURCE,
    ) -> None:
        backend = RayBackend(
            "auto", runner, resource=resource, gpus_per_job=gpus_per_job, shared_spool=shared_spool
        )
        self.engine = Engine(spool, PassThroughRunner(), pool=backend)
        self.server, port = create_server(self.engine, "127.0.0.1", 0)
        self.engine.start()
        self.server.start()
        self.client = EngineClient(f"127.0.0.1:{port}", timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.engine.stop()


@pytest.fixture
def fronts() -> Iterator[list[Front]]:
    made: list[Front] = []
    yield made
    for front in made:
        front.stop()


class Reference:
    """The single-process engine (one in-process worker) that pool results must equal."""

    def __init__(self, spool: Path) -> None:
        self.engine = Engine(spool, PipelineRunner("default", device="cpu"))
        self.server, port = create_server(self.engine, "127.0.0.1", 0)
        self.engine.start()
        self.server.start()
        self.client = EngineClient(f"127.0.0.1:{port}", timeout=30)
        self.client.wait_until_serving(120)
        self.out = spool / "fetched"

    def result(self, plate: np.ndarray, **job) -> list[np.ndarray]:
        job_id = self.client.submit_arrays(plate, list(range(1, len(plate) + 1)), **job)
        final = self.client.wait(job_id)
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        return [_read(f) for f in self.client.fetch(job_id, self.out / job_id)]


@pytest.fixture(scope="module")
def reference(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    ref.client.close()
    ref.server.stop(0).wait()
    ref.engine.stop()


def _plate(seed: int, frames: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((frames, 32, 40, 3), dtype=np.float32) * 0.8


def _read(path: Path) -> np.ndarray:
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    pixels = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float")).reshape(spec.height, spec.width, -1)
    inp.close()
    return pixels


def _fetch(client: EngineClient, job_id: str, out: Path) -> list[np.ndarray]:
    return [_read(f) for f in client.fetch(job_id, out / job_id)]


def _identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _worker_nodes(cluster: Cluster) -> set[str]:
    return {n.node_id for n in cluster.worker_nodes_by_test}


def test_six_jobs_run_on_both_workers_identical_to_a_single_engine(
    cluster: Cluster, reference: Reference, fronts: list[Front], tmp_path: Path
) -> None:
    front = Front(tmp_path / "spool", SHIPPED)
    fronts.append(front)
    client = front.client
    client.wait_until_serving(180)
    jobs = {
        client.submit_arrays(
            _plate(seed), [1, 2, 3], prompt="add a red circle moving left", steps=3, seed=seed, guidance=2.0
        ): seed
        for seed in range(6)
    }
    # A longer job, watched: its progress and previews come back from the remote worker while it runs. (The
    # front door relays the worker's latest state, not every step, so a job of a few fast steps could end
    # between two relays; twenty steps leave room to see it run on a busy CI machine.)
    watched = client.submit_arrays(
        _plate(6), [1, 2, 3], prompt="add a red circle moving left", steps=20, seed=6
    )
    statuses: list[pb.JobStatus] = []
    final = client.wait(watched, callback=statuses.append, previews=True)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    running = [s for s in statuses if s.state == pb.JOB_STATE_RUNNING]
    assert running and max(s.step for s in running) >= 1 and running[-1].total_steps == 20
    assert any(s.HasField("preview") and s.preview.width > 0 for s in statuses)
    # The finished job keeps the worker's last progress (the proto's JobStatus promise), relayed or not.
    assert (final.step, final.total_steps, final.progress) == (20, 20, 1.0)
    finals = {j: client.wait(j) for j in jobs}
    assert all(f.state == pb.JOB_STATE_SUCCEEDED for f in finals.values()), [f.error for f in finals.values()]
    assert all((f.step, f.total_steps) == (3, 3) for f in finals.values())
    # Both workers ran jobs, one per node; GetInfo and ListJobs say where.
    info = client.info()
    assert len(info.workers) == 2 and {w.node for w in info.workers} == _worker_nodes(cluster)
    assert all(w.model == "vera-tiny" and w.device.kind == "cpu" and w.devices == 1 for w in info.workers)
    assert all(w.state == pb.WORKER_STATE_IDLE for w in info.workers)
    assert {f.worker for f in finals.values()} == {w.name for w in info.workers}
    finals[watched] = final
    assert {s.job_id: s.worker for s in client.list_jobs()} == {j: f.worker for j, f in finals.items()}
    assert info.models[0].weights_hash and info.device.name.startswith("pool of 2 workers")
    for job_id, seed in jobs.items():
        pooled = _fetch(client, job_id, tmp_path / "pooled")
        _identical(
            pooled,
            reference.result(
                _plate(seed), prompt="add a red circle moving left", steps=3, seed=seed, guidance=2.0
            ),
        )


def test_cancel_on_a_remote_worker_stops_within_a_step_and_the_worker_takes_the_next_job(
    cluster: Cluster, fronts: list[Front], tmp_path: Path
) -> None:
    # With --shared-spool (the workers of this cluster see the test's folders): results are written in place.
    front = Front(tmp_path / "spool", RunnerSpec(PassThroughRunner, {"step_seconds": 0.4}), shared_spool=True)
    fronts.append(front)
    client = front.client
    client.wait_until_serving(120)
    plate = _plate(0, frames=1)
    busy = client.submit_arrays(plate, [1], prompt="keeps the other worker busy", steps=60)
    victim = client.submit_arrays(plate, [1], prompt="cancelled", steps=60)
    seen: list[pb.JobStatus] = []
    for status in client.watch(victim):
        seen.append(status)
        if status.state == pb.JOB_STATE_RUNNING and status.step >= 2:
            break
    at_cancel = seen[-1].step
    follower = threading.Thread(target=lambda: seen.extend(client.watch(victim)))
    follower.start()
    answer = client.cancel(victim)
    follower.join(60)
    assert answer.state == pb.JOB_STATE_CANCELLED and seen[-1].state == pb.JOB_STATE_CANCELLED
    steps_after = [s.step for s in seen if s.state == pb.JOB_STATE_RUNNING]
    assert max(steps_after) <= at_cancel + 1, (at_cancel, steps_after)
    # The worker that ran the cancelled job takes the next one (the other is still busy).
    following = client.submit_arrays(plate, [1], prompt="next", steps=2)
    final = client.wait(following)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.worker == answer.worker
    fetched = client.fetch(following, tmp_path / "out")
    np.testing.assert_allclose(_read(fetched[0])[..., :3], plate[0], atol=1e-3)
    assert client.status(busy).state == pb.JOB_STATE_RUNNING
    client.cancel(busy)


def test_a_job_needing_more_devices_than_any_node_has_is_invalid_argument(
    cluster: Cluster, fronts: list[Front], tmp_path: Path
) -> None:
    front = Front(tmp_path / "spool", RunnerSpec(PassThroughRunner, {}), gpus_per_job=2)
    fronts.append(front)
    with pytest.raises(EngineError) as error:
        front.client.submit_arrays(_plate(0, frames=1), [1], prompt="too big")
    assert error.value.code == "INVALID_ARGUMENT"
    assert "needs 2 'vera_gpu' devices on one node" in error.value.details
    assert "largest live node of the Ray cluster has 1" in error.value.details
    assert front.client.list_jobs() == []


def test_worker_resource_cpu_runs_jobs_on_ray_cpus(
    cluster: Cluster, fronts: list[Front], tmp_path: Path
) -> None:
    # `--worker-resource CPU` once started, listed the pool, and failed every job: Ray refuses "CPU" in
    # `resources`. It is Ray's num_cpus now: one worker per CPU of the cluster (three single-CPU nodes here).
    front = Front(tmp_path / "spool", RunnerSpec(PassThroughRunner, {}), resource="cpu")
    fronts.append(front)
    front.client.wait_until_serving(120)
    job = front.client.submit_arrays(_plate(0, frames=1), [1], prompt="on a CPU", steps=2)
    final = front.client.wait(job)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    ran_it = [w for w in front.client.info().workers if w.name == final.worker]
    assert ran_it and ran_it[0].device.kind == "cpu"


def _serve(*flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vera_engine.service", "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_serve_refuses_an_address_that_does_not_answer_and_a_cluster_without_the_resource(
    cluster: Cluster, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    run = _serve("--spool", str(tmp_path / "a"), "--cluster", f"127.0.0.1:{closed}")
    assert run.returncode == 2
    assert f"cannot reach the Ray cluster at 127.0.0.1:{closed}" in run.stderr and "refused" in run.stderr
    run = _serve(
        "--spool", str(tmp_path / "b"), "--cluster", cluster.address, "--worker-resource", "tpu_slice"
    )
    assert run.returncode == 2
    assert "has no worker resource 'tpu_slice' on any of its 3 live node(s)" in run.stderr
    assert "--worker-resource" in run.stderr


def test_front_door_killed_and_restarted_on_the_same_spool_finishes_every_job_once(
    cluster: Cluster, reference: Reference, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    flags = ["--cluster", cluster.address, "--worker-resource", RESOURCE]
    job = dict(prompt="add a red circle moving left", steps=12, guidance=2.0)
    front = EngineProcess(spool, "default", extra=flags).start()
    try:
        with EngineClient(front.address, timeout=30) as client:
            client.wait_until_serving(180)
            jobs = [client.submit_arrays(_plate(10 + i), [1, 2, 3], seed=i, **job) for i in range(3)]
            for status in client.watch(jobs[0]):
                if status.state == pb.JOB_STATE_RUNNING and status.step >= 2:
                    break
            front.kill()  # SIGKILL: the front door dies mid-job; its Ray job and actors go with it
    finally:
        front.kill()
    with (
        EngineProcess(spool, "default", extra=[*flags, "--port", str(front.port)]) as front,
        EngineClient(front.address, timeout=30) as client,
    ):
        finals = [client.wait(j) for j in jobs]
        assert [f.state for f in finals] == [pb.JOB_STATE_SUCCEEDED] * 3, [f.error for f in finals]
        assert finals[0].attempts == 2 and finals[2].attempts == 1
        # Every job ran to the end exactly once: one result set each, equal to an uninterrupted single engine's.
        listed = client.list_jobs()
        assert sorted(s.job_id for s in listed) == sorted(jobs)
        assert all(
            s.output_files == ["vera_edit.0001.exr", "vera_edit.0002.exr", "vera_edit.0003.exr"]
            for s in listed
        )
        _identical(_fetch(client, jobs[0], tmp_path / "pooled"), reference.result(_plate(10), seed=0, **job))


def test_a_node_removed_while_its_job_samples(
    cluster: Cluster, reference: Reference, fronts: list[Front], tmp_path: Path
) -> None:
    front = Front(tmp_path / "spool", SHIPPED)
    fronts.append(front)
    client = front.client
    wait_for(
        lambda: [w.state for w in client.info().workers] == [pb.WORKER_STATE_IDLE] * 2,
        what="two workers",
        timeout=120,
    )
    job = dict(prompt="add a red circle moving left", steps=40, guidance=2.0)
    first, second = (client.submit_arrays(_plate(20 + i), [1, 2, 3], seed=i, **job) for i in range(2))
    for status in client.watch(second):
        if status.state == pb.JOB_STATE_RUNNING and status.step >= 2:
            break
    nodes = {w.name: w.node for w in client.info().workers}
    doomed = next(n for n in cluster.worker_nodes_by_test if n.node_id == nodes[status.worker])
    cluster.remove_node(doomed, allow_graceful=False)
    cluster.worker_nodes_by_test.remove(doomed)
    meanwhile = client.submit_arrays(_plate(22), [1, 2, 3], seed=2, **job)
    finals = [client.wait(j) for j in (first, second, meanwhile)]
    assert [f.state for f in finals] == [pb.JOB_STATE_SUCCEEDED] * 3, [f.error for f in finals]
    assert finals[1].attempts == 2 and finals[0].attempts == finals[2].attempts == 1
    survivor = next(n for n, node in nodes.items() if node != doomed.node_id)
    assert finals[1].worker == survivor
    states = {w.name: w.state for w in client.info().workers}
    assert states[status.worker] == pb.WORKER_STATE_LOST and states[survivor] == pb.WORKER_STATE_IDLE
    _identical(_fetch(client, second, tmp_path / "pooled"), reference.result(_plate(21), seed=1, **job))


def test_gpus_per_job_2_is_a_placement_group_on_one_node_equal_to_one_process(
    cluster: Cluster, reference: Reference, fronts: list[Front], tmp_path: Path
) -> None:
    big = cluster.add_node(**NODE_ARGS, resources={RESOURCE: 2})
    cluster.wait_for_nodes()
    front = Front(tmp_path / "spool", SHIPPED, gpus_per_job=2)
    fronts.append(front)
    client = front.client
    client.wait_until_serving(240)
    (worker,) = client.info().workers
    assert worker.devices == 2 and worker.node == big.node_id
    plate = np.random.default_rng(3).random((8, 32, 32, 3), dtype=np.float32) * 0.8
    job = dict(prompt="add a red circle moving left", steps=4, seed=7, guidance=2.0, bit_depth="float")
    job_id = client.submit_arrays(plate, list(range(1, 9)), **job)
    final = client.wait(job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    split = _fetch(client, job_id, tmp_path / "split")
    single = reference.result(plate, **job)
    assert_split_equals_one_process(split, single)
