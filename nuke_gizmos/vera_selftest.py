"""Vera Edit's self-test for Nuke. Run it first, and send back any FAIL line as it is:

    nuke -t /path/to/vera-edit/nuke_gizmos/vera_selftest.py [--engine HOST:PORT] [--folder DIR]

(or, in a GUI session with a new script, from the Script Editor: ``exec(open(".../vera_selftest.py").read())``
checks the menus and the pane too, and with ``$VERA_ENGINE`` set before Nuke starts, or
``os.environ["VERA_ENGINE"] = "HOST:PORT"`` typed before the exec, runs the engine job through the node's Generate
button, as an artist does). The checks are in ``vera_plugin.hosts.nuke.selftest``; the exit status is the number
of failed checks.
"""

import os
import sys

import nuke

_here = os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0]))
# As init.py does: the repository's plugin/ and proto/ folders, and $VERA_PYTHONPATH (grpcio, protobuf).
for _path in [
    os.path.join(os.path.dirname(_here), "plugin"),
    os.path.join(os.path.dirname(_here), "proto"),
    *[p for p in os.environ.get("VERA_PYTHONPATH", "").split(os.pathsep) if p],
]:
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)
if _here not in sys.path:
    sys.path.insert(0, _here)

from vera_install_check import what_to_install  # noqa: E402

try:
    from vera_plugin.hosts.nuke.selftest import main
except Exception as exc:  # ImportError, protobuf's VersionError, grpcio's RuntimeError
    nuke.tprint(f"FAIL  import vera_plugin: {type(exc).__name__}: {exc}. {what_to_install(exc)}.")
    if not nuke.GUI:
        sys.exit(1)
else:
    # In the GUI there is no command line: the engine comes from $VERA_ENGINE (main's default).
    _failures = main(sys.argv[1:] if not nuke.GUI else [])
    if not nuke.GUI:
        sys.exit(min(_failures, 100))
