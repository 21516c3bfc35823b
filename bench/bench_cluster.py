"""The pool's cost per job against a single engine, and two workers' throughput against one.

1. Added time per job: the same job (default: a 49-frame 832x480 half-float plate) on a single-process engine and
   on pools of one worker — a Ray actor with frames and results through Ray's object store, a Ray actor with
   ``--shared-spool``, and a local worker process (``--devices``) — each front door in this process on loopback.
   For each it reports the job's time in the engine (started_at → finished_at, which for a pool includes dispatch,
   packing the inputs, the object store both ways and writing the results into the spool) and submit-to-done as a
   client sees it; the added time is the pool's minus the single engine's, also as a share of the job.
2. Throughput: ``--throughput-jobs`` small jobs submitted at once to a Ray pool of one worker and of two workers
   (``vera_gpu`` custom resources on a local single-node Ray instance); jobs/hour of each and their ratio.

Usage (repository root):
    taskset -c 1 python bench/bench_cluster.py --out bench_cluster.json            # this repo's CPU figures
    python bench/bench_cluster.py --model /path/to/vera-1.3b --steps 30             # GPU node with Ray
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.service import Engine, create_server
from vera_engine.service.pool import LocalBackend, RunnerSpec
from vera_engine.service.runner import PipelineRunner
from vera_engine.service.testing import PassThroughRunner
from vera_plugin.client import EngineClient
from vera_proto.vera.v1 import engine_pb2 as pb

RESOURCE = "vera_gpu"


class Front:
    """An engine (single, or a pool front door) on a free loopback port with a client."""

    def __init__(self, spool: Path, model: str, pool: Any = None) -> None:
        runner = PassThroughRunner() if pool is not None else PipelineRunner(model, device="cpu")
        self.engine = Engine(spool, runner, pool=pool, queue_capacity=64)
        self.server, port = create_server(self.engine, "127.0.0.1", 0)
        self.engine.start()
        self.server.start()
        self.client = EngineClient(f"127.0.0.1:{port}", timeout=600)
        self.client.wait_until_serving(600)
        if pool is not None:  # every worker loaded, not just the first
            while any(w.state != pb.WORKER_STATE_IDLE for w in self.client.info().workers):
                time.sleep(0.2)

    def run(self, plate: np.ndarray, **job: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        job_id = self.client.submit_arrays(plate, list(range(1001, 1001 + len(plate))), **job)
        submitted = time.perf_counter()
        final = self.client.wait(job_id)
        done = time.perf_counter()
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        return {
            "upload_s": submitted - t0,
            "in_engine_s": final.finished_at - final.started_at,
            "submit_to_done_s": done - t0,
        }

    def throughput(self, plate: np.ndarray, jobs: int, **job: Any) -> float:
        t0 = time.perf_counter()
        ids = [self.client.submit_arrays(plate, list(range(1, 1 + len(plate))), **job) for _ in range(jobs)]
        for job_id in ids:
            assert self.client.wait(job_id).state == pb.JOB_STATE_SUCCEEDED
        return jobs / (time.perf_counter() - t0) * 3600.0

    def stop(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.engine.stop()


def _ray_pool(model: str, workers: int, shared_spool: bool) -> Any:
    import ray

    from vera_engine.service.pool.ray_backend import RayBackend

    if ray.is_initialized():
        ray.shutdown()
    # address="local": a new single-node instance, never a cluster some other program started on this machine.
    ray.init(
        address="local",
        num_cpus=workers,
        resources={RESOURCE: workers},
        include_dashboard=False,
        logging_level="WARNING",
    )
    return RayBackend(
        "auto", RunnerSpec(PipelineRunner, {"model": model}), resource=RESOURCE, shared_spool=shared_spool
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (the median is reported)")
    parser.add_argument("--throughput-jobs", type=int, default=6)
    parser.add_argument("--throughput-frames", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import ray
    import torch

    rng = np.random.default_rng(0)
    plate = (rng.random((args.frames, args.height, args.width, 3), dtype=np.float32) * 0.8).astype(np.float16)
    job = dict(prompt="add a red circle moving left", steps=args.steps, seed=1, guidance=2.0)
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "ray": ray.__version__,
        },
        "job": {"frames": args.frames, "width": args.width, "height": args.height, "steps": args.steps},
    }
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))

    def measure(name: str, pool_factory: Any) -> dict[str, float]:
        front = Front(root / name, args.model, pool_factory() if pool_factory else None)
        try:
            front.run(plate[:2], **{**job, "steps": 1})  # warm: first-job costs (imports, caches) not counted
            runs = [front.run(plate, **job) for _ in range(args.repeats)]
        finally:
            front.stop()
        median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        print(name, json.dumps(median), flush=True)
        return median

    torch.set_num_threads(1)  # as Ray runs its workers: the single engine does the same arithmetic
    settings = {
        "single_engine": None,
        "ray_object_store": lambda: _ray_pool(args.model, 1, shared_spool=False),
        "ray_shared_spool": lambda: _ray_pool(args.model, 1, shared_spool=True),
        "local_process": lambda: LocalBackend(["cpu"], RunnerSpec(PipelineRunner, {"model": args.model})),
    }
    per_job = {name: measure(name, factory) for name, factory in settings.items()}
    single = per_job["single_engine"]
    for name, figures in per_job.items():
        if name != "single_engine":
            added = figures["in_engine_s"] - single["in_engine_s"]
            figures["added_s"] = added
            figures["added_share"] = added / single["in_engine_s"]
    results["per_job"] = per_job

    small = plate[: args.throughput_frames, :256, :256]
    throughput = {}
    for workers in (1, 2):
        front = Front(
            root / f"throughput{workers}", args.model, _ray_pool(args.model, workers, shared_spool=False)
        )
        try:
            front.run(small[:1], **{**job, "steps": 1})
            throughput[f"{workers}_workers_jobs_per_hour"] = front.throughput(
                small, args.throughput_jobs, **job
            )
        finally:
            front.stop()
        print(workers, "workers", throughput[f"{workers}_workers_jobs_per_hour"], "jobs/h", flush=True)
    throughput["ratio"] = throughput["2_workers_jobs_per_hour"] / throughput["1_workers_jobs_per_hour"]
    results["throughput"] = throughput
    if ray.is_initialized():
        ray.shutdown()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
