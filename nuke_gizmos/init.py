"""Vera Edit for Nuke: plugin paths only (runs in every session, terminal renders included).

Install: add this folder to NUKE_PATH, or in ~/.nuke/init.py call ``nuke.pluginAddPath("/path/to/nuke_gizmos")``.
When vera_plugin is not pip-installed into Nuke's Python, the repository's plugin/ and proto/ folders beside
this one are put on the path, and so is $VERA_PYTHONPATH (a folder holding grpcio and protobuf for Nuke's
Python). Nothing is imported here, so a farm render never needs grpcio.
"""

import os

import nuke

_here = os.path.dirname(os.path.abspath(__file__))
_repo = os.path.dirname(_here)
_extra = [p for p in os.environ.get("VERA_PYTHONPATH", "").split(os.pathsep) if p]
for _path in [*_extra, os.path.join(_repo, "proto"), os.path.join(_repo, "plugin")]:
    if os.path.isdir(_path):
        nuke.pluginAddPath(_path)
