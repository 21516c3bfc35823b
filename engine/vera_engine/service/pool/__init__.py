"""Where jobs run: a pool of workers behind one front door. One worker in the engine's process (the default), every
device of a node (``--devices``) or a Ray cluster (``--cluster``); all run a job through the same lifecycle.

- `dispatch.py`: the front door's side, shared by both backends: :class:`Pool` (FIFO dispatch to idle workers,
  progress relay, results into the spool, requeue on a lost worker) and the :class:`WorkerHandle` a backend makes.
- `host.py`: the worker's side, the same in a local process and in a Ray actor: :class:`WorkerHost` (one runner
  loaded once, one job at a time, long-polled progress, cancel), a job's inputs and results as bytes, and the
  rank groups of a job over several devices (context parallelism).
- `inprocess.py`: :class:`InProcessBackend`, the engine's own process as a pool of one worker.
- `local.py`: :class:`LocalBackend`, one process per local device, no Ray.
- `ray_backend.py`: :class:`RayBackend`, Ray actors with ``num_gpus=1`` or placement groups (imports Ray only when
  used: ``pip install -e '.[cluster]'`` from the checkout).
"""

from vera_engine.service.errors import WorkerLost
from vera_engine.service.pool.dispatch import Pool, PoolBackend, WorkerHandle
from vera_engine.service.pool.host import JobOutcome, JobTicket, RunnerSpec, WorkerHost
from vera_engine.service.pool.inprocess import InProcessBackend
from vera_engine.service.pool.local import LocalBackend, parse_devices

__all__ = [
    "InProcessBackend",
    "JobOutcome",
    "JobTicket",
    "LocalBackend",
    "Pool",
    "PoolBackend",
    "RunnerSpec",
    "WorkerHandle",
    "WorkerHost",
    "WorkerLost",
    "parse_devices",
]
