"""Vera Edit host side: the gRPC client, the `vera` CLI, the Qt panel and host adapters.

Imports with only grpcio and protobuf installed (a DCC's Python): numpy and PySide6 are optional. The client is
loaded on first use, so `vera_plugin.install_advice` imports even where grpcio or protobuf are missing or too old
(and can say which to install).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers see the real classes; at run time they load on first use
    from vera_plugin.client import EngineClient, EngineError

__all__ = ["EngineClient", "EngineError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vera_plugin import client

        return getattr(client, name)
    raise AttributeError(f"module 'vera_plugin' has no attribute {name!r}")
