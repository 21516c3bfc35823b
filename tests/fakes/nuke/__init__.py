"""A faithful fake of the part of Nuke's Python API that ``vera_plugin.hosts.nuke`` uses (tests only).

Names and signatures follow Foundry's Nuke Python API reference (and the ``types-nuke`` stubs, which a test
holds the fake to): nodes and knobs, Groups with ``begin``/``end`` and their Input/Output nodes,
``nuke.nodes.X(**knobs)``, ``execute`` on a Write (which really evaluates the node graph upstream and writes EXRs
through OpenImageIO), ``executeInMainThread``, ``ProgressTask``, menus, callbacks, ``scriptSaveAs``/``scriptOpen``.
Each class and function cites its reference entry beside it. The quirks code must handle are modelled, with
their sources beside them:

- string knobs run TCL in ``value()`` (``[cmd]``, ``$var``; TCL's own errors), ``getText()`` is the raw text;
  ``File_Knob.value()`` gives ``%04d`` for ``####`` and no TCL, ``evaluate()`` runs it (a Read's path does);
- ``nukescripts.panels.registerWidgetAsPanel`` evaluates its widget string in ``__main__`` when the pane opens;
- ``createNode`` wires to the selection, places, selects and opens the panel; ``Undo`` groups steps;
- ``executeInMainThreadWithResult`` deadlocks on the main thread (here: raises) and swallows exceptions;
- knobChanged runs for artist edits and with the dummy knobs ``showPanel``/``inputChange``.

Test-only helpers start with ``_fake``: ``_fake_reset``, ``_fake_process_events`` (the GUI's event loop),
``_fake_user_set`` (an artist editing a knob), ``_fake_press`` (an artist clicking a button), ``_fake_calls``
(the API called from outside the fakes, for the self-test's coverage check).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

GUI = True
INTERACTIVE = True
STARTLINE = 0x1000
ENDLINE = 0x2000
INVISIBLE = 0x400
DISABLED = 0x80
NO_ANIMATION = 0x100
READ_ONLY = 0x10000000

# --------------------------------------------------------------------------------------------------------
# Knobs


# Nuke Python API reference (Foundry), nuke.Knob: its methods below as documented there.
class Knob:
    """Base knob: a name, a label, a value, flags, a tooltip."""

    _default: Any = ""

    def __init__(self, name: str, label: str | None = None, *args: Any) -> None:
        self._name = name
        self._label = label if label is not None else name
        self._value: Any = self._default
        self._flags = 0
        self._tooltip = ""
        self._visible = True
        self._enabled = True
        self._node: Node | None = None

    def Class(self) -> str:
        return type(self).__name__

    def name(self) -> str:
        return self._name

    def label(self) -> str:
        return self._label

    def setLabel(self, label: str) -> None:
        self._label = label

    def node(self) -> Node:
        assert self._node is not None
        return self._node

    def value(self) -> Any:
        return self._value

    def getValue(self) -> Any:
        return self._value

    def setValue(self, val: Any) -> bool:
        self._value = val
        return True

    def setTooltip(self, tooltip: str) -> None:
        self._tooltip = tooltip

    def tooltip(self) -> str:
        return self._tooltip

    def setFlag(self, flag: int) -> None:
        self._flags |= flag

    def clearFlag(self, flag: int) -> None:
        self._flags &= ~flag

    def getFlag(self, flag: int) -> bool:
        return bool(self._flags & flag)

    def setVisible(self, visible: bool) -> None:
        self._visible = visible

    def visible(self) -> bool:
        return self._visible

    def setEnabled(self, enabled: bool) -> None:
        self._enabled = enabled

    def enabled(self) -> bool:
        return self._enabled

    def _copy_args(self) -> dict[str, Any]:
        return {}


# Nuke Python API reference (Foundry), nuke.String_Knob: its methods below as documented there.
class String_Knob(Knob):
    """A string knob. Source for the quirks: Foundry's Nuke Python API reference, ``nuke.String_Knob`` (12.2+):
    ``value()`` and ``getValue()`` "Get the evaluated value of this knob as a string - also see getText()", i.e.
    TCL is run on the text (``[cmd ...]`` runs a command, ``$name`` reads a variable; Nuke user guide,
    "Converting Expressions Between Scripting Languages": "[ ] (square brackets) to embed Tcl in ... a string
    knob"); ``getText()`` "Get the non-evaluated value of this knob". A prompt such as ``add a [red] kite`` read
    with ``value()`` fails with TCL's own error, as in Nuke."""

    def __init__(self, name: str, label: str | None = None, value: str = "") -> None:
        super().__init__(name, label)
        self._value = value

    def setValue(self, val: Any, view: str = "default") -> None:  # type: ignore[override]
        if not isinstance(val, str):
            raise TypeError(f"{self._name}: a String_Knob takes a str, not {type(val).__name__}")
        self._value = val

    def setText(self, val: str, view: str = "default") -> None:
        self.setValue(val, view)

    def getText(self, oc: Any = None) -> str:
        return self._value

    def value(self, oc: Any = None) -> str:
        return _tcl(self._value, self._node)

    def getValue(self, oc: Any = None) -> str:
        return self.value(oc)


# Nuke Python API reference (Foundry), nuke.EvalString_Knob: its methods below as documented there.
class EvalString_Knob(String_Knob):
    """``evaluate()``: "Evaluate the string, performing substitutions" (Nuke Python API, nuke.EvalString_Knob)."""

    def evaluate(self, oc: Any = None) -> str:
        return _tcl(self._value, self._node)


# Nuke Python API reference (Foundry), nuke.Multiline_Eval_String_Knob: its methods below as documented there.
class Multiline_Eval_String_Knob(EvalString_Knob):
    pass


# Nuke Python API reference (Foundry), nuke.File_Knob: its methods below as documented there.
class File_Knob(EvalString_Knob):
    """A file path. Nuke Python API, nuke.File_Knob: ``value()``/``getValue()`` "Returns the string on this knob,
    will be normalized to technical notation if sequence (%4d)" (no TCL: a ``[file dirname [value root.name]]``
    path comes back as typed, with ``####`` as ``%04d``); ``getEvaluatedValue()`` and ``evaluate()`` run the TCL."""

    def value(self, oc: Any = None) -> str:
        return _technical_notation(self._value)

    def getValue(self, oc: Any = None) -> str:
        return self.value(oc)

    def getEvaluatedValue(self, oc: Any = None) -> str:
        return _technical_notation(_tcl(self._value, self._node))

    def evaluate(self, oc: Any = None) -> str:
        return _tcl(self._value, self._node)


# Nuke Python API reference (Foundry), nuke.Password_Knob: its methods below as documented there.
class Password_Knob(Knob):
    pass


# Nuke Python API reference (Foundry), nuke.Script_Knob: its methods below as documented there.
class Script_Knob(String_Knob):
    """A button running a script; ``value()`` and ``command()`` are the script's text (nuke.Script_Knob)."""

    def __init__(self, name: str, label: str | None = None, command: str = "") -> None:
        super().__init__(name, label, command)

    def value(self, oc: Any = None) -> str:
        return self._value

    def command(self) -> str:
        return self._value

    def setCommand(self, cmd: str) -> None:
        self._value = cmd

    def execute(self) -> None:
        _run_script(self._value, self.node(), self)

    def _copy_args(self) -> dict[str, Any]:
        return {"command": self._value}


# Nuke Python API reference (Foundry), nuke.PyScript_Knob: its methods below as documented there.
class PyScript_Knob(Script_Knob):
    pass


# Nuke Python API reference (Foundry), nuke.PyCustom_Knob: its methods below as documented there.
class PyCustom_Knob(Script_Knob):
    """A knob holding a Python widget. Nuke Python API, nuke.PyCustom_Knob/PythonCustomKnob: its ``command`` is
    Python *evaluated* (in Nuke's ``__main__`` namespace, as nukescripts.panels' ``WidgetKnob`` expressions are)
    when the knob's UI is built; ``getObject()`` "Returns the custom knob object as created by the 'command'"."""

    def __init__(self, name: str, label: str | None = None, command: str = "") -> None:
        super().__init__(name, label, command)
        self._object: Any = None

    def getObject(self) -> Any:
        return self._object

    def _build(self) -> Any:
        import __main__

        self._object = eval(self._value, vars(__main__))  # Nuke evaluates this string too
        return self._object


# Nuke Python API reference (Foundry), nuke.Text_Knob: its methods below as documented there.
class Text_Knob(Knob):
    def __init__(self, name: str, label: str | None = None, text: str = "") -> None:
        super().__init__(name, label)
        self._value = text


# Nuke Python API reference (Foundry), nuke.Tab_Knob: its methods below as documented there.
class Tab_Knob(Knob):
    pass


# Nuke Python API reference (Foundry), nuke.Array_Knob: its methods below as documented there.
class Array_Knob(Knob):
    _default: Any = 0.0

    def __init__(self, name: str, label: str | None = None, *args: Any) -> None:
        super().__init__(name, label)
        self._range: tuple[float, float] | None = None

    def setRange(self, minimum: float, maximum: float) -> None:
        self._range = (minimum, maximum)

    def min(self) -> float:
        return self._range[0] if self._range else 0.0

    def max(self) -> float:
        return self._range[1] if self._range else 1.0


# Nuke Python API reference (Foundry), nuke.Int_Knob: its methods below as documented there.
class Int_Knob(Array_Knob):
    _default = 0

    def setValue(self, val: Any) -> bool:
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{self._name}: an Int_Knob takes a number, not {type(val).__name__}")
        self._value = int(val)
        return True

    def value(self) -> int:
        return int(self._value)


# Nuke Python API reference (Foundry), nuke.Double_Knob: its methods below as documented there.
class Double_Knob(Array_Knob):
    def setValue(self, val: Any) -> bool:
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{self._name}: a Double_Knob takes a number, not {type(val).__name__}")
        self._value = float(val)
        return True

    def value(self) -> float:
        return float(self._value)


# Nuke Python API reference (Foundry), nuke.Boolean_Knob: its methods below as documented there.
class Boolean_Knob(Array_Knob):
    _default = False

    def __init__(self, name: str, label: str | None = None, value: bool = False) -> None:
        super().__init__(name, label)
        self._value = bool(value)

    def setValue(self, b: Any) -> bool:
        self._value = bool(b)
        return True

    def value(self) -> bool:
        return bool(self._value)


# Nuke Python API reference (Foundry), nuke.Enumeration_Knob: its methods below as documented there.
class Enumeration_Knob(Array_Knob):
    """``value()`` is the chosen item's name, ``getValue()`` its index; ``setValue`` takes either."""

    def __init__(self, name: str, label: str | None = None, values: list[str] | None = None) -> None:
        super().__init__(name, label)
        self._values = [str(v) for v in (values or [])]
        self._value = 0

    def values(self) -> list[str]:
        return list(self._values)

    def setValues(self, values: list[str]) -> None:
        current = self.value()
        self._values = [str(v) for v in values]
        self._value = self._values.index(current) if current in self._values else 0

    def numValues(self) -> int:
        return len(self._values)

    def enumName(self, n: int) -> str:
        return self._values[n]

    def setValue(self, val: Any) -> bool:
        if isinstance(val, str):
            if val not in self._values:
                raise ValueError(f"{self._name}: {val!r} is not one of {self._values}")
            self._value = self._values.index(val)
        else:
            if not 0 <= int(val) < len(self._values):
                raise ValueError(f"{self._name}: index {val} out of range")
            self._value = int(val)
        return True

    def value(self) -> str:
        return self._values[self._value] if self._values else ""

    def getValue(self) -> float:
        return float(self._value)

    def _copy_args(self) -> dict[str, Any]:
        return {"values": list(self._values)}


# Nuke Python API reference (Foundry), nuke.Pulldown_Knob: its methods below as documented there.
class Pulldown_Knob(Enumeration_Knob):
    pass


# Nuke Python API reference (Foundry), nuke.Color_Knob: its methods below as documented there.
class Color_Knob(Array_Knob):
    """An RGB colour; ``setValue(v)`` sets every channel, ``setValue(v, i)`` channel ``i``; ``value(i)``."""

    _size = 3

    def __init__(self, name: str, label: str | None = None, *args: Any) -> None:
        super().__init__(name, label)
        self._value = [0.0] * self._size

    def setValue(self, val: Any, chan: int | None = None) -> bool:  # type: ignore[override]
        if isinstance(val, (list, tuple)):
            if len(val) != self._size:
                raise ValueError(f"{self._name}: expected {self._size} values, got {len(val)}")
            self._value = [float(v) for v in val]
        elif chan is None:
            self._value = [float(val)] * self._size
        else:
            self._value[chan] = float(val)
        return True

    def value(self, index: int | None = None) -> Any:
        return list(self._value) if index is None else self._value[index]


# Nuke Python API reference (Foundry), nuke.AColor_Knob: its methods below as documented there.
class AColor_Knob(Color_Knob):
    """An RGBA colour (``Constant.color``)."""

    _size = 4


# Nuke Python API reference (Foundry), nuke.Format: its methods below as documented there.
class Format:
    """``nuke.Format``: a named image size (``nuke.addFormat("W H [aspect] name")`` makes one)."""

    def __init__(self, width: int, height: int, name: str, aspect: float = 1.0) -> None:
        self._width, self._height, self._name, self._aspect = width, height, name, aspect

    def width(self) -> int:
        return self._width

    def height(self) -> int:
        return self._height

    def name(self) -> str:
        return self._name

    def pixelAspect(self) -> float:
        return self._aspect


# Nuke Python API reference (Foundry), nuke.addFormat.
def addFormat(s: str) -> Format:
    """``nuke.addFormat("W H [pixel aspect] name")`` (Nuke Python API, nuke.addFormat): adds and returns it."""
    parts = s.split()
    if len(parts) not in (3, 4) or not (parts[0].isdigit() and parts[1].isdigit()):
        raise ValueError(f"addFormat({s!r}): expected 'width height [pixel aspect] name'")
    aspect = float(parts[2]) if len(parts) == 4 else 1.0
    fmt = Format(int(parts[0]), int(parts[1]), parts[-1], aspect)
    _STATE.formats[fmt.name()] = fmt
    return fmt


# Nuke Python API reference (Foundry), nuke.formats.
def formats() -> list[Format]:
    return list(_STATE.formats.values())


# Nuke Python API reference (Foundry), nuke.Format_Knob: its methods below as documented there.
class Format_Knob(Knob):
    """A format knob: ``setValue`` takes a format's name or a ``Format``; ``value()`` is the ``Format``."""

    def setValue(self, val: Any) -> bool:  # type: ignore[override]
        name = val.name() if isinstance(val, Format) else str(val)
        if name not in _STATE.formats:
            raise ValueError(f"{self._name}: unknown format {name!r}; add it with nuke.addFormat first")
        self._value = name
        return True

    def value(self) -> Format:
        return _STATE.formats[self._value]


# Nuke Python API reference (Foundry), nuke.Channel_Knob: its methods below as documented there.
class Channel_Knob(Knob):
    """A channel or channel-set knob: only layers and channels the script knows are accepted (as in Nuke)."""

    def setValue(self, name: Any) -> None:  # type: ignore[override]
        if not _known_channels(str(name)):
            raise ValueError(
                f"{self._name}: unknown channel or layer {name!r}; create it with nuke.Layer first"
            )
        self._value = str(name)

    def value(self) -> str:
        return self._value


# Nuke Python API reference (Foundry), nuke.Layer: its methods below as documented there.
class Layer:
    """``nuke.Layer(name, [channels])``: declares a layer (e.g. ``edit`` with ``edit.red`` ...)."""

    def __init__(self, name: str, channels: list[str]) -> None:
        for channel in channels:
            if not channel.startswith(name + "."):
                raise ValueError(f"Layer {name}: channel {channel!r} must be named {name}.<channel>")
        known = _STATE.layers.setdefault(name, [])
        known.extend(c for c in channels if c not in known)
        self._name = name

    def name(self) -> str:
        return self._name

    def channels(self) -> list[str]:
        return list(_STATE.layers[self._name])


# Nuke Python API reference (Foundry), nuke.layers.
def layers(node: Any = None) -> list[str]:
    return list(_STATE.layers)


def _known_channels(name: str) -> bool:
    if name in ("none", "all", "rgb", "alpha") or name in _STATE.layers:
        return True
    layer = name.partition(".")[0]
    return name in _STATE.layers.get(layer, [])


def _technical_notation(path: str) -> str:
    # File_Knob.value(): a "####" sequence comes back as "%04d" (Nuke Python API, nuke.File_Knob).
    return re.sub(r"#+", lambda m: f"%0{len(m.group(0))}d", path)


def _tcl(text: str, node: Any = None) -> str:
    """Nuke's TCL substitution on a string knob: ``\\x`` escapes, ``[command args]`` runs a command (nested ones
    first), ``$name`` / ``$env(NAME)`` read variables; an unknown command or variable is TCL's error."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif char == "[":
            depth, j = 1, i + 1
            while j < len(text) and depth:
                depth += {"[": 1, "]": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise RuntimeError(f"missing close-bracket in {text!r}")
            out.append(_tcl_command(_tcl(text[i + 1 : j - 1], node), node))
            i = j
        elif char == "$":
            match = re.match(r"\$(\w+)(?:\(([^)]*)\))?", text[i:])
            if match is None:
                out.append(char)  # a lone $ is literal
                i += 1
                continue
            name, index = match.groups()
            if name == "env" and index is not None and index in os.environ:
                out.append(os.environ[index])
            else:
                shown = name if index is None else f"{name}({index})"
                raise RuntimeError(f'can\'t read "{shown}": no such variable')
            i += match.end()
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _tcl_command(command: str, node: Any) -> str:
    # The few TCL commands path expressions use: value (Nuke), file dirname / file tail (TCL), frame (Nuke).
    words = command.split()
    if not words:
        return ""
    if words[0] == "value" and len(words) == 2:
        path = words[1]
        owner, _, knob = path.rpartition(".")
        target = _STATE.root if owner == "root" else (node if owner in ("", "this") else toNode(owner))
        if target is None or target.knob(knob) is None:
            raise RuntimeError(f"value: no such knob {path!r}")
        found = target[knob]
        return found.evaluate() if isinstance(found, EvalString_Knob) else str(found.value())
    if words[0] == "file" and len(words) >= 3 and words[1] in ("dirname", "tail"):
        argument = " ".join(words[2:])
        return os.path.dirname(argument) if words[1] == "dirname" else os.path.basename(argument)
    if words == ["frame"]:
        return str(_STATE.frame)
    raise RuntimeError(f'invalid command name "{words[0]}"')


# --------------------------------------------------------------------------------------------------------
# Nodes

_CLASS_KNOBS: dict[str, list[tuple[type[Knob], str, Any]]] = {
    "Read": [
        (File_Knob, "file", ""),
        (Int_Knob, "first", 1),
        (Int_Knob, "last", 1),
        (Int_Knob, "origfirst", 1),
        (Int_Knob, "origlast", 1),
        (Enumeration_Knob, "before", ["hold", "loop", "bounce", "black"]),
        (Enumeration_Knob, "after", ["hold", "loop", "bounce", "black"]),
        (Enumeration_Knob, "on_error", ["error", "black", "checkerboard", "nearest frame"]),
        (String_Knob, "colorspace", "default"),
        (Boolean_Knob, "raw", False),
    ],
    "Write": [
        (File_Knob, "file", ""),
        (Enumeration_Knob, "file_type", ["", "exr", "dpx", "tiff", "png", "jpeg"]),
        (Channel_Knob, "channels", "rgb"),
        (Enumeration_Knob, "datatype", ["16 bit half", "32 bit float"]),
        (
            Enumeration_Knob,
            "compression",
            ["none", "Zip (1 scanline)", "Zip (16 scanlines)", "PIZ Wavelet (32 scanlines)"],
        ),
        (String_Knob, "colorspace", "default"),
        (Boolean_Knob, "raw", False),
        (Boolean_Knob, "create_directories", False),
    ],
    "Merge2": [
        (Enumeration_Knob, "operation", ["over", "plus", "multiply", "under", "in", "out", "copy"]),
        (Channel_Knob, "Achannels", "rgba"),
        (Channel_Knob, "Bchannels", "rgba"),
        (Channel_Knob, "output", "rgba"),
        (Channel_Knob, "also_merge", "none"),
        (Double_Knob, "mix", 1.0),
    ],
    "Copy": [(Channel_Knob, f"{d}{i}", "none") for i in range(4) for d in ("from", "to")],
    "Switch": [(Int_Knob, "which", 0)],
    # Reformat "to box" with "distort" scales the image to box_width x box_height when box_fixed ("force this
    # shape") is on, else to box_width and the input's aspect ratio (nearest pixel here).
    "Reformat": [
        (Enumeration_Knob, "type", ["to format", "to box", "scale"]),
        (Int_Knob, "box_width", 200),
        (Int_Knob, "box_height", 200),
        (Boolean_Knob, "box_fixed", False),
        (Enumeration_Knob, "resize", ["none", "width", "height", "fit", "fill", "distort"]),
    ],
    # Constant: one colour over a format, for the frames first..last.
    "Constant": [
        (AColor_Knob, "color", 0.0),
        (Format_Knob, "format", None),
        (Int_Knob, "first", 1),
        (Int_Knob, "last", 1),
    ],
    "Input": [(Int_Knob, "number", 0)],
    "Viewer": [],
    "Output": [],
    "Dot": [],
    "Group": [],
    "Root": [
        (File_Knob, "name", ""),
        (Int_Knob, "first_frame", 1),
        (Int_Knob, "last_frame", 100),
        (Enumeration_Knob, "colorManagement", ["Nuke", "OCIO"]),
        (String_Knob, "workingSpaceLUT", "linear"),
        (Format_Knob, "format", None),
    ],
}
_COMMON_KNOBS = ("label", "onCreate", "knobChanged", "onDestroy", "tile_color_hex")
_MAX_INPUTS = {
    "Read": 0,
    "Input": 0,
    "Constant": 0,
    "Reformat": 1,
    "Write": 1,
    "Dot": 1,
    "Output": 1,
    "Merge2": 3,
    "Copy": 3,
    "Switch": 1000,  # a Switch takes as many inputs as are connected
    "Viewer": 10,
}


# Nuke Python API reference (Foundry), nuke.Node: its methods below as documented there.
class Node:
    """A node: a class, a name, knobs, input connections and a place in a Group."""

    def __init__(self, cls: str, parent: Group | None) -> None:
        self._class = cls
        self._knobs: dict[str, Knob] = {}
        self._inputs: dict[int, Node] = {}
        self._parent = parent
        self._xy = (0, 0)
        self._deleted = False
        name_knob = String_Knob("name", "name", "")
        self._attach(name_knob)
        for knob_name in _COMMON_KNOBS:
            self._attach(String_Knob(knob_name, knob_name, ""))
        self._attach(Boolean_Knob("disable", "disable"))
        for knob_cls, knob_name, default in _CLASS_KNOBS.get(cls, []):
            if knob_cls is Enumeration_Knob:
                knob: Knob = Enumeration_Knob(knob_name, knob_name, default)
            else:
                knob = knob_cls(knob_name, knob_name)
                if default is not None:
                    knob.setValue(default)
                elif knob_cls is Format_Knob:  # the script's format (the root's own: PC_Video)
                    knob._value = "PC_Video" if cls == "Root" else _STATE.root._knobs["format"]._value
            self._attach(knob)

    def _attach(self, knob: Knob) -> None:
        knob._node = self
        self._knobs[knob.name()] = knob

    def Class(self) -> str:
        return self._class

    def name(self) -> str:
        return self._knobs["name"].value()

    def setName(self, name: str, uncollide: bool = True, updateExpressions: bool = False) -> None:
        group = self._parent
        if group is not None:
            taken = {n.name() for n in group._children if n is not self}
            if name in taken:
                if not uncollide:
                    raise ValueError(f"a node called {name!r} already exists")
                base = re.sub(r"\d+$", "", name)
                name = next(f"{base}{i}" for i in range(1, 100000) if f"{base}{i}" not in taken)
        self._knobs["name"]._value = name

    def fullName(self) -> str:
        if self._parent is None or self._parent is _STATE.root:
            return self.name()
        return f"{self._parent.fullName()}.{self.name()}"

    def parent(self) -> Group:
        assert self._parent is not None
        return self._parent

    def knob(self, p: str | int) -> Knob | None:
        if isinstance(p, int):
            return list(self._knobs.values())[p]
        return self._knobs.get(p)

    def knobs(self) -> dict[str, Knob]:
        return dict(self._knobs)

    def allKnobs(self) -> list[Knob]:
        return list(self._knobs.values())

    def __getitem__(self, name: str) -> Knob:
        knob = self._knobs.get(name)
        if knob is None:
            raise NameError(f"knob {name} does not exist")
        return knob

    def addKnob(self, knob: Knob) -> None:
        if knob.name() in self._knobs:
            raise ValueError(f"{self.name()}: knob {knob.name()!r} already exists")
        self._attach(knob)

    def removeKnob(self, knob: Knob) -> None:
        if self._knobs.get(knob.name()) is not knob:
            raise ValueError(f"{self.name()}: knob {knob.name()!r} is not on this node")
        del self._knobs[knob.name()]
        knob._node = None

    def input(self, index: int) -> Node | None:
        found = self._inputs.get(index)
        return found._wrapper() if found is not None else None

    # Nuke Python API: a node object is a wrapper made afresh by calls such as Node.input(); two wrappers of one
    # node compare equal (==) but are not the same object (`is`), as issue 25 item 12 found in the self-test.
    def _wrapper(self) -> Node:
        wrapper = object.__new__(type(self))
        wrapper.__dict__ = self.__dict__
        return wrapper

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and other.__dict__ is self.__dict__

    def __hash__(self) -> int:
        return id(self.__dict__)

    def inputs(self) -> int:
        return max(self._inputs, default=-1) + 1

    def maxInputs(self) -> int:
        if self._class in ("Group", "Root"):
            return len(self._input_nodes()) if isinstance(self, Group) else 0
        return _MAX_INPUTS.get(self._class, 1)

    def setInput(self, i: int, node: Node | None) -> bool:
        if i < 0 or i >= self.maxInputs():
            return False
        if node is None:
            self._inputs.pop(i, None)
        else:
            if node._parent is not self._parent:
                raise ValueError(f"cannot connect {node.fullName()} to {self.fullName()}: different groups")
            self._inputs[i] = node
        self._dummy_knob_changed("inputChange")
        return True

    def _dummy_knob_changed(self, name: str) -> None:
        # Nuke Python API, nuke.addKnobChanged: knobChanged "is also called with dummy knobs when the control
        # panel is opened or when the inputs to the node changes" (knobs named showPanel, inputChange).
        script = self._knobs.get("knobChanged")
        if script is not None and script.getText().strip():
            _run_script(script.getText(), self, Knob(name))

    def firstFrame(self) -> int:
        return self._frame_range()[0]

    def lastFrame(self) -> int:
        return self._frame_range()[1]

    def _frame_range(self) -> tuple[int, int]:
        if self._class in ("Read", "Constant"):
            return self["first"].value(), self["last"].value()
        if self._class == "Input":
            group = self._parent
            source = group.input(self["number"].value()) if isinstance(group, Group) else None
            return source._frame_range() if source is not None else _root_range()
        if self._class == "Group" and isinstance(self, Group):
            out = next((n for n in self._children if n.Class() == "Output"), None)
            return out._frame_range() if out is not None else _root_range()
        if self._class == "Switch":
            source = self.input(self["which"].value())
            return source._frame_range() if source is not None else _root_range()
        source = self.input(0) or self.input(1)
        return source._frame_range() if source is not None else _root_range()

    def setSelected(self, selected: bool) -> None:
        self._selected = bool(selected)
        if selected:
            _STATE.selection_order.append(self)

    def isSelected(self) -> bool:
        return getattr(self, "_selected", False)

    def setXYpos(self, x: int, y: int) -> None:
        self._xy = (int(x), int(y))

    def setXpos(self, x: int) -> None:
        self._xy = (int(x), self._xy[1])

    def setYpos(self, y: int) -> None:
        self._xy = (self._xy[0], int(y))

    def xpos(self) -> int:
        return self._xy[0]

    def ypos(self) -> int:
        return self._xy[1]

    def channels(self) -> list[str]:
        """The channels of the node's output (Nuke Python API, Node.channels), e.g. ``rgba.red``, ``edit.red``."""
        return sorted(_evaluate(self, _STATE.frame))

    def sample(
        self, channel: str, x: float, y: float, dx: float = 1.0, dy: float = 1.0, frame: int | None = None
    ) -> float:
        """The value of ``channel`` at pixel (x, y) (Nuke Python API, Node.sample). Nuke's y axis points up: y = 0
        is the bottom row (NDK developer guide, "Coordinate system": the origin is the bottom-left corner)."""
        plane = _evaluate(self, _STATE.frame if frame is None else frame).get(channel)
        if plane is None:
            return 0.0
        return float(plane[plane.shape[0] - 1 - int(y), int(x)])

    def width(self) -> int:
        return _shape(_evaluate(self, self.firstFrame()))[1]

    def height(self) -> int:
        return _shape(_evaluate(self, self.firstFrame()))[0]

    def showControlPanel(self, forceFloat: bool = False) -> None:
        """Open the node's properties panel (a GUI session only, as in Nuke)."""
        if GUI:
            self._panel_shown = True
            self._dummy_knob_changed("showPanel")

    def hideControlPanel(self) -> None:
        self._panel_shown = False

    def shown(self) -> bool:
        return getattr(self, "_panel_shown", False)

    def screenWidth(self) -> int:
        return 80

    def screenHeight(self) -> int:
        return 18

    def dependent(self, mask: int = 0, forceEvaluate: bool = True) -> list[Node]:
        group = self._parent
        return [n for n in (group._children if group else []) if self in n._inputs.values()]

    def __repr__(self) -> str:
        return f"<{self._class} {self.fullName()}>"


# Nuke Python API reference (Foundry), nuke.Group: its methods below as documented there.
class Group(Node):
    """A node holding a graph; ``with group:`` (or begin/end) makes it where new nodes are created."""

    def __init__(self, cls: str = "Group", parent: Group | None = None) -> None:
        super().__init__(cls, parent)
        self._children: list[Node] = []

    def begin(self) -> Group:
        _STATE.context.append(self)
        return self

    def end(self) -> None:
        if len(_STATE.context) < 2 or _STATE.context[-1] is not self:
            raise RuntimeError(f"{self.name()}.end() without a matching begin()")
        _STATE.context.pop()

    def __enter__(self) -> Group:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.end()

    def nodes(self) -> list[Node]:
        return list(self._children)

    def node(self, s: str) -> Node | None:
        head, _, rest = s.partition(".")
        found = next((n for n in self._children if n.name() == head), None)
        if rest:
            return found.node(rest) if isinstance(found, Group) else None
        return found

    def numNodes(self) -> int:
        return len(self._children)

    def _input_nodes(self) -> list[Node]:
        return sorted((n for n in self._children if n.Class() == "Input"), key=lambda n: n["number"].value())


# Nuke Python API reference (Foundry), nuke.Root: its methods below as documented there.
class Root(Group):
    """The script."""

    def __init__(self) -> None:
        super().__init__("Root", None)
        self._knobs["name"]._value = ""

    def name(self) -> str:
        return "root"

    def fullName(self) -> str:
        return "root"

    # While a script loads, the root is created last: nuke.root() exists but is not bound to its C++ node yet,
    # and reading its knobs raises "A PythonObject is not attached to a node" (shotgunsoftware/tk-nuke-writenode
    # pull requests #9 and #22, "when a Nuke script is being loaded from disk, Nuke's root node is the last in the
    # stack to be created").
    def knob(self, p: str | int) -> Knob | None:
        _check_root_attached()
        return super().knob(p)

    def __getitem__(self, name: str) -> Knob:
        _check_root_attached()
        return super().__getitem__(name)

    def firstFrame(self) -> int:
        return self["first_frame"].value()

    def lastFrame(self) -> int:
        return self["last_frame"].value()


def _check_root_attached() -> None:
    if _STATE.loading:
        raise ValueError("A PythonObject is not attached to a node")


def _root_range() -> tuple[int, int]:
    return _STATE.root.firstFrame(), _STATE.root.lastFrame()


class _State:
    def __init__(self) -> None:
        self.formats: dict[str, Format] = {"PC_Video": Format(640, 480, "PC_Video")}
        self.frame = 1
        self.undo_open: list[_UndoGroup] = []
        self.undo_done: list[_UndoGroup] = []
        self.undo_disabled = 0
        self.root = Root()
        self.context: list[Group] = [self.root]
        self.main_queue: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.messages: list[str] = []
        self.menus: dict[str, Menu] = {}
        self.plugin_paths: list[str] = []
        self.progress_tasks: list[ProgressTask] = []
        self.this: list[tuple[Node | None, Knob | None]] = []
        self.main_thread = threading.main_thread()
        self.selection_order: list[Node] = []
        self.layers: dict[str, list[str]] = {"rgba": [f"rgba.{c}" for c in ("red", "green", "blue", "alpha")]}
        self.callbacks: dict[str, list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], str]]] = {}
        self.loading = False  # scriptOpen creating the script's nodes: the root is not attached yet


