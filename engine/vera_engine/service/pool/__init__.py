"""A pool of workers behind one front door: every device of a node (``--devices``) or a Ray cluster (``--cluster``).

- `dispatch.py`: the front door's side, shared by both backends: :class:`Pool` (FIFO dispatch to idle workers,
  progress relay, results into the spool, requeue on a lost worker) and the :class:`WorkerHandle` a backend makes.
- `host.py`: the worker's side, the same in a local process and in a Ray actor: :class:`WorkerHost` (one runner
  loaded once, one job at a time, long-polled progress, cancel), a job's inputs and results as bytes, and the
  rank groups of a job over several devices (context parallelism).
- `local.py`: :class:`LocalBackend`, one process per local device, no Ray.
- `ray_backend.py`: :class:`RayBackend`, Ray actors with ``num_gpus=1`` or placement groups (imports Ray only when
  used: ``pip install 'vera-edit[cluster]'``).
"""

from vera_engine.service.errors import WorkerLost
from vera_engine.service.pool.dispatch import Pool, PoolBackend, WorkerHandle
from vera_engine.service.pool.host import JobOutcome, JobTicket, RunnerSpec, WorkerHost
from vera_engine.service.pool.local import LocalBackend, parse_devices

__all__ = [
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
