"""Vera Edit for DaVinci Resolve: Workspace ▸ Scripts ▸ Vera Edit.

Thin on purpose: the window and all the work live in ``vera_plugin`` (``vera_plugin.hosts.resolve.window`` and
``vera_plugin.hosts.resolve``). Install notes are in the README's Resolve section: this file goes into
Resolve's ``Fusion/Scripts/Utility`` folder, and Resolve's Python needs grpcio, protobuf and vera_plugin
(installed, or found through ``$VERA_PLUGIN_PATH``, the folders holding ``vera_plugin`` and ``vera_proto``).
"""

import os
import sys

for _path in reversed([p for p in os.environ.get("VERA_PLUGIN_PATH", "").split(os.pathsep) if p]):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _what_to_install(exc):
    # The advice is written once in vera_plugin.install_advice (it imports without grpcio and protobuf, whose
    # version checks raise protobuf's VersionError or a RuntimeError naming the versions).
    try:
        from vera_plugin.install_advice import what_to_install
    except ImportError:
        return ("install vera_plugin into the Python Resolve uses (python3 -m pip install /path/to/vera-edit) "
                "or set VERA_PLUGIN_PATH, and grpcio and protobuf; see the README, 'DaVinci Resolve'")  # fmt: skip
    return what_to_install(exc, "resolve")


try:
    from vera_plugin.hosts.resolve.window import main
except Exception as _exc:  # ImportError, protobuf's VersionError, grpcio's RuntimeError
    # Said in Resolve's console instead of a bare traceback.
    print(f"Vera Edit: cannot load vera_plugin ({type(_exc).__name__}: {_exc}). {_what_to_install(_exc)}.")
else:
    # Resolve runs menu scripts with `resolve`, `fusion` and `bmd` defined; outside Resolve main() finds them.
    main(globals().get("resolve"), globals().get("fusion"), globals().get("bmd"))
