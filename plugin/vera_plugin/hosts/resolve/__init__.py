"""DaVinci Resolve: send the clip under the playhead to an engine and stack the returned layers above it.

- :mod:`~vera_plugin.hosts.resolve.adapter`: the steps as plain functions (which clip, its frames as EXRs, the
  job, placing the results); what a TD script calls, re-exported here.
- :mod:`~vera_plugin.hosts.resolve.window`: the Workspace ▸ Scripts window (Resolve's UIManager).
- :mod:`~vera_plugin.hosts.resolve.timeline`: timecode, frame-range, path and render-setting arithmetic (no
  Resolve calls).
- :mod:`~vera_plugin.hosts.resolve.matte`: the matte channel as grey EXRs Resolve can use as a clip matte.

Nothing here imports Resolve's own module: the Resolve object is passed in or found by ``get_resolve``.
"""

from vera_plugin.hosts.resolve.adapter import *  # noqa: F403
from vera_plugin.hosts.resolve.adapter import __all__  # noqa: F401
