"""Vera Edit for Nuke: menus (GUI sessions only). Nodes ▸ Vera ▸ Vera Edit and the "Vera Edit" pane.

A guarded import: without grpcio/protobuf in Nuke's Python, Nuke still starts and says what is missing.
``setup()`` is safe to run twice.
"""

import nuke

try:
    import vera_plugin.hosts.nuke as vera_nuke
except ImportError as exc:
    nuke.tprint(
        f"Vera Edit: not loaded ({exc}). Install grpcio and protobuf for Nuke's Python "
        "(see the README, 'Installing into Nuke')."
    )
else:
    vera_nuke.setup()
