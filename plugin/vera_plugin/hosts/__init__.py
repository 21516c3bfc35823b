"""Host adapters: thin modules that connect one application (Nuke, Resolve) to the host-neutral logic.

Each adapter imports its host's API (``nuke``, ...) at import time, so import only the one you run in:
``import vera_plugin.hosts.nuke`` inside Nuke. Everything that can be decided without the host lives in
``vera_plugin.schema_ui``, ``vera_plugin.cache`` and ``vera_plugin.generate``.
"""