_STATE = _State()


def _create(cls: str, knobs: dict[str, Any], inpanel: bool = False) -> Node:
    if cls not in _CLASS_KNOBS:
        raise RuntimeError(f"{cls} is not a known node class")
    group = _STATE.context[-1]
    node: Node = Group(cls, group) if cls == "Group" else Node(cls, group)
    prefix = {"Merge2": "Merge"}.get(cls, cls)
    node.setName(f"{prefix}1")
    if cls == "Input":
        node["number"].setValue(sum(1 for n in group._children if n.Class() == "Input"))
    group._children.append(node)
    _undoable(node)
    for name, value in knobs.items():
        if name == "inputs":
            continue
        if name == "name":
            node.setName(value)
            continue
        knob = node.knob(name)
        if knob is None:
            raise ValueError(f"{cls}: no knob named {name!r}")
        knob.setValue(value)
    return node


class _UndoGroup:
    def __init__(self, name: str) -> None:
        self.name = name
        self.created: list[Node] = []


def _undoable(node: Node) -> None:
    # Creating a node is one undo step, unless an Undo group is open: then it joins that group.
    if _STATE.undo_disabled:
        return
    if _STATE.undo_open:
        _STATE.undo_open[-1].created.append(node)
    else:
        step = _UndoGroup(f"create {node.Class()}")
        step.created.append(node)
        _STATE.undo_done.append(step)


