"""Vera Edit for DaVinci Resolve: Workspace ▸ Scripts ▸ Vera Edit.

Thin on purpose: the window and all the work live in ``vera_plugin`` (``vera_plugin.hosts.resolve.window`` and
``vera_plugin.hosts.resolve``). Install notes are in the README's Resolve section: this file goes into
Resolve's ``Fusion/Scripts/Utility`` folder, and Resolve's Python needs grpcio, protobuf and vera_plugin
(installed, or found through ``$VERA_PLUGIN_PATH``, the folders holding ``vera_plugin`` and ``vera_proto``).
"""

import os
import re
import sys

for _path in reversed([p for p in os.environ.get("VERA_PLUGIN_PATH", "").split(os.pathsep) if p]):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _what_to_install(exc):
    # The generated protobuf/gRPC code raises protobuf's VersionError or a RuntimeError (not an ImportError)
    # when the installed versions are older than it needs; their messages carry the versions.
    text, version = str(exc), r"(\d+(?:\.\d+)*)"
    grpc = re.search(rf"grpc package installed is at version {version}.*?grpcio>={version}", text, re.S)
    if grpc:
        return (
            f"grpcio {grpc.group(1)} is too old: python3 -m pip install --upgrade 'grpcio>={grpc.group(2)}'"
        )
    proto = re.search(rf"gencode {version} runtime {version}", text)
    if proto:
        major = int(proto.group(1).split(".")[0])
        return (f"protobuf {proto.group(2)} is too old: python3 -m pip install "
                f"'protobuf>={proto.group(1)},<{major + 1}'")  # fmt: skip
    return ("install grpcio and protobuf into the Python Resolve uses, and vera_plugin (pip install the "
            "repository) or set VERA_PLUGIN_PATH; see the README")  # fmt: skip


try:
    from vera_plugin.hosts.resolve.window import main
except Exception as _exc:  # ImportError, protobuf's VersionError, grpcio's RuntimeError
    # Said in Resolve's console instead of a bare traceback.
    print(f"Vera Edit: cannot load vera_plugin ({type(_exc).__name__}: {_exc}). {_what_to_install(_exc)}.")
else:
    # Resolve runs menu scripts with `resolve`, `fusion` and `bmd` defined; outside Resolve main() finds them.
    main(globals().get("resolve"), globals().get("fusion"), globals().get("bmd"))
