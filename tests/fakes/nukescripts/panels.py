"""``nukescripts.panels.registerWidgetAsPanel``: registers a Qt widget class as a dockable Nuke pane."""

from __future__ import annotations

import importlib
from typing import Any

import nuke

_registered: dict[str, tuple[str, str]] = {}


def _widget_class(widget: str) -> Any:
    module, _, name = widget.rpartition(".")
    return getattr(importlib.import_module(module), name)


def registerWidgetAsPanel(widget: str, name: str, id: str, create: bool = False) -> Any:
    """As in Nuke: ``widget`` is the dotted path of a QWidget class; adds ``name`` to the Pane menu."""
    _widget_class(widget)  # Nuke fails at registration if the class cannot be found
    _registered[id] = (widget, name)
    nuke.menu("Pane").addCommand(name, f"nukescripts.panels.__panels[{id!r}]()")
    if create:
        return _widget_class(widget)()
    return None
