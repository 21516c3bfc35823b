"""The engine's job service (`vera.v1.Engine` over gRPC).

- `engine.py`: the core (spool, durable job store, worker); `servicer.py`: the RPCs and the gRPC server;
  `serve.py`: ``vera-engine serve``.
- `spool.py` (uploads on disk), `store.py` (job records in SQLite), `worker.py` (the job thread and its events),
  `runner.py` (what a job runs: the pipeline and the layers), `schema.py` (each model's options, and request
  validation against them), `limits.py` (every limit Submit enforces, as GetInfo publishes them), `auth.py` (TLS
  and tokens), `reflection.py` (gRPC reflection v1 beside v1alpha), `imageio.py` (frames in), `testing.py`
  (runners and an engine process for tests).
- `pool/`: jobs on several workers behind the same front door — local processes per device or Ray actors.
- `pool/`: several devices behind one engine: the dispatch shared by local worker processes (``--devices``) and
  Ray actors (``--cluster``), the worker side, and jobs over several devices (``--gpus-per-job``).
"""

from vera_engine.service.engine import Engine
from vera_engine.service.errors import JobCancelled
from vera_engine.service.serve import add_serve_parser, run_serve, serve_main
from vera_engine.service.servicer import EngineServicer, create_server
from vera_engine.service.worker import JobContext, JobRunner

__all__ = [
    "Engine",
    "EngineServicer",
    "JobCancelled",
    "JobContext",
    "JobRunner",
    "add_serve_parser",
    "create_server",
    "run_serve",
    "serve_main",
]