# Nuke Python API reference (Foundry), nuke.Undo: its methods below as documented there.
class Undo:
    """Undo groups (Nuke Python API, nuke.Undo): changes between ``begin(name)`` and ``end()`` are one step of
    Edit ▸ Undo; ``cancel()`` undoes the open group's changes and drops it. This fake records node creation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def begin(cls, name: str = "") -> None:
        _STATE.undo_open.append(_UndoGroup(name))

    @classmethod
    def end(cls) -> None:
        if _STATE.undo_open:
            step = _STATE.undo_open.pop()
            if step.created:
                _STATE.undo_done.append(step)

    @classmethod
    def cancel(cls) -> None:
        if _STATE.undo_open:
            for node in reversed(_STATE.undo_open.pop().created):
                delete(node)

    @classmethod
    def name(cls) -> str:
        return _STATE.undo_open[-1].name if _STATE.undo_open else ""

    @classmethod
    def disable(cls) -> None:
        """Stop recording undo steps (until ``enable()``)."""
        _STATE.undo_disabled += 1

    @classmethod
    def enable(cls) -> None:
        _STATE.undo_disabled = max(0, _STATE.undo_disabled - 1)

    @classmethod
    def disabled(cls) -> bool:
        return bool(_STATE.undo_disabled)

    @classmethod
    def undo(cls) -> None:
        """Edit ▸ Undo: reverts the last step (deletes the nodes it created)."""
        if _STATE.undo_done:
            for node in reversed(_STATE.undo_done.pop().created):
                delete(node)

    @classmethod
    def undoDescribe(cls) -> str:
        return _STATE.undo_done[-1].name if _STATE.undo_done else ""


class _NodeConstructor:
    def __init__(self, cls: str) -> None:
        self._cls = cls

    def __call__(self, **knobs: Any) -> Node:
        return _create(self._cls, knobs)


# Nuke Python API reference (Foundry), nuke.nodes: its methods below as documented there.
class Nodes:
    """``nuke.nodes.Read(file=..., first=...)``: create a node in the current group without selecting it."""

    def __getattr__(self, item: str) -> _NodeConstructor:
        if item.startswith("_"):
            raise AttributeError(item)
        return _NodeConstructor(item)


nodes = Nodes()


# Nuke Python API reference (Foundry), nuke.createNode.
def createNode(typ: str, knobs: str = "", inpanel: bool = True) -> Node:
    """Create a node the way the GUI does (Nuke Python developer guide, "Getting Started": createNode "creates a
    new node in the user interface, hooks it up to any user-selected nodes in the Node Graph, and opens the node's
    properties panel"; API reference: ``inpanel`` "only applies when the GUI is running"). Here: input 0 to the
    last selected node when the new node has inputs, placed below it, the new node the only one selected.
    ``knobs`` is Nuke's TCL list of name/value pairs (simple values only)."""
    tokens = knobs.split()
    if len(tokens) % 2:
        raise ValueError(f"createNode knobs {knobs!r}: expected name/value pairs")
    values: dict[str, Any] = {}
    for name, value in zip(tokens[::2], tokens[1::2], strict=True):
        values[name] = int(value) if value.lstrip("-").isdigit() else value
    group = _STATE.context[-1]
    try:
        selected: Node | None = selectedNode()
    except ValueError:
        selected = None
    node = _create(typ, values, inpanel)
    if selected is not None:
        if node.maxInputs() > 0:
            node.setInput(0, selected)
        node.setXYpos(selected.xpos(), selected.ypos() + selected.screenHeight() + 30)
    for other in group._children:
        other._selected = False
    node.setSelected(True)
    if inpanel:
        node.showControlPanel()
    return node


# Nuke Python API reference (Foundry), nuke.root.
def root() -> Root:
    return _STATE.root


# Nuke Python API reference (Foundry), nuke.selectedNode.
def selectedNode() -> Node:
    """The most recently selected node of the current group; ValueError when none is selected (as Nuke)."""
    group = _STATE.context[-1]
    for node in reversed(_STATE.selection_order):
        if node.isSelected() and node._parent is group and not node._deleted:
            return node
    raise ValueError("no node selected")


# Nuke Python API reference (Foundry), nuke.selectedNodes.
def selectedNodes(filter: str | None = None) -> list[Node]:
    return [
        n for n in _STATE.context[-1]._children if n.isSelected() and (filter is None or n.Class() == filter)
    ]


# Nuke Python API reference (Foundry), nuke.thisGroup.
def thisGroup() -> Group:
    return _STATE.context[-1]


# Nuke Python API reference (Foundry), nuke.thisNode.
def thisNode() -> Node:
    node = _STATE.this[-1][0] if _STATE.this else None
    if node is None:
        raise ValueError("nuke.thisNode() called outside a node's callback")
    return node


# Nuke Python API reference (Foundry), nuke.thisKnob.
def thisKnob() -> Knob | None:
    return _STATE.this[-1][1] if _STATE.this else None


# Nuke Python API reference (Foundry), nuke.toNode.
def toNode(s: str) -> Node | None:
    return _STATE.root.node(s)


# Nuke Python API reference (Foundry), nuke.allNodes.
def allNodes(filter: str | None = None, group: Group | None = None) -> list[Node]:
    where = group or _STATE.context[-1]
    return [n for n in where._children if filter is None or n.Class() == filter]


# Nuke Python API reference (Foundry), nuke.delete.
def delete(n: Node | None) -> None:
    if n is None or n._parent is None:
        return
    group = n._parent
    group._children.remove(n)
    for other in group._children:
        for index, source in list(other._inputs.items()):
            if source is n:
                del other._inputs[index]
    n._deleted = True


# Nuke Python API reference (Foundry), nuke.frame.
def frame(f: int | None = None) -> int:
    """The current frame; ``frame(f)`` moves to frame ``f`` (Nuke Python API, nuke.frame)."""
    if f is not None:
        _STATE.frame = int(f)
    return _STATE.frame


# Nuke Python API reference (Foundry), nuke.scriptClear.
def scriptClear() -> None:
    """Clear the script without asking (Nuke Python API, nuke.scriptClear); a new GUI script holds Viewer1."""
    scriptClose()
    _new_gui_script()


def _new_gui_script() -> None:
    # Nuke user guide ("Using the Viewer"): every new script in a GUI session starts with a Viewer node, Viewer1;
    # a terminal session (nuke -t) has none.
    if GUI:
        _STATE.undo_disabled += 1  # part of the new script, not an artist's step
        try:
            _create("Viewer", {})
        finally:
            _STATE.undo_disabled -= 1


# Nuke Python API reference (Foundry), nuke.scriptName.
def scriptName() -> str:
    name = _STATE.root["name"].value()
    if not name:
        raise RuntimeError("no script name: the script is untitled")
    return name


# Nuke Python API reference (Foundry), nuke.message.
def message(prompt: str) -> None:
    _STATE.messages.append(prompt)


# Nuke Python API reference (Foundry), nuke.tprint.
def tprint(*args: Any, sep: str = " ", end: str = "\n", file: Any = None) -> None:
    print(*args, sep=sep, end=end, file=file or sys.stdout)


# Nuke Python API reference (Foundry), nuke.warning.
def warning(message: str) -> None:
    _STATE.messages.append("warning: " + message)


# Nuke Python API reference (Foundry), nuke.error.
def error(message: str) -> None:
    _STATE.messages.append("error: " + message)


# Nuke Python API reference (Foundry), nuke.pluginAddPath.
def pluginAddPath(args: str, addToSysPath: bool = True) -> None:
    _STATE.plugin_paths.insert(0, args)
    if addToSysPath and args not in sys.path:
        sys.path.insert(0, args)


# Nuke Python API reference (Foundry), nuke.pluginPath.
def pluginPath() -> list[str]:
    return list(_STATE.plugin_paths)


# --------------------------------------------------------------------------------------------------------
# Threads and progress


# Nuke Python developer guide, "Threading": nuke.executeInMainThread runs the call on the main thread's event loop and returns at once.
def executeInMainThread(call: Callable[..., Any], args: Any = (), kwargs: Any = None) -> None:
    """Queue ``call`` for the GUI's event loop (run by :func:`_fake_process_events`)."""
    if not isinstance(args, tuple):
        args = (args,)
    with _STATE.lock:
        _STATE.main_queue.append((call, args, dict(kwargs or {})))


# Nuke Python API reference (Foundry), nuke.executeInMainThreadWithResult.
def executeInMainThreadWithResult(call: Callable[..., Any], args: Any = (), kwargs: Any = None) -> Any:
    """Run ``call`` on the main thread and wait for its result. As Nuke's ``executeInMain.py``: the request is
    queued for the main thread's event loop and the caller waits on an event (so a call *from* the main thread
    never returns: here it raises instead of hanging), and an exception in ``call`` is swallowed (the result is
    ``None``)."""
    if not isinstance(args, tuple):
        args = (args,)
    if threading.current_thread() is _STATE.main_thread:
        raise RuntimeError(
            "executeInMainThreadWithResult called on the main thread: Nuke would deadlock here"
        )
    done = threading.Event()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(call(*args, **(kwargs or {})))
        except Exception:
            box.append(None)
        finally:
            done.set()

    executeInMainThread(run)
    done.wait()
    return box[0] if box else None


# Nuke Python API reference (Foundry), nuke.ProgressTask: its methods below as documented there.
class ProgressTask:
    """A progress bar with a cancel button; the artist's cancel sets ``isCancelled()``."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.progress = 0
        self.message_text = ""
        self.history: list[tuple[int, str]] = []
        self._cancelled = False
        _STATE.progress_tasks.append(self)

    def setProgress(self, i: int) -> None:
        if not isinstance(i, int):
            raise TypeError("ProgressTask.setProgress takes an int percentage")
        self.progress = i
        self.history.append((i, self.message_text))

    def setMessage(self, s: str) -> None:
        self.message_text = s

    def isCancelled(self) -> bool:
        return self._cancelled


# --------------------------------------------------------------------------------------------------------
# Menus and callbacks


# Nuke Python API reference (Foundry), nuke.Menu: its methods below as documented there.
class Menu:
    """A menu: items by name; adding an existing name replaces it (so set-up code can run twice)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._items: dict[str, Menu | MenuItem] = {}

    def name(self) -> str:
        return self._name

    def addMenu(self, name: str, icon: str = "", tooltip: str = "", index: int = -1) -> Menu:
        existing = self._items.get(name)
        if isinstance(existing, Menu):
            return existing
        menu = Menu(name)
        self._items[name] = menu
        return menu

    def addCommand(
        self,
        name: str,
        command: Any = "",
        shortcut: str = "",
        icon: str = "",
        tooltip: str = "",
        index: int = -1,
    ) -> MenuItem:
        head, _, rest = name.partition("/")
        if rest:
            return self.addMenu(head).addCommand(rest, command, shortcut, icon, tooltip, index)
        item = MenuItem(name, command)
        self._items[name] = item
        return item

    def findItem(self, name: str) -> Menu | MenuItem | None:
        head, _, rest = name.partition("/")
        item = self._items.get(head)
        if rest:
            return item.findItem(rest) if isinstance(item, Menu) else None
        return item

    def items(self) -> list[Menu | MenuItem]:
        return list(self._items.values())

    def removeItem(self, name: str) -> None:
        self._items.pop(name, None)


# Nuke Python API reference (Foundry), nuke.MenuItem: its methods below as documented there.
class MenuItem:
    def __init__(self, name: str, command: Any) -> None:
        self._name = name
        self._command = command

    def name(self) -> str:
        return self._name

    def invoke(self) -> None:
        if callable(self._command):
            self._command()
        else:
            exec(self._command, {"nuke": sys.modules[__name__]})


# Nuke Python API reference (Foundry), nuke.menu.
def menu(name: str) -> Menu:
    return _STATE.menus.setdefault(name, Menu(name))


def _add_callback(kind: str, call: Callable[..., Any], args: Any, kwargs: Any, nodeClass: str) -> None:
    entry = (call, tuple(args or ()), dict(kwargs or {}), nodeClass)
    entries = _STATE.callbacks.setdefault(kind, [])
    if entry not in entries:
        entries.append(entry)


# Nuke Python API reference (Foundry), nuke.addOnScriptLoad.
def addOnScriptLoad(
    call: Callable[..., Any], args: Any = (), kwargs: Any = None, nodeClass: str = "Root"
) -> None:
    _add_callback("onScriptLoad", call, args, kwargs, nodeClass)


# Nuke Python API reference (Foundry), nuke.addOnCreate.
def addOnCreate(call: Callable[..., Any], args: Any = (), kwargs: Any = None, nodeClass: str = "*") -> None:
    _add_callback("onCreate", call, args, kwargs, nodeClass)


def _run_script(code: str, node: Node | None, knob: Knob | None) -> None:
    if not code.strip():
        return
    _STATE.this.append((node, knob))
    try:
        exec(code, {"nuke": sys.modules[__name__], "__name__": "__nuke_callback__"})
    finally:
        _STATE.this.pop()


# --------------------------------------------------------------------------------------------------------
# Rendering: an upstream evaluation just big enough for Read, Input, Dot, Switch, Copy, Merge2 (over), Group.

_NUKE_TO_EXR = {"red": "R", "green": "G", "blue": "B", "alpha": "A"}
_EXR_TO_NUKE = {v: k for k, v in _NUKE_TO_EXR.items()}
_COMPRESSIONS = {
    "none": "none",
    "Zip (1 scanline)": "zips",
    "Zip (16 scanlines)": "zip",
    "PIZ Wavelet (32 scanlines)": "piz",
}
_Image = dict[str, Any]  # channel name -> (H, W) float32 numpy array


def _file_for_frame(pattern: str, frame: int) -> str:
    def pad(match: re.Match[str]) -> str:
        token = match.group(0)
        width = int(match.group(1) or 1) if token.startswith("%") else len(token)
        return f"{frame:0{width}d}"

    return re.sub(r"%0?(\d*)d|#+", pad, pattern, count=1)


def _channel_name(exr: str) -> str:
    layer, _, short = exr.rpartition(".")
    return f"{layer or 'rgba'}.{_EXR_TO_NUKE.get(short, short)}"


def _read_frame(node: Node, frame: int) -> _Image:
    import numpy as np  # imported when rendering: the fake itself loads without them
    import OpenImageIO as oiio

    if node["disable"].value():
        return {}
    first, last = node["first"].value(), node["last"].value()
    held = min(max(frame, first), last)  # before/after "hold"
    file_knob = node["file"]
    assert isinstance(file_knob, File_Knob)
    path = _file_for_frame(file_knob.evaluate(), held)  # the TCL in the path runs first, as in Nuke
    inp = oiio.ImageInput.open(path)
    if inp is None:
        raise RuntimeError(f"{node.fullName()}: cannot open {path}: {oiio.geterror()}")
    try:
        spec = inp.spec()
        pixels = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float")).reshape(
            spec.height, spec.width, spec.nchannels
        )
    finally:
        inp.close()
    image = {_channel_name(name): pixels[..., i].copy() for i, name in enumerate(spec.channelnames)}
    for channel in image:  # Nuke learns the layers of the files it reads
        known = _STATE.layers.setdefault(channel.partition(".")[0], [])
        if channel not in known:
            known.append(channel)
    return image


