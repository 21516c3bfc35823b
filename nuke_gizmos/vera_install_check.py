"""What to install when ``vera_plugin`` does not import in Nuke's Python (used by menu.py and vera_selftest.py).

The advice itself is ``vera_plugin.install_advice`` (shared with the Resolve scripts), which imports without
grpcio or protobuf; this file only covers ``vera_plugin`` not being on Nuke's path at all.
"""


def what_to_install(exc):
    """A sentence saying what to install for Nuke's Python, from the import error ``exc``."""
    try:
        from vera_plugin.install_advice import what_to_install as advice
    except ImportError:
        return ("install vera_plugin for Nuke's Python (python3 -m pip install --user /path/to/vera-edit), and "
                "grpcio and protobuf (see the README, 'Nuke')")  # fmt: skip
    return advice(exc, "nuke")
