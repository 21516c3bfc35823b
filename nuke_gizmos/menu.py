"""Vera Edit for Nuke: menus (GUI sessions only). Nodes ▸ Vera ▸ Vera Edit and the "Vera Edit" pane.

A guarded import: when grpcio or protobuf is missing, or installed at a version the generated code refuses
(protobuf's VersionError, grpcio's RuntimeError), Nuke still starts and the Script Editor says what to install.
``setup()`` is safe to run twice.
"""

import nuke
from vera_install_check import what_to_install

try:
    import vera_plugin.hosts.nuke as vera_nuke
except Exception as exc:  # ImportError, and protobuf's/grpcio's version checks (VersionError, RuntimeError)
    nuke.tprint(f"Vera Edit: not loaded ({type(exc).__name__}: {exc}). {what_to_install(exc)}.")
else:
    vera_nuke.setup()
