"""Vera Edit for Nuke: menus (GUI sessions only). Nodes ▸ Vera ▸ Vera Edit and the "Vera Edit" pane.

A guarded import: when grpcio or protobuf is missing, or installed at a version the generated code refuses
(protobuf's VersionError, grpcio's RuntimeError), Nuke still starts and the Script Editor says what to install.
``setup()`` is safe to run twice.
"""

import re
import sys

import nuke


def _what_to_install(exc):
    """A sentence saying what to install for Nuke's Python, from the import error ``exc``."""
    text = str(exc)
    python = f"Nuke's Python {sys.version_info.major}.{sys.version_info.minor}"
    grpc = re.search(
        r"grpc package installed is at version (\d+(?:\.\d+)*).*?grpcio>=(\d+(?:\.\d+)*)", text, re.S
    )
    if grpc:
        return (f"grpcio {grpc.group(1)} is older than the grpcio {grpc.group(2)} Vera Edit's generated code "
                f"needs: python3 -m pip install --user --upgrade 'grpcio>={grpc.group(2)}' for {python}")  # fmt: skip
    proto = re.search(r"gencode (\d+(?:\.\d+)*) runtime (\d+(?:\.\d+)*)", text)
    if proto:
        major = int(proto.group(1).split(".")[0])
        return (f"protobuf {proto.group(2)} is older than the protobuf {proto.group(1)} Vera Edit's generated "
                f"code needs: python3 -m pip install --user 'protobuf>={proto.group(1)},<{major + 1}' for {python}")  # fmt: skip
    if "runtime_version" in text or "Descriptors cannot be created directly" in text:
        return f"protobuf is too old for Vera Edit's generated code: python3 -m pip install --user --upgrade protobuf for {python}"
    return f"install grpcio and protobuf for {python} (see the README, 'Nuke')"


try:
    import vera_plugin.hosts.nuke as vera_nuke
except Exception as exc:  # ImportError, and protobuf's/grpcio's version checks (VersionError, RuntimeError)
    nuke.tprint(f"Vera Edit: not loaded ({type(exc).__name__}: {exc}). {_what_to_install(exc)}.")
else:
    vera_nuke.setup()
