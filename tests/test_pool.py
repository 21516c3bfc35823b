"""The local pool (``--devices``): one worker process per device behind one front door, no Ray.

Real worker processes (spawned), the real dispatch code that the Ray backend shares, the model-free runner where the
model is not the point and the shipped checkpoint where it is (context parallelism over two gloo processes).
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import threading
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from tests.service_helpers import P, assert_split_equals_one_process, raw_chunks, uniform_frame, wait_for
from vera_engine.service import Engine, create_server, serve_main
from vera_engine.service import store as job_store
from vera_engine.service.pool import LocalBackend, RunnerSpec, parse_devices
from vera_engine.service.runner import PipelineRunner
from vera_engine.service.testing import PassThroughRunner
from vera_plugin import cli as vera_cli
from vera_plugin.client import EngineClient
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = pytest.mark.timeout(300)


class PoolHarness:
    """An Engine with a local pool + gRPC server on a free loopback port, and a client."""

    def __init__(self, spool: Path, backend: LocalBackend, **engine_kw) -> None:
        self.engine = Engine(spool, PassThroughRunner(), pool=backend, **engine_kw)
        self.server, port = create_server(self.engine, "127.0.0.1", 0)
        self.engine.start()
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.client = EngineClient(self.address, timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.engine.stop()


@pytest.fixture
def harnesses():
    made: list[PoolHarness] = []
    yield made
    for h in made:
        h.stop()


def _plate(frames: int = 2, size: tuple[int, int] = (32, 40), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((frames, size[0], size[1], 3), dtype=np.float32) * 0.8


def _read(path: Path) -> np.ndarray:
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    pixels = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float")).reshape(spec.height, spec.width, -1)
    inp.close()
    return pixels


def _passthrough_pool(devices: list[str], step_seconds: float = 0.2) -> LocalBackend:
    return LocalBackend(devices, RunnerSpec(PassThroughRunner, {"step_seconds": step_seconds}))


@pytest.mark.slow
def test_two_cpu_workers_run_two_jobs_at_the_same_time(harnesses, tmp_path: Path, capsys) -> None:
    h = PoolHarness(tmp_path / "spool", _passthrough_pool(["cpu", "cpu"]))
    harnesses.append(h)
    h.client.wait_until_serving(120)
    plate = _plate()
    jobs = [h.client.submit_arrays(plate, [11, 12], prompt=f"job {i}", steps=8) for i in range(3)]

    def both_running() -> bool:
        states = {s.job_id: s.state for s in h.client.list_jobs()}
        return states[jobs[0]] == states[jobs[1]] == pb.JOB_STATE_RUNNING

    wait_for(both_running, what="the first two jobs running together", timeout=60)
    # The third waits at the head of the queue while both workers are busy.
    third = h.client.status(jobs[2])
    assert third.state == pb.JOB_STATE_QUEUED and third.queue_position == 0
    info = h.client.info()
    busy = {w.job_id: w for w in info.workers}
    assert set(busy) == {jobs[0], jobs[1]}
    assert all(
        w.state == pb.WORKER_STATE_BUSY and w.model == "passthrough" and w.devices == 1 for w in busy.values()
    )
    assert {w.device.kind for w in info.workers} == {"cpu"} and all(w.node for w in info.workers)
    # `vera info` prints the pool: each worker, its node, device, model, state and job.
    assert vera_cli.main(["info", "--engine", h.address]) == 0
    printed = capsys.readouterr().out
    for worker in info.workers:
        assert (
            f"worker   {worker.name} on {worker.node}: test cpu x1, passthrough, busy {worker.job_id}"
            in printed
        )

    finals = [h.client.wait(j) for j in jobs]
    assert [f.state for f in finals] == [pb.JOB_STATE_SUCCEEDED] * 3, [f.error for f in finals]
    assert {finals[0].worker, finals[1].worker} == {"local:0", "local:1"}
    assert finals[2].worker in ("local:0", "local:1") and all(f.attempts == 1 for f in finals)
    # ListJobs says where each job ran.
    assert {s.job_id: s.worker for s in h.client.list_jobs()} == {f.job_id: f.worker for f in finals}
    # The results are the runner's real work (the plate comes back as the composite).
    files = h.client.fetch(jobs[2], tmp_path / "out")
    np.testing.assert_allclose(_read(files[0])[..., :3], plate[0], atol=1e-3)
    assert [w.state for w in h.client.info().workers] == [pb.WORKER_STATE_IDLE] * 2


@pytest.mark.slow
def test_pooled_jobs_keep_the_progress_they_stopped_at(harnesses, tmp_path: Path) -> None:
    # The proto's JobStatus promise, for jobs run by a pool worker as for the in-process one: a finished job
    # says how far it got, whether or not the front door's relay saw its last step.
    h = PoolHarness(tmp_path / "spool", _passthrough_pool(["cpu"], step_seconds=0.1))
    harnesses.append(h)
    h.client.wait_until_serving(120)
    done = h.client.submit_arrays(_plate(), [11, 12], prompt="to the end", steps=4)
    stopped = h.client.submit_arrays(_plate(), [11, 12], prompt="cancelled half-way", steps=200)
    finished = h.client.wait(done)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
    assert (finished.step, finished.total_steps, finished.progress) == (4, 4, 1.0)
    wait_for(lambda: h.client.status(stopped).step >= 3, what="the second job sampling", timeout=60)
    h.client.cancel(stopped)
    cancelled = h.client.wait(stopped)
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert 3 <= cancelled.step < 200 and cancelled.total_steps == 200
    assert cancelled.progress == pytest.approx(cancelled.step / 200, abs=0.01)


@pytest.mark.slow
def test_a_killed_worker_process_puts_its_job_back_and_is_replaced(harnesses, tmp_path: Path) -> None:
    backend = _passthrough_pool(["cpu", "cpu"], step_seconds=0.3)
    h = PoolHarness(tmp_path / "spool", backend)
    harnesses.append(h)
    h.client.wait_until_serving(120)
    victim_job = h.client.submit_arrays(_plate(), [1, 2], prompt="interrupted", steps=20)
    status = wait_for(
        lambda: (s := h.client.status(victim_job)).state == pb.JOB_STATE_RUNNING and s.step >= 2 and s,
        what="the job sampling",
        timeout=60,
    )
    victim = h.engine.pool.handle(status.worker)
    os.kill(victim.pids()[0], signal.SIGKILL)
    final = h.client.wait(victim_job)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2 and final.worker != status.worker
    # The lost worker is listed as such, and a new process took its device.
    info = h.client.info()
    states = {w.name: w.state for w in info.workers}
    assert states[status.worker] == pb.WORKER_STATE_LOST
    wait_for(
        lambda: sum(w.state == pb.WORKER_STATE_IDLE for w in h.client.info().workers) == 2,
        what="a replacement worker",
        timeout=60,
    )


@pytest.mark.slow
def test_a_job_whose_worker_keeps_dying_fails_naming_the_cause(harnesses, tmp_path: Path) -> None:
    h = PoolHarness(tmp_path / "spool", _passthrough_pool(["cpu"], step_seconds=0.3), max_attempts=1)
    harnesses.append(h)
    h.client.wait_until_serving(120)
    job = h.client.submit_arrays(_plate(), [1, 2], prompt="doomed", steps=20)
    wait_for(lambda: h.client.status(job).step >= 1, what="the job sampling", timeout=60)
    (worker,) = h.client.info().workers
    os.kill(h.engine.pool.handle(worker.name).pids()[0], signal.SIGKILL)
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_FAILED
    assert "lost 1 times" in final.error and "killed by signal 9" in final.error
    # The engine keeps serving on the replacement worker.
    assert h.client.wait(h.client.submit_arrays(_plate(frames=1), [1], prompt="next", steps=2)).state == (
        pb.JOB_STATE_SUCCEEDED
    )


def _single_process_result(tmp_path: Path, plate: np.ndarray, **job) -> list[np.ndarray]:
    engine = Engine(tmp_path / "reference-spool", PipelineRunner("default", device="cpu"))
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    try:
        with EngineClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(120)
            job_id = client.submit_arrays(plate, list(range(1, len(plate) + 1)), **job)
            assert client.wait(job_id).state == pb.JOB_STATE_SUCCEEDED
            return [_read(f) for f in client.fetch(job_id, tmp_path / "reference")]
    finally:
        server.stop(0).wait()
        engine.stop()


@pytest.mark.slow
def test_gpus_per_job_2_on_cpu_equals_one_process(harnesses, tmp_path: Path) -> None:
    plate = _plate(frames=8, size=(32, 32), seed=3)
    job = dict(prompt="add a red circle moving left", steps=4, seed=7, guidance=2.0, bit_depth="float")
    backend = LocalBackend(
        ["cpu", "cpu"],
        RunnerSpec(PipelineRunner, {"model": "default"}),
        gpus_per_job=2,
        context_parallel="ulysses",
    )
    h = PoolHarness(tmp_path / "spool", backend)
    harnesses.append(h)
    h.client.wait_until_serving(180)
    (worker,) = h.client.info().workers
    assert worker.devices == 2 and worker.name == "local:0" and worker.model == "vera-tiny"
    job_id = h.client.submit_arrays(plate, list(range(1, 9)), **job)
    final = h.client.wait(job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    split = [_read(f) for f in h.client.fetch(job_id, tmp_path / "split")]
    # Rank 0 wrote the layers, once.
    assert final.output_files == [f"vera_edit.{i:04d}.exr" for i in range(1, 9)]
    single = _single_process_result(tmp_path, plate, **job)
    assert len(split) == len(single) == 8
    assert_split_equals_one_process(split, single)


def test_devices_and_pool_flags_are_checked(tmp_path: Path, capsys) -> None:
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"] and parse_devices("cpu,cpu") == [
        "cpu",
        "cpu",
    ]
    spool = str(tmp_path / "spool")
    cases = {
        ("--devices", "cpu,cpu,cpu", "--gpus-per-job", "2"): "would stay unused",
        ("--devices", "cpu", "--gpus-per-job", "2"): "lists only 1",
        ("--devices", "gpu0"): "'gpu0' is not a device",
        ("--devices", "cuda:0,cuda:0"): "listed twice",
        ("--devices", "cuda:7"): "not present",
        ("--devices", "cpu", "--cluster", "auto"): "choose one",
        ("--devices", "cpu", "--device", "cpu"): "--device picks one device",
        ("--devices", "cpu", "--shared-spool"): "--shared-spool needs --cluster",
        (
            "--gpus-per-job",
            "2",
        ): "needs --devices or --cluster",
        ("--devices", "cpu,cpu", "--gpus-per-job", "2", "--context-parallel", "ring"): "log-sum-exp",
    }
    for flags, message in cases.items():
        assert serve_main(["--spool", spool, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_store_records_workers_and_gives_up_on_jobs_whose_worker_keeps_dying(tmp_path: Path) -> None:
    # A spool from before jobs recorded their worker is read (the column is added).
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript(
        job_store._SCHEMA.replace(",\n    worker TEXT NOT NULL DEFAULT ''", "").replace("IF NOT EXISTS ", "")
    )
    db.execute("INSERT INTO jobs (id, state, header, created_at) VALUES ('old', 3, x'', 1.0)")
    db.commit()
    db.close()
    store = job_store.JobStore(tmp_path / "old.sqlite")
    assert store.get("old").worker == ""
    store.add("j1", pb.JobHeader(prompt="a"), capacity=5)
    store.add("j2", pb.JobHeader(prompt="b"), capacity=5)
    assert store.claim_next(worker="ray:1").worker == "ray:1"
    # Lost once: back at the head of the queue (before j2), the attempt counted.
    assert store.requeue_lost("j1", max_attempts=2, cause="node x died")
    assert store.queued_ids() == ["j1", "j2"] and store.get("j1").attempts == 1
    assert store.claim_next(worker="ray:2").id == "j1"
    assert not store.requeue_lost("j1", max_attempts=2, cause="node y died")
    failed = store.get("j1")
    assert failed.state == job_store.FAILED and failed.worker == "ray:2"
    assert failed.error == "the worker running this job was lost 2 times; not retrying (last: node y died)"
    store.close()


def test_store_shortens_a_long_error_in_one_place_for_every_worker_kind(tmp_path: Path) -> None:
    # In-process worker and pool front door both finish jobs through the store: an exception text of any
    # length is kept to MAX_ERROR_CHARS there (every JobStatus repeats it), with its start intact.
    from vera_engine.service.limits import MAX_ERROR_CHARS

    store = job_store.JobStore(tmp_path / "jobs.sqlite")
    store.add("j1", pb.JobHeader(prompt="a"), capacity=5)
    store.claim_next(worker="local:0")
    store.finish("j1", job_store.FAILED, error="RuntimeError: " + "x" * 10_000, progress=(3, 8, 0.375))
    failed = store.get("j1")
    assert len(failed.error) == MAX_ERROR_CHARS and failed.error.startswith("RuntimeError: xxx")
    assert failed.error.endswith("...") and (failed.step, failed.total_steps) == (3, 8)
    store.close()


# ---------------------------------------------------------------------------------------------------------
# The in-process tier: the pool's dispatch with its one worker in this process (no processes, no Ray).


class _Gate:
    """Holds a call at a known point until the test lets it go: `entered` is set when the call arrives."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.release.wait(20), "the test never released the gate"


