"""What to install when ``vera_plugin`` does not import in Nuke's Python (used by menu.py and vera_selftest.py).

The generated protobuf and gRPC code checks the installed versions when it is imported and raises protobuf's
``VersionError`` or a ``RuntimeError`` (not an ImportError) when they are older than it needs; those messages
carry the versions, so the advice can name them. Nothing here imports grpcio or protobuf.
"""

import re
import sys

_VERSION = r"(\d+(?:\.\d+)*)"


def what_to_install(exc):
    """A sentence saying what to install for Nuke's Python, from the import error ``exc``."""
    text = str(exc)
    python = f"Nuke's Python {sys.version_info.major}.{sys.version_info.minor}"
    grpc = re.search(rf"grpc package installed is at version {_VERSION}.*?grpcio>={_VERSION}", text, re.S)
    if grpc:
        return (f"grpcio {grpc.group(1)} is older than the grpcio {grpc.group(2)} Vera Edit's generated code "
                f"needs: python3 -m pip install --user --upgrade 'grpcio>={grpc.group(2)}' for {python}")  # fmt: skip
    proto = re.search(rf"gencode {_VERSION} runtime {_VERSION}", text)
    if proto:
        major = int(proto.group(1).split(".")[0])
        return (f"protobuf {proto.group(2)} is older than the protobuf {proto.group(1)} Vera Edit's generated "
                f"code needs: python3 -m pip install --user 'protobuf>={proto.group(1)},<{major + 1}' for {python}")  # fmt: skip
    if "runtime_version" in text or "Descriptors cannot be created directly" in text:
        return f"protobuf is too old for Vera Edit's generated code: python3 -m pip install --user --upgrade protobuf for {python}"
    return f"install grpcio and protobuf for {python} (see the README, 'Nuke')"
