"""What to install when Vera Edit's host code does not import in a DCC's Python: one sentence, written once for
the Nuke menu and self-test (`nuke_gizmos/vera_install_check.py`) and both Resolve scripts.

The generated protobuf and gRPC code checks the installed versions when it is imported and raises protobuf's
``VersionError`` or a ``RuntimeError`` (not an ImportError) when they are older than it needs; those messages
carry the versions, so the advice names them. Nothing here imports grpcio or protobuf (``vera_plugin``'s own
``__init__`` loads the client lazily for that reason), so this module imports where they are missing or too old.
"""

from __future__ import annotations

import re
import sys

_VERSION = r"(\d+(?:\.\d+)*)"

# Per host: which Python is meant, pip's flags for it, and where the README explains the set-up.
HOSTS = {
    "nuke": ("Nuke's Python {major}.{minor}", "--user ", "the README, 'Nuke'"),
    "resolve": ("the Python {major}.{minor} Resolve uses", "", "the README, 'DaVinci Resolve'"),
}


def what_to_install(exc: BaseException, host: str) -> str:
    """A sentence saying what to install into `host`'s Python ("nuke" or "resolve"), from the import error `exc`."""
    python_words, user, readme = HOSTS[host]
    python = python_words.format(major=sys.version_info.major, minor=sys.version_info.minor)
    text = str(exc)
    grpc = re.search(rf"grpc package installed is at version {_VERSION}.*?grpcio>={_VERSION}", text, re.S)
    if grpc:
        return (
            f"grpcio {grpc.group(1)} is older than the grpcio {grpc.group(2)} Vera Edit's generated code needs: "
            f"python3 -m pip install {user}--upgrade 'grpcio>={grpc.group(2)}' for {python}"
        )
    proto = re.search(rf"gencode {_VERSION} runtime {_VERSION}", text)
    if proto:
        major = int(proto.group(1).split(".")[0])
        return (
            f"protobuf {proto.group(2)} is older than the protobuf {proto.group(1)} Vera Edit's generated code "
            f"needs: python3 -m pip install {user}'protobuf>={proto.group(1)},<{major + 1}' for {python}"
        )
    if "runtime_version" in text or "Descriptors cannot be created directly" in text:
        return (
            f"protobuf is too old for Vera Edit's generated code: python3 -m pip install {user}--upgrade protobuf "
            f"for {python}"
        )
    return f"install grpcio and protobuf for {python} (see {readme})"