def _in_process_pool(make_harness, runner: PassThroughRunner, *, shares_spool: bool = True, **engine_kw):
    from vera_engine.service.pool.inprocess import InProcessBackend

    backend = InProcessBackend(runner, shares_spool=shares_spool)
    return make_harness(runner, pool=backend, **engine_kw)


def _one_frame_job(client: EngineClient, steps: int = 2) -> str:
    return client.submit(
        pb.JobHeader(prompt="x", frames=[1], steps=steps), raw_chunks(P, 1, uniform_frame())
    ).job_id


def test_a_cancel_while_the_front_door_packs_the_inputs_is_not_lost(make_harness, monkeypatch) -> None:
    # A Ray worker without a shared spool gets the plate as bytes, read by the front door first (pack_inputs):
    # a Cancel that arrives meanwhile must stop the job, not be forgotten while cancel_requested says true.
    from vera_engine.service.pool import dispatch

    gate = _Gate()
    real_pack = dispatch.pack_inputs

    def slow_pack(inputs_dir: Path) -> dict[str, bytes]:
        gate.hold()
        return real_pack(inputs_dir)

    monkeypatch.setattr(dispatch, "pack_inputs", slow_pack)
    runner = PassThroughRunner()
    h = _in_process_pool(make_harness, runner, shares_spool=False, cancel_wait_seconds=0)
    job = _one_frame_job(h.client)
    assert gate.entered.wait(20)
    asked = h.client.cancel(job)
    assert asked.state == pb.JOB_STATE_RUNNING and asked.cancel_requested
    gate.release.set()
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_CANCELLED, final
    assert job not in runner.started and final.output_files == []


