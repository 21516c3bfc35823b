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

try:
    from vera_plugin.hosts.resolve.window import main
except ImportError as _exc:  # say what is missing in Resolve's console instead of a bare traceback
    print(
        f"Vera Edit: cannot load vera_plugin ({_exc}). Install grpcio and protobuf into the Python Resolve "
        "uses, and vera_plugin (pip install the repository) or set VERA_PLUGIN_PATH; see the README."
    )
else:
    # Resolve runs menu scripts with `resolve`, `fusion` and `bmd` defined; outside Resolve main() finds them.
    main(globals().get("resolve"), globals().get("fusion"), globals().get("bmd"))
