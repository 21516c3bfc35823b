"""Nuke: the "Vera Edit" node, its Generate / Cancel / Bake buttons, the menus and the pane.

Import it inside Nuke only (it imports ``nuke``): ``nuke_gizmos/menu.py`` calls :func:`setup`, and the node's
saved knob scripts call ``vera_plugin.hosts.nuke.button(...)`` and friends, so these names are the stable API.
The code lives in :mod:`vera_plugin.hosts.nuke.adapter`.
"""

from vera_plugin.hosts.nuke.adapter import *  # noqa: F403
from vera_plugin.hosts.nuke.adapter import __all__  # noqa: F401