def test_a_cancel_while_a_streamed_frame_is_read_is_not_lost(make_harness, monkeypatch) -> None:
    # Without a shared spool the inputs are streamed (issue 28 item 11): pack_inputs only names the files and each
    # is read as the worker side walks them, after the job was handed over. A Cancel during that read must stop
    # the job before the runner starts it.
    from vera_engine.service.pool import dispatch
    from vera_engine.service.pool.streamed import LazyFiles

    gate = _Gate()
    real_pack = dispatch.pack_inputs

    def pack_with_a_slow_read(inputs_dir: Path) -> LazyFiles:
        files = real_pack(inputs_dir)

        def load(name: str) -> bytes:
            if name != "manifest.json":
                gate.hold()
            return files[name]

        return LazyFiles({name: functools.partial(load, name) for name in files})

    monkeypatch.setattr(dispatch, "pack_inputs", pack_with_a_slow_read)
    runner = PassThroughRunner()
    h = _in_process_pool(make_harness, runner, shares_spool=False, cancel_wait_seconds=0)
    job = _one_frame_job(h.client)
    assert gate.entered.wait(20)
    asked = h.client.cancel(job)
    assert asked.state == pb.JOB_STATE_RUNNING and asked.cancel_requested
    gate.release.set()
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_CANCELLED, final
    assert job not in runner.started and final.output_files == []