def _expand(channels: str, image: _Image) -> list[str]:
    if channels == "all":
        return sorted(image)
    if channels == "none":
        return []
    if "." in channels:
        return [channels]
    if channels == "rgba":
        return [f"rgba.{c}" for c in ("red", "green", "blue", "alpha")]
    if channels == "rgb":
        return [f"rgba.{c}" for c in ("red", "green", "blue")]
    if channels == "alpha":
        return ["rgba.alpha"]
    return [f"{channels}.{c}" for c in ("red", "green", "blue", "alpha")]


def _shape(*images: _Image) -> tuple[int, int]:
    for image in images:
        for plane in image.values():
            return plane.shape  # type: ignore[return-value]
    raise RuntimeError("nothing to render: every input is empty")


def _evaluate(node: Node | None, frame: int) -> _Image:
    import numpy as np  # imported when rendering: the fake itself loads without it

    if node is None:
        raise RuntimeError("an input is not connected")
    cls = node.Class()
    if node["disable"].value() and cls not in ("Read",):
        return _evaluate(node.input(0), frame)
    if cls == "Read":
        return _read_frame(node, frame)
    if cls == "Constant":
        fmt = node["format"].value()
        colour = node["color"].value()
        return {
            f"rgba.{c}": np.full((fmt.height(), fmt.width()), colour[i], np.float32)
            for i, c in enumerate(("red", "green", "blue", "alpha"))
        }
    if cls == "Reformat":
        image = _evaluate(node.input(0), frame)
        if node["type"].value() != "to box" or node["resize"].value() != "distort":
            raise NotImplementedError("the fake Reformat does 'to box' with 'distort' only")
        height, width = _shape(image)
        # Nuke Reference Guide, Reformat: "force this shape" (box_fixed) makes the output box_width x box_height;
        # without it only box_width is used and the height keeps the input's aspect ratio.
        box_width = node["box_width"].value()
        box_height = (
            node["box_height"].value()
            if node["box_fixed"].value()
            else max(1, round(box_width * height / width))
        )
        rows = (np.arange(box_height) * height // box_height).astype(int)
        cols = (np.arange(box_width) * width // box_width).astype(int)
        return {name: plane[rows][:, cols] for name, plane in image.items()}
    if cls in ("Dot", "Output", "Write"):
        return _evaluate(node.input(0), frame)
    if cls == "Input":
        group = node._parent
        assert isinstance(group, Group)
        source = group.input(node["number"].value())
        if source is None:
            raise RuntimeError(f"{group.fullName()}: input {node.name()!r} is not connected")
        return _evaluate(source, frame)
    if cls == "Group":
        assert isinstance(node, Group)
        out = next((n for n in node._children if n.Class() == "Output"), None)
        if out is None:
            raise RuntimeError(f"{node.fullName()}: the group has no Output node")
        return _evaluate(out, frame)
    if cls == "Switch":
        which = max(0, min(node["which"].value(), node.inputs() - 1))
        return _evaluate(node.input(which), frame)
    if cls == "Copy":
        b = dict(_evaluate(node.input(0), frame))
        a = _evaluate(node.input(1), frame)
        for i in range(4):
            src, dst = node[f"from{i}"].value(), node[f"to{i}"].value()
            if src != "none" and dst != "none":
                b[dst] = a.get(src, np.zeros(_shape(a, b), np.float32)).copy()
        return b
    if cls == "Merge2":
        if node["operation"].value() != "over":
            raise NotImplementedError("the fake Merge2 does over only")
        b = dict(_evaluate(node.input(0), frame))
        a = _evaluate(node.input(1), frame)
        shape = _shape(a, b)
        zeros = np.zeros(shape, np.float32)
        a_names = _expand(node["Achannels"].value(), a)
        b_names = _expand(node["Bchannels"].value(), b)
        out_names = _expand(node["output"].value(), b)
        alpha = a.get(a_names[3], zeros) if len(a_names) == 4 else zeros
        for a_name, b_name, o_name in zip(a_names, b_names, out_names, strict=False):
            b[o_name] = a.get(a_name, zeros) + b.get(b_name, zeros) * (1.0 - alpha)
        also = node["also_merge"].value()
        if also not in ("none", ""):
            for name in _expand(also, a):
                b[name] = a.get(name, zeros) + b.get(name, zeros) * (1.0 - alpha)
        return b
    raise NotImplementedError(f"the fake cannot render {cls} nodes")


# Nuke Python API reference (Foundry), nuke.execute.
def execute(
    nameOrNode: Node | str,
    start: int,
    end: int,
    incr: int = 1,
    views: Any = None,
    continueOnError: bool = False,
) -> None:
    """Render a Write node's frames ``start..end``: evaluates its input and writes the file per frame."""
    import numpy as np  # imported when rendering: the fake itself loads without them
    import OpenImageIO as oiio

    node = toNode(nameOrNode) if isinstance(nameOrNode, str) else nameOrNode
    if node is None or node._deleted:
        raise ValueError(f"execute: no node {nameOrNode!r}")
    if node.Class() != "Write":
        raise RuntimeError(f"{node.fullName()} cannot be executed")
    if node["disable"].value():
        raise RuntimeError(f"{node.fullName()} is disabled")
    if node["file_type"].value() != "exr":
        raise NotImplementedError("the fake Write writes exr only")
    file_knob = node["file"]
    assert isinstance(file_knob, File_Knob)
    pattern = file_knob.evaluate()
    if not pattern:
        raise RuntimeError(f"{node.fullName()}: no filename set")
    for frame in range(start, end + 1, incr):
        image = _evaluate(node.input(0), frame)
        names = [n for n in _expand(node["channels"].value(), image)]
        missing = [n for n in names if n not in image]
        shape = _shape(image)
        planes = [image.get(n, np.zeros(shape, np.float32)) for n in names]
        exr_names = [
            _NUKE_TO_EXR[n.split(".")[1]]
            if n.startswith("rgba.")
            else f"{n.split('.')[0]}.{_NUKE_TO_EXR.get(n.split('.')[1], n.split('.')[1])}"
            for n in names
        ]
        del missing  # Nuke writes black for requested channels the stream lacks
        path = _file_for_frame(pattern, frame)
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            if not node["create_directories"].value():
                raise RuntimeError(f"{node.fullName()}: cannot write {path}: no such directory")
            os.makedirs(folder, exist_ok=True)
        pixel = "float" if node["datatype"].value() == "32 bit float" else "half"
        spec = oiio.ImageSpec(shape[1], shape[0], len(names), pixel)
        spec.channelnames = tuple(exr_names)
        spec.attribute("compression", _COMPRESSIONS[node["compression"].value()])
        out = oiio.ImageOutput.create(path)
        if out is None or not out.open(path, spec):
            raise RuntimeError(f"{node.fullName()}: cannot write {path}: {oiio.geterror()}")
        out.write_image(np.stack(planes, -1).astype(np.float32))
        out.close()


# --------------------------------------------------------------------------------------------------------
# Scripts: saved as JSON (only this fake reads them); opening runs onCreate knobs and onScriptLoad callbacks.


def _dump_group(group: Group) -> list[dict[str, Any]]:
    out = []
    for node in group._children:
        base = {k for k, _, _ in [(n, 0, 0) for _, n, _ in _CLASS_KNOBS.get(node.Class(), [])]}
        base |= {"name", "disable", *_COMMON_KNOBS}
        entry: dict[str, Any] = {
            "class": node.Class(),
            "knobs": {k: knob._value for k, knob in node._knobs.items()},
            "user": [
                {
                    "cls": type(k).__name__,
                    "name": k.name(),
                    "label": k.label(),
                    "flags": k._flags,
                    "range": getattr(k, "_range", None),
                    "tooltip": k._tooltip,
                    **k._copy_args(),
                }
                for name, k in node._knobs.items()
                if name not in base
            ],
            "inputs": {str(i): n.name() for i, n in node._inputs.items()},
            "xy": node._xy,
        }
        if isinstance(node, Group):
            entry["children"] = _dump_group(node)
        out.append(entry)
    return out


# Nuke Python API reference (Foundry), nuke.scriptSaveAs.
def scriptSaveAs(filename: str | None = None, overwrite: int = -1) -> None:
    if not filename:
        raise RuntimeError("scriptSaveAs: no filename")
    _STATE.root["name"].setValue(os.fspath(filename))
    data = {
        "root": {k: knob._value for k, knob in _STATE.root._knobs.items()},
        "layers": _STATE.layers,
        "nodes": _dump_group(_STATE.root),
    }
    with open(filename, "w") as handle:
        json.dump(data, handle, default=list)


# Nuke Python API reference (Foundry), nuke.scriptSave.
def scriptSave(filename: str | None = None) -> bool:
    scriptSaveAs(filename or scriptName())
    return True


# Nuke Python API reference (Foundry), nuke.scriptClose.
def scriptClose() -> None:
    # Callbacks, menus and formats belong to the session, not the script.
    callbacks, menus, formats = _STATE.callbacks, _STATE.menus, _STATE.formats
    _STATE.__init__()  # type: ignore[misc]
    _STATE.callbacks, _STATE.menus, _STATE.formats = callbacks, menus, formats


def _load_group(group: Group, entries: list[dict[str, Any]], created: list[Node]) -> None:
    group.begin()
    try:
        by_name: dict[str, Node] = {}
        for entry in entries:
            node = _create(entry["class"], {})
            for spec in entry["user"]:
                cls = globals()[spec["cls"]]
                extra = {k: v for k, v in spec.items() if k in ("values", "command")}
                if "values" in extra:
                    knob = cls(spec["name"], spec["label"], extra["values"])
                elif "command" in extra:
                    knob = cls(spec["name"], spec["label"], extra["command"])
                else:
                    knob = cls(spec["name"], spec["label"])
                knob._flags = spec["flags"]
                knob._tooltip = spec["tooltip"]
                if spec["range"]:
                    knob._range = tuple(spec["range"])
                node.addKnob(knob)
            for name, value in entry["knobs"].items():
                node._knobs[name]._value = value
            node._xy = tuple(entry["xy"])
            by_name[node.name()] = node
            created.append(node)
            if isinstance(node, Group):
                _load_group(node, entry["children"], created)
        for entry in entries:
            node = by_name[entry["knobs"]["name"]]
            for index, source in entry["inputs"].items():
                node._inputs[int(index)] = by_name[source]
    finally:
        group.end()


# Nuke Python API reference (Foundry), nuke.scriptOpen.
def scriptOpen(filename: str) -> None:
    """Close the current script and load ``filename``; runs each node's onCreate, then onScriptLoad callbacks."""
    with open(filename) as handle:
        data = json.load(handle)
    scriptClose()
    for name, value in data["root"].items():
        _STATE.root._knobs[name]._value = value
    _STATE.root._knobs["name"]._value = os.fspath(filename)
    _STATE.layers.update(data["layers"])
    created: list[Node] = []
    _STATE.loading = True
    try:
        _load_group(_STATE.root, data["nodes"], created)
        for node in created:
            _run_script(node["onCreate"].getText(), node, None)
    finally:
        _STATE.loading = False
    for call, args, kwargs, _ in _STATE.callbacks.get("onScriptLoad", []):
        _STATE.this.append((_STATE.root, None))
        try:
            call(*args, **kwargs)
        finally:
            _STATE.this.pop()


# --------------------------------------------------------------------------------------------------------
# Test helpers


def _fake_reset() -> None:
    """A fresh session: a new script (Viewer1 only, in the GUI), no menus, callbacks, messages or queued calls."""
    _STATE.__init__()  # type: ignore[misc]
    _new_gui_script()


def _fake_messages() -> list[str]:
    return _STATE.messages


def _fake_progress_tasks() -> list[ProgressTask]:
    return _STATE.progress_tasks


def _fake_process_events(until: Callable[[], bool] | None = None, timeout: float = 60.0) -> None:
    """Run the GUI event loop: queued main-thread calls, until ``until()`` is true (or once when None)."""
    deadline = time.monotonic() + timeout
    while True:
        with _STATE.lock:
            queued, _STATE.main_queue = _STATE.main_queue, []
        for call, args, kwargs in queued:
            call(*args, **kwargs)
        if until is None or until():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("_fake_process_events: condition not met in time")
        time.sleep(0.02)


def _fake_user_set(node: Node, knob_name: str, value: Any) -> None:
    """The artist changes a knob in the properties panel: set it, then run the node's knobChanged."""
    knob = node[knob_name]
    knob.setValue(value)
    _run_script(node["knobChanged"].getText(), node, knob)


def _fake_press(node: Node, knob_name: str) -> None:
    """The artist clicks a PyScript_Knob button."""
    knob = node[knob_name]
    if not isinstance(knob, Script_Knob):
        raise TypeError(f"{knob_name} is a {knob.Class()}, not a button")
    knob.execute()


def _fake_calls() -> set[str]:
    """Names of the API called from outside the fakes since the last ``_fake_reset_calls``: functions and
    classes as ``createNode``/``String_Knob``, methods by their name (``setValue``), ``nodes.Read`` for
    ``nuke.nodes.Read(...)``. The self-test check compares them with what the adapter uses."""
    return set(_CALLS)


def _fake_reset_calls() -> None:
    _CALLS.clear()


# --------------------------------------------------------------------------------------------------------
# Call recording: every public function, class and method records its name when called from outside the fakes.

_CALLS: set[str] = set()
_FAKES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(label: str) -> None:
    caller = sys._getframe(2).f_code.co_filename
    if not os.path.abspath(caller).startswith(_FAKES_DIR):
        _CALLS.add(label)


def _recording(function: Callable[..., Any], label: str) -> Callable[..., Any]:
    import functools

    @functools.wraps(function)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        # A constructor records the class actually made (a subclass inherits its base's __init__).
        _record(type(args[0]).__name__ if function.__name__ == "__init__" else label)
        return function(*args, **kwargs)

    return recorded


def _install_recording() -> None:
    import inspect

    module = sys.modules[__name__]
    for name, value in list(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != __name__:
            continue
        if inspect.isfunction(value):
            setattr(module, name, _recording(value, name))
        elif inspect.isclass(value):
            for attr, member in list(vars(value).items()):
                if isinstance(member, classmethod):
                    setattr(value, attr, classmethod(_recording(member.__func__, attr)))
                elif inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                    setattr(value, attr, _recording(member, name if attr == "__init__" else attr))


_original_node_call = _NodeConstructor.__call__


def _node_constructor_call(self: _NodeConstructor, **knobs: Any) -> Node:
    _record(f"nodes.{self._cls}")
    return _original_node_call(self, **knobs)


_NodeConstructor.__call__ = _node_constructor_call  # type: ignore[method-assign]
_install_recording()
