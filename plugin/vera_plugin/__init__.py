"""Vera Edit host side: the gRPC client, the `vera` CLI, the Qt panel and host adapters.

Imports with only grpcio and protobuf installed (a DCC's Python): numpy and PySide6 are optional.
"""

from vera_plugin.client import EngineClient, EngineError

__all__ = ["EngineClient", "EngineError"]