def test_a_cancel_between_the_claim_and_the_dispatch_is_not_lost(make_harness) -> None:
    # The store marks a job RUNNING when the pool claims it, before the pool registers it as running: a Cancel
    # in that window is remembered and met as the job starts (not answered "already ended (RUNNING)").
    gate = _Gate()
    runner = PassThroughRunner()
    h = _in_process_pool(make_harness, runner, cancel_wait_seconds=0)
    store = h.engine.store
    real_claim = store.claim_next

    def claim_then_hold(worker: str = "") -> job_store.JobRecord | None:
        record = real_claim(worker=worker)
        if record is not None:
            gate.hold()
        return record

    store.claim_next = claim_then_hold  # type: ignore[method-assign]
    h.client.wait_until_serving(20)
    job = _one_frame_job(h.client)
    assert gate.entered.wait(20)
    asked = h.client.cancel(job)
    assert asked.state == pb.JOB_STATE_RUNNING and asked.cancel_requested
    gate.release.set()
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_CANCELLED, final
    assert job not in runner.started


def test_worker_resources_are_asked_of_ray_as_ray_names_them() -> None:
    # `--worker-resource CPU` (or GPU) once started an engine whose every job failed: Ray refuses CPU and GPU in
    # `resources`. Ray's own option checks (the ones each actor start runs) must accept every request made.
    pytest.importorskip("ray")
    from vera_engine.service.errors import ClusterError
    from vera_engine.service.pool.ray_backend import (
        _remote_host_class,
        actor_options,
        check_actor_options,
        worker_resource,
    )

    for typed, ray_name, request in [
        ("CPU", "CPU", {"num_cpus": 1}),
        ("cpu", "CPU", {"num_cpus": 1}),
        ("GPU", "GPU", {"num_gpus": 1, "num_cpus": 0}),
        ("vera_gpu", "vera_gpu", {"resources": {"vera_gpu": 1}, "num_cpus": 0}),
    ]:
        assert worker_resource(typed) == ray_name
        options = actor_options(ray_name)
        assert {k: options.get(k) for k in request} == request
        assert ("resources" in options) == (ray_name not in ("CPU", "GPU"))
        _remote_host_class().options(**options)  # raises ValueError for a request Ray refuses
        check_actor_options(ray_name)
    for name in ("", "memory", "object_store_memory", "node:10.0.0.1"):
        with pytest.raises(ClusterError, match="--worker-resource"):
            worker_resource(name)


