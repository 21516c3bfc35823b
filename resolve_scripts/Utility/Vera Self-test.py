"""Vera Edit's self-test for DaVinci Resolve: Workspace ▸ Scripts ▸ Vera Self-test. Run it first, and send back
any FAIL line as it is. On Resolve Studio it also runs from outside Resolve (``python3 "Vera Self-test.py"``,
with RESOLVE_SCRIPT_API / RESOLVE_SCRIPT_LIB / PYTHONPATH set as Resolve's Developer/Scripting/README.txt says).

It saves your project, works in a scratch project it deletes at the end, and loads your project again. The checks
are in ``vera_plugin.hosts.resolve.selftest``; this file goes beside "Vera Edit.py" (see the README).
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
    from vera_plugin.hosts.resolve.selftest import main
except Exception as _exc:  # ImportError, protobuf's VersionError, grpcio's RuntimeError
    print(f"FAIL  import vera_plugin: {type(_exc).__name__}: {_exc}. {_what_to_install(_exc)}.")
else:
    # Resolve gives menu scripts `resolve`, `fusion` and `bmd`: with them (and $VERA_ENGINE) the window is driven too.
    _failures = main(
        globals().get("resolve"),
        sys.argv[1:] if __name__ == "__main__" and len(sys.argv) > 1 else None,
        globals().get("fusion"),
        globals().get("bmd"),
    )
    if __name__ == "__main__" and globals().get("resolve") is None:
        sys.exit(min(_failures, 100))
