"""``nukescripts.panels``: dockable panels, as Nuke's own ``nukescripts/panels.py`` builds them (tests only).

Source: Nuke's ``nukescripts/panels.py`` (shipped with Nuke; the Python developer guide's "Custom Panels" and
``nukescripts.panels.registerWidgetAsPanel`` reference). ``registerWidgetAsPanel(widget, name, id)`` does not
look ``widget`` up: it pastes the string into the command of a ``PyCustom_Knob``,
``"__import__('nukescripts').panels.WidgetKnob(" + widget + ")"``, which Nuke evaluates in its ``__main__``
namespace when the pane is opened (Windows ▸ Custom ▸ <name>, or a saved layout restoring ``id``). A dotted
name that ``__main__`` never imported therefore fails only then, with a NameError, exactly as modelled here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nuke

__panels: dict[str, Callable[..., Any]] = {}


def registerPanel(id: str, command: Callable[..., Any]) -> None:
    """Remember how to re-create panel ``id`` (layouts restore panels through this)."""
    __panels[id] = command


def unregisterPanel(id: str, command: Callable[..., Any]) -> None:
    del __panels[id]


def restorePanel(id: str) -> Any:
    """Re-create panel ``id`` as a saved layout does; ``None`` when it was never registered."""
    command = __panels.get(id)
    return command() if command is not None else None


class WidgetKnob:
    """What the PyCustom_Knob's command creates: ``makeUI()`` instantiates the widget class."""

    def __init__(self, widget: Any) -> None:
        self.widgetClass = widget
        self.widget: Any = None

    def makeUI(self) -> Any:
        self.widget = self.widgetClass()
        return self.widget

    def updateValue(self) -> None:
        pass


class PythonPanel:
    """A panel of knobs. ``addToPane()`` docks it: each PyCustom_Knob's command is evaluated then, and the
    object's ``makeUI()`` builds the widget."""

    def __init__(self, title: str = "", id: str = "", scrollable: bool = True) -> None:
        self._title, self._id = title, id
        self._knobs: list[nuke.Knob] = []
        self.widgets: list[Any] = []

    def addKnob(self, knob: nuke.Knob) -> None:
        self._knobs.append(knob)

    def knobs(self) -> dict[str, nuke.Knob]:
        return {k.name(): k for k in self._knobs}

    def addToPane(self, pane: Any = None) -> PythonPanel:
        for knob in self._knobs:
            if isinstance(knob, nuke.PyCustom_Knob):
                self.widgets.append(knob._build().makeUI())
        return self


def registerWidgetAsPanel(widget: str, name: str, id: str, create: bool = False) -> Any:
    """Nuke's own implementation, condensed: the Pane menu entry and the restore hook build a PythonPanel whose
    PyCustom_Knob command is ``"__import__('nukescripts').panels.WidgetKnob(" + widget + ")"``."""

    class Panel(PythonPanel):
        def __init__(self, widget: str, name: str, id: str) -> None:
            PythonPanel.__init__(self, name, id)
            self.customKnob = nuke.PyCustom_Knob(
                name, "", "__import__('nukescripts').panels.WidgetKnob(" + widget + ")"
            )
            self.addKnob(self.customKnob)

    def addPanel(toPane: bool = True) -> Any:
        panel = Panel(widget, name, id)
        return panel.addToPane() if toPane else panel

    nuke.menu("Pane").addCommand(name, addPanel)
    registerPanel(id, addPanel)
    if create:
        return Panel(widget, name, id)
    return None