def test_pool_info_counts_a_nodes_memory_once_and_forgets_long_lost_workers(monkeypatch) -> None:
    # Issue 29 item 10: two CPU workers on one 23.5 GiB machine read "33.1 of 47.1 GiB free", and a killed worker
    # stayed listed as lost forever. GPU workers each have their own memory.
    from types import SimpleNamespace

    from vera_engine.service.pool import dispatch
    from vera_engine.service.pool.host import WorkerReport

    class Listed(dispatch.WorkerHandle):  # only what GetInfo reads of a worker
        def __init__(self, name: str, node: str, kind: str, total: int, free: int) -> None:
            super().__init__(name, 1)
            device = pb.DeviceInfo(name=kind, kind=kind, memory_total_bytes=total, memory_free_bytes=free)
            self.report = WorkerReport(node=node, host=node, device=device.SerializeToString(), models=[])

        load = run = cancel = want_previews = lost_reason = close = None  # type: ignore[assignment]
        shares_spool = True  # type: ignore[assignment]

    gib = 2**30
    pool = SimpleNamespace(
        _lock=threading.Lock(),
        _handles=[
            Listed("local:0", "a", "cpu", 23 * gib, 16 * gib),
            Listed("local:1", "a", "cpu", 23 * gib, 16 * gib),
            Listed("ray:1", "b", "cuda", 80 * gib, 70 * gib),
            Listed("ray:2", "b", "cuda", 80 * gib, 60 * gib),
        ],
        _lost=[],
    )
    info = dispatch.Pool.device_info(pool)
    assert info.memory_total_bytes == (23 + 80 + 80) * gib and info.memory_free_bytes == (16 + 70 + 60) * gib
    old, recent = Listed("ray:3", "b", "cuda", 1, 1), Listed("ray:4", "b", "cuda", 1, 1)
    now = 1_000_000.0
    monkeypatch.setattr(dispatch.time, "monotonic", lambda: now)
    old.lost_at, recent.lost_at = now - dispatch.LOST_SHOWN_SECONDS - 1, now - 5
    pool._lost = [old, recent]
    names = [w.name for w in dispatch.Pool.workers(pool)]
    assert "ray:4" in names and "ray:3" not in names
