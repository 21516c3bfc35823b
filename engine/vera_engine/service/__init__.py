"""The engine's job service: the vera.v1.Engine gRPC server, its durable job store, spool and worker."""

from .server import Engine, EngineServicer, add_serve_parser, create_server, run_serve, serve_main
from .worker import JobCancelled, JobContext, JobRunner

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
