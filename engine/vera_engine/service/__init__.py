"""The engine's job service (`vera.v1.Engine` over gRPC), and the :class:`Engine` it serves, usable without gRPC.

- `engine.py`: the core a program embeds (submit, watch, status, cancel, fetch_paths, close; docs/EMBEDDING.md);
  `servicer.py`: the RPCs translated onto it, and the gRPC server; `serve.py`: ``vera-engine serve``.
- `errors.py` (every exception of the service), `spool.py` (uploads on disk), `store.py` (job records in SQLite),
  `worker.py` (what a job runs with: its context, live state, cancels, events), `runner.py` (what a job runs: the
  pipeline and the layers), `schema.py` (each model's options, and request validation against them), `limits.py`
  (every limit Submit enforces, as GetInfo publishes them), `auth.py` (TLS and tokens), `reflection.py` (gRPC
  reflection v1 beside v1alpha), `safe_files.py` (opening path frames safely, the decode budget, result names), `testing.py` (runners and an engine process for tests).
- `pool/`: where jobs run, one lifecycle for all: one worker in the engine's process (the default), local worker
  processes per device (``--devices``) or Ray actors (``--cluster``), and jobs over several devices
  (``--gpus-per-job``).
"""

from vera_engine.service.engine import Engine
from vera_engine.service.errors import JobCancelled
from vera_engine.service.serve import ServeConfig, add_serve_parser, run_serve, serve_main
from vera_engine.service.servicer import EngineServicer, create_server
from vera_engine.service.worker import JobContext, JobRunner

__all__ = [
    "Engine",
    "EngineServicer",
    "JobCancelled",
    "JobContext",
    "JobRunner",
    "ServeConfig",
    "add_serve_parser",
    "create_server",
    "run_serve",
    "serve_main",
]
