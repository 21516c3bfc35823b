"""The Nuke adapter: the "Vera Edit" node (a Python-built Group), Generate, Cancel, takes, Bake layers, menus.

Thin on purpose: knob layout comes from :mod:`vera_plugin.schema_ui`, the cache from :mod:`vera_plugin.cache`
and the job itself from :mod:`vera_plugin.generate`. Threading follows Nuke's rules (Python developer guide,
"Threading"): the node graph is only touched on the main thread. Generate checks the knobs on the main thread
and starts a worker thread; the worker renders the input a few frames at a time by asking the main thread
(``nuke.executeInMainThreadWithResult``), so the GUI stays responsive between chunks and the progress bar's
cancel works while the input renders; then it uploads, follows the job (showing the engine's live previews in
the node's output) and downloads, reporting through ``nuke.ProgressTask`` and handing results back with
``nuke.executeInMainThread``. The worker never holds node objects, only node names.

Inside the node::

    src (Input 0) ─────────────────────────────┐
    mask (Input 1, optional)                   │ 0 source
    VeraResult (Read of vera_edit.####.exr) ───┤ 1 composite: rgba + edit.* + matte.alpha
        └─ VeraEditToRGBA (Copy edit -> rgba) ─┤ 2 edit
        └─ VeraMatteToRGBA (Copy matte -> rgba)┤ 3 matte
    VeraPreview (Read of the newest preview)   │
        └─ VeraPreviewFit (Reformat to plate) ─┘ 4 live preview while a job runs
                                   VeraOutput (Switch, from the output knob) ─ Output

Result paths inside a saved script's folder are stored relative to it (``[file dirname [value root.name]]/...``),
so a shot folder moved with its ``vera_cache`` still links, even where ``vera_plugin`` is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import nuke

from vera_plugin.cache import CachedResult, cache_root, find_takes, safe_name
from vera_plugin.client import DEFAULT_ADDRESS, EngineClient, EngineError
from vera_plugin.generate import (
    GenerateCancelled,
    GenerateError,
    GenerateRequest,
    GenerateResult,
    client_options_from_env,
    describe_engine_error,
    run_generate,
)
from vera_plugin.hosts.imagefiles import write_png
from vera_plugin.schema_ui import (
    Field,
    OptionsError,
    fields_for_model,
    find_model,
    job_options,
    model_from_json,
    model_to_json,
    vocabulary_note,
)
from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = [
    "NODE_MARKER",
    "OUTPUTS",
    "PANEL_ID",
    "PANEL_WIDGET",
    "RENDER_CHUNK_FRAMES",
    "bake_layers",
    "button",
    "cancel",
    "connect",
    "create_node",
    "generate",
    "generate_now",
    "is_vera_node",
    "knob_changed",
    "on_create",
    "option_fields",
    "option_values",
    "randomise",
    "relink",
    "render_input",
    "select_take",
    "setup",
    "tcl_escape",
    "teardown",
    "update_output",
    "use_models",
]

NODE_MARKER = "vera_edit_node"
OUTPUTS = ("composite", "edit", "matte", "source")
_SWITCH_INPUT = {"source": 0, "composite": 1, "edit": 2, "matte": 3, "preview": 4}
PANEL_ID = "uk.co.vera.VeraEditPanel"
# What nukescripts.panels.registerWidgetAsPanel pastes into a PyCustom_Knob command, evaluated in Nuke's
# __main__ namespace when the pane opens: it must import its own module, since menu.py's imports are not there.
PANEL_WIDGET = "__import__('vera_plugin.panel', fromlist=['VeraPanel']).VeraPanel"
# Frames rendered per main-thread request while Generate renders the input (the GUI answers between chunks).
RENDER_CHUNK_FRAMES = 4
# Knob names a Group already has (or that this module uses); a schema option with such a name gets a prefix.
_RESERVED = {
    "name", "label", "help", "disable", "onCreate", "knobChanged", "onDestroy", "tile_color", "note_font",
    "selected", "hide_input", "icon", "postage_stamp", "xpos", "ypos", "engine", "connect", "engine_status",
    "model", "frame_range", "range_first", "range_last", "output", "take", "generate", "cancel", "bake",
    "status", "job_id", "prompt_words", "working_space", "vera_models",
    # Knobs Nuke runs as Python or TCL (callbacks and the label's TCL): an engine's schema must never name one.
    "updateUI", "autolabel", "beforeRender", "afterRender", "beforeFrameRender", "afterFrameRender",
    "afterBackgroundRender", "afterBackgroundFrameRender", "filenameFilter", "validateFilename", "autoSaveFilter",
    "onScriptLoad", "onScriptSave", "onScriptClose", "onUserCreate", "indicators", "gl_color", "dope_sheet",
    "bookmark", "cached", "lifetimeStart", "lifetimeEnd", "useLifetime", "lock_connections", "mapsize", "window",
    "panel", "User",
}  # fmt: skip
# A knob name Nuke accepts: an identifier. Anything else an engine sends is made one.
_KNOB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Python run by the node itself (saved in the script); guarded so a script opens even without vera_plugin, or
# with a grpcio/protobuf too old for the generated code (protobuf's VersionError, grpcio's RuntimeError: not
# ImportErrors), as menu.py's import is.
_GUARD = "try:\n    import vera_plugin.hosts.nuke as _vera\nexcept Exception:\n    _vera = None\nif _vera:\n    _vera.{call}"
_BUTTON = "import vera_plugin.hosts.nuke as _vera\n_vera.button({action!r})"
_RELATIVE_ROOT = "[file dirname [value root.name]]"


def _knob_name(option: str) -> str:
    if not _KNOB_NAME.match(option):
        return "opt_" + re.sub(r"[^A-Za-z0-9_]", "_", option)
    return f"opt_{option}" if option in _RESERVED else option


def is_vera_node(node: nuke.Node | None) -> bool:
    """True for a node built by :func:`create_node`."""
    return node is not None and node.knob(NODE_MARKER) is not None


def _text(node: nuke.Node, name: str) -> str:
    # String knobs' value() runs TCL on the text (a prompt's "[red]" or "$5", the models' JSON): read them raw.
    knob = node[name]
    return knob.getText() if isinstance(knob, nuke.String_Knob) else str(knob.value())


def _script_path() -> str:
    knob = nuke.root()["name"]
    return knob.getText() if isinstance(knob, nuke.String_Knob) else str(knob.value())


def _inner(node: nuke.Node, name: str) -> nuke.Node:
    # The Vera node is a Group; its internal nodes are found by name.
    inner = node.node(name) if isinstance(node, nuke.Group) else None
    if inner is None:
        raise GenerateError(
            f"{node.name()} has no internal node {name!r}: delete it and create a new Vera Edit node"
        )
    return inner


def _set_status(node: nuke.Node, text: str) -> None:
    node["status"].setValue(text)


def _fail(node: nuke.Node | None, text: str) -> None:
    # Errors go on the node and into a dialog; never a traceback in the artist's face.
    if node is not None:
        _set_status(node, f"error: {text}")
    nuke.message(f"Vera Edit: {text}")


def _on_main(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` on Nuke's main thread, waiting for the result. On the main thread itself it runs at once:
    Nuke's executeInMainThreadWithResult would wait for itself there."""
    if threading.current_thread() is threading.main_thread():
        return call(*args)
    return nuke.executeInMainThreadWithResult(call, args)


def _post(call: Callable[..., Any], *args: Any) -> None:
    """``call(*args)`` on the main thread without waiting (at once when already there)."""
    if threading.current_thread() is threading.main_thread():
        call(*args)
    else:
        nuke.executeInMainThread(call, args)


# ---------------------------------------------------------------------------------------------------------
# Building the node


def _hidden(knob: nuke.Knob) -> nuke.Knob:
    knob.setFlag(nuke.INVISIBLE)
    return knob


def _selected_node() -> nuke.Node | None:
    try:
        return nuke.selectedNode()
    except ValueError:  # Nuke raises when nothing is selected
        return None


def create_node(address: str | None = None, connect_timeout: float = 3.0) -> nuke.Group:
    """Create a "Vera Edit" node the way Nuke's own menus do: beside the selected node and wired to it, its
    properties panel open, the whole creation one step of Edit ▸ Undo.

    The options come from the engine's ``GetInfo``; when the engine cannot be reached the node is still
    created and says so in its status (press "connect" later).
    """
    selected = _selected_node()
    undo = nuke.Undo()
    undo.begin("Create Vera Edit")
    try:
        # createNode places the node below the selection and selects it; the Group has no inputs yet, so the
        # source is connected once its Input nodes exist.
        group = nuke.createNode("Group", inpanel=False)
        assert isinstance(group, nuke.Group)
        group.setName("VeraEdit1", uncollide=True)
        _build_internals(group)
        _build_knobs(group, address or os.environ.get("VERA_ENGINE", DEFAULT_ADDRESS))
        if selected is not None and selected is not group:
            group.setInput(0, selected)
        connect(group, timeout=connect_timeout, quiet=True)
    finally:
        undo.end()  # even a half-built node goes away with one Edit > Undo
    if nuke.GUI:
        group.showControlPanel()
    return group


def _build_internals(group: nuke.Group) -> None:
    _declare_layers()
    with group:
        src = nuke.nodes.Input(name="src")
        mask = nuke.nodes.Input(name="mask")  # an Input called "mask" is drawn as Nuke's side mask input
        read = nuke.nodes.Read(name="VeraResult", label="Vera result (rgba, edit, matte)")
        edit = nuke.nodes.Copy(name="VeraEditToRGBA", label="edit layer -> rgba")
        matte = nuke.nodes.Copy(name="VeraMatteToRGBA", label="matte -> rgba")
        for i, channel in enumerate(("red", "green", "blue", "alpha")):
            edit[f"from{i}"].setValue(f"edit.{channel}")
            edit[f"to{i}"].setValue(f"rgba.{channel}")
            matte[f"from{i}"].setValue("matte.alpha")
            matte[f"to{i}"].setValue(f"rgba.{channel}")
        for copy in (edit, matte):
            copy.setInput(0, read)
            copy.setInput(1, read)
        preview = nuke.nodes.Read(name="VeraPreview", label="engine's live preview")
        fit = nuke.nodes.Reformat(name="VeraPreviewFit", type="to box", resize="distort")
        fit.setInput(0, preview)
        switch = nuke.nodes.Switch(name="VeraOutput")
        for index, node in ((0, src), (1, read), (2, edit), (3, matte), (4, fit)):
            switch.setInput(index, node)
        output = nuke.nodes.Output(name="Output1")
        output.setInput(0, switch)
        for i, node in enumerate((src, mask, read, edit, matte, preview, fit, switch, output)):
            node.setXYpos(i % 2 * 150, i * 60)


def _declare_layers() -> None:
    # Copy/Merge channel knobs only accept layers the script knows; the result files bring these two.
    nuke.Layer("edit", ["edit.red", "edit.green", "edit.blue", "edit.alpha"])
    nuke.Layer("matte", ["matte.alpha"])


def _build_knobs(group: nuke.Group, address: str) -> None:
    group.addKnob(nuke.Tab_Knob("vera", "Vera Edit"))
    group.addKnob(_hidden(nuke.String_Knob(NODE_MARKER, NODE_MARKER, "1")))
    group.addKnob(_hidden(nuke.String_Knob("vera_models", "vera_models", "")))
    group.addKnob(_hidden(nuke.String_Knob("working_space", "working_space", "")))
    engine = nuke.String_Knob("engine", "engine address", address)
    engine.setTooltip(
        "host:port of a Vera engine (`vera-engine serve`); default $VERA_ENGINE or 127.0.0.1:50051"
    )
    group.addKnob(engine)
    connect_button = nuke.PyScript_Knob("connect", "connect", _BUTTON.format(action="connect"))
    connect_button.clearFlag(nuke.STARTLINE)
    group.addKnob(connect_button)
    group.addKnob(nuke.Text_Knob("engine_status", "engine", "not connected"))
    group.addKnob(nuke.Enumeration_Knob("model", "model", []))
    _add_trailing_knobs(group)
    group["onCreate"].setValue(_GUARD.format(call="on_create()"))
    group["knobChanged"].setValue(_GUARD.format(call="knob_changed()"))
    _set_status(group, "connect to an engine, type a prompt, press Generate")


def _add_trailing_knobs(group: nuke.Node) -> None:
    group.addKnob(nuke.Text_Knob("range_divider", ""))
    group.addKnob(nuke.Enumeration_Knob("frame_range", "frame range", ["input", "custom"]))
    first = nuke.Int_Knob("range_first", "first")
    last = nuke.Int_Knob("range_last", "last")
    last.clearFlag(nuke.STARTLINE)
    for knob in (first, last):
        knob.setValue(nuke.root().firstFrame() if knob is first else nuke.root().lastFrame())
        knob.setEnabled(False)
        group.addKnob(knob)
    output = nuke.Enumeration_Knob("output", "output", list(OUTPUTS))
    output.setTooltip("composite: the result with edit and matte layers; edit, matte: that layer as rgba")
    group.addKnob(output)
    take = nuke.Enumeration_Knob("take", "take", ["1"])
    take.setTooltip(
        "Which take the output shows (a Generate with several takes); switching does not regenerate"
    )
    take.clearFlag(nuke.STARTLINE)
    group.addKnob(take)
    buttons = [
        nuke.PyScript_Knob("generate", "Generate", _BUTTON.format(action="generate")),
        nuke.PyScript_Knob("cancel", "Cancel", _BUTTON.format(action="cancel")),
        nuke.PyScript_Knob("bake", "Bake layers", _BUTTON.format(action="bake")),
    ]
    for i, button in enumerate(buttons):
        if i:
            button.clearFlag(nuke.STARTLINE)
        else:
            button.setFlag(nuke.STARTLINE)
        group.addKnob(button)
    group.addKnob(nuke.Text_Knob("status", "status", ""))
    job = nuke.String_Knob("job_id", "job id", "")
    job.setFlag(nuke.READ_ONLY)
    group.addKnob(job)


def _option_knob(field: Field) -> list[nuke.Knob]:
    name = _knob_name(field.name)
    knob: nuke.Knob
    if field.kind == "text":
        knob = nuke.Multiline_Eval_String_Knob(name, field.label)
        knob.setValue(str(field.default or ""))
    elif field.kind == "string":
        knob = nuke.String_Knob(name, field.label, str(field.default or ""))
    elif field.kind == "bool":
        knob = nuke.Boolean_Knob(name, field.label, bool(field.default))
    elif field.kind == "choice":
        knob = nuke.Enumeration_Knob(name, field.label, list(field.choices))
        if field.default is not None:
            knob.setValue(str(field.default))
    else:
        knob = (
            nuke.Int_Knob(name, field.label) if field.kind == "int" else nuke.Double_Knob(name, field.label)
        )
        if field.minimum is not None and field.maximum is not None:
            knob.setRange(field.minimum, field.maximum)
        if field.default is not None:
            knob.setValue(field.default)
        elif field.randomise:
            knob.setValue(_random_value(field))
    knob.setTooltip(field.help)
    knobs: list[nuke.Knob] = [knob]
    if field.randomise:
        button = nuke.PyScript_Knob(
            f"{name}_randomise", "randomise", _BUTTON.format(action=f"randomise:{field.name}")
        )
        button.clearFlag(nuke.STARTLINE)
        knobs.append(button)
    return knobs


def _random_value(field: Field) -> int:
    low = int(field.minimum) if field.minimum is not None else 0
    high = int(field.maximum) if field.maximum is not None else 2**31 - 1
    # Seeds an artist can read and type back: below 2**31 whatever the schema's upper bound.
    return random.randint(low, min(high, 2**31 - 1))


def _models(node: nuke.Node) -> list[pb.ModelInfo]:
    text = _text(node, "vera_models")
    return [model_from_json(json.dumps(m)) for m in json.loads(text)] if text else []


def _model(node: nuke.Node) -> pb.ModelInfo | None:
    models = _models(node)
    name = _text(node, "model")
    return next((m for m in models if m.name == name), models[0] if models else None)


def option_fields(node: nuke.Node) -> list[Field]:
    """The option fields of the node's current model (empty before the first connect)."""
    model = _model(node)
    return fields_for_model(model) if model is not None else []


def option_values(node: nuke.Node) -> dict[str, Any]:
    """What the artist set, by option name, exactly as typed (text is read raw: Nuke would run TCL on it)."""
    return {f.name: _knob_raw(node[_knob_name(f.name)]) for f in option_fields(node)}


def _knob_raw(knob: nuke.Knob) -> Any:
    return knob.getText() if isinstance(knob, nuke.String_Knob) else knob.value()


def _install_options(node: nuke.Node, fields: list[Field]) -> None:
    # Nuke appends knobs, so the option knobs and everything after them are rebuilt in order; values the
    # artist set survive when the new model has an option of the same name and kind.
    knobs = node.allKnobs()
    names = [k.name() for k in knobs]
    start = names.index("model") + 1
    saved: dict[str, tuple[str, Any, list[str] | None]] = {}
    for knob in knobs[start:]:
        choices = knob.values() if isinstance(knob, nuke.Enumeration_Knob) else None
        saved[knob.name()] = (knob.Class(), _knob_raw(knob), choices)
        node.removeKnob(knob)
    model = _model(node)
    for field in fields:
        for knob in _option_knob(field):
            node.addKnob(knob)
            previous = saved.get(knob.name())
            if previous and previous[0] == knob.Class() and knob.Class() != "PyScript_Knob":
                with contextlib.suppress(ValueError):  # a choice the new model lacks: keep the default
                    knob.setValue(previous[1])
        if field.name == "prompt" and model is not None and model.vocabulary:
            # Words a word-level checkpoint cannot read, flagged under the prompt as the artist types.
            node.addKnob(nuke.Text_Knob("prompt_words", "", ""))
    _add_trailing_knobs(node)
    for name, (cls, value, choices) in saved.items():
        restored = node.knob(name)
        keep = cls not in ("PyScript_Knob", "Text_Knob") or name == "status"
        if restored is not None and cls == restored.Class() and keep:
            if name == "take" and choices and isinstance(restored, nuke.Enumeration_Knob):
                restored.setValues(choices)
            with contextlib.suppress(ValueError):
                restored.setValue(value)
    _sync_range_knobs(node)
    _update_words(node)


def use_models(node: nuke.Node, models: list[pb.ModelInfo], model_name: str = "") -> pb.ModelInfo:
    """Keep ``models`` (the engine's schema) in the node, choose ``model_name`` (default: the one chosen, else the
    engine's default) and build its option knobs. What :func:`connect` does once the engine answered."""
    node["vera_models"].setValue(json.dumps([json.loads(model_to_json(m)) for m in models], sort_keys=True))
    model_knob = node["model"]
    assert isinstance(model_knob, nuke.Enumeration_Knob)
    previous = model_name or _text(node, "model")
    model_knob.setValues([m.name for m in models])
    model = find_model(pb.EngineInfo(models=models), previous if previous in [m.name for m in models] else "")
    model_knob.setValue(model.name)
    _install_options(node, fields_for_model(model))
    return model


def connect(node: nuke.Node | None = None, timeout: float = 5.0, quiet: bool = False) -> bool:
    """Ask the engine for its models and build the option knobs from the chosen model's schema."""
    node = node or nuke.thisNode()
    address = _text(node, "engine").strip()
    try:
        with EngineClient(address, timeout=timeout, **client_options_from_env()) as client:
            info = client.info()
    except EngineError as exc:
        text = describe_engine_error(exc, address)
        node["engine_status"].setValue("unreachable")
        _set_status(node, f"error: {text}")
        if not quiet:
            nuke.message(f"Vera Edit: {text}")
        return False
    except (ValueError, OSError) as exc:  # a bad address, an unreadable token file
        _fail(node, f"engine {address!r}: {exc}")
        return False
    try:
        use_models(node, list(info.models))
    except OptionsError as exc:
        _fail(node, str(exc))
        return False
    device = f"{info.device.name} ({info.device.kind})"
    state = "ready" if info.model_loaded else "loading its model"
    node["engine_status"].setValue(f"{state}: v{info.engine_version} on {device}, {info.queue_length} queued")
    if _text(node, "status").startswith("error: Cannot reach"):
        _set_status(node, "connected")
    return True


def randomise(option: str = "seed", node: nuke.Node | None = None) -> int:
    """Draw a new random value for an integer option (the seed button)."""
    node = node or nuke.thisNode()
    field = next(f for f in option_fields(node) if f.name == option)
    value = _random_value(field)
    node[_knob_name(option)].setValue(value)
    return value


# ---------------------------------------------------------------------------------------------------------
# Knob callbacks


def _sync_range_knobs(node: nuke.Node) -> None:
    custom = _text(node, "frame_range") == "custom"
    node["range_first"].setEnabled(custom)
    node["range_last"].setEnabled(custom)


def _update_words(node: nuke.Node) -> None:
    words = node.knob("prompt_words")
    model = _model(node)
    if words is None or model is None or node.knob(_knob_name("prompt")) is None:
        return
    words.setValue(vocabulary_note(_text(node, _knob_name("prompt")), model))


def knob_changed() -> None:
    """The node's knobChanged: output switch, take, model choice, frame range mode, prompt words."""
    node, knob = nuke.thisNode(), nuke.thisKnob()
    if knob is None or not is_vera_node(node):
        return
    name = knob.name()
    try:
        if name == "output":
            update_output(node)
        elif name == "take":
            select_take(node, int(_text(node, "take")))
        elif name == "frame_range":
            _sync_range_knobs(node)
        elif name == "model":
            _install_options(node, option_fields(node))
        elif name == _knob_name("prompt"):
            _update_words(node)
        elif name == "engine":
            node["engine_status"].setValue("address changed: press connect")
    except Exception as exc:  # a callback must not raise into Nuke
        _fail(node, f"changing {name} failed unexpectedly ({type(exc).__name__}: {exc}); please report this")


def update_output(node: nuke.Node, has_result: bool | None = None) -> None:
    """Point the internal Switch at the chosen output; the source until there is a result."""
    if has_result is None:
        has_result = bool(_text(node, "job_id")) and bool(_text(_inner(node, "VeraResult"), "file"))
    which = _SWITCH_INPUT[_text(node, "output")] if has_result else _SWITCH_INPUT["source"]
    _inner(node, "VeraOutput")["which"].setValue(which)


# Vera nodes whose cached results are looked for once the script has loaded (see on_create).
_RELINK_AFTER_LOAD: set[str] = set()


def _root_attached() -> bool:
    # While a script loads, the root is created last: nuke.root() exists but reading its knobs raises
    # ValueError("A PythonObject is not attached to a node") (ShotGrid's tk-nuke-writenode fixes #9, #22).
    try:
        nuke.root().knob("name")
    except ValueError:
        return False
    return True


def _relink_safely(node: nuke.Node) -> None:
    try:
        relink(node)
    except Exception as exc:  # a script must open whatever happens here
        _set_status(node, f"error: could not look for cached results ({type(exc).__name__}: {exc})")


def _relink_loaded() -> None:
    """onScriptLoad: the relinks :func:`on_create` put off until the root was attached."""
    names = sorted(_RELINK_AFTER_LOAD)
    _RELINK_AFTER_LOAD.clear()
    for name in names:
        node = nuke.toNode(name)
        if node is not None and is_vera_node(node):
            _relink_safely(node)


def on_create() -> None:
    """The node's onCreate (also when a script opens): find cached results of its job. The cache is found from
    the script's name (``root.name``), which cannot be read while the script is still loading: the look-up then
    waits for the script to finish loading (an onScriptLoad callback, as ShotGrid's tk-nuke does)."""
    node = nuke.thisNode()
    if not is_vera_node(node) or not _text(node, "job_id"):
        return
    if _root_attached():
        _relink_safely(node)
        return
    _set_status(node, "looking for cached results once the script has loaded")
    _RELINK_AFTER_LOAD.add(node.fullName())
    nuke.addOnScriptLoad(_relink_loaded)  # registered once: Nuke keeps one entry per (call, args)


def _cache_root() -> Path:
    return cache_root(_script_path())


def _chosen_take(node: nuke.Node, takes: dict[int, CachedResult]) -> int:
    chosen = int(_text(node, "take") or 1)
    return chosen if chosen in takes else min(takes)


def relink(node: nuke.Node) -> CachedResult | None:
    """Point the node's Read at its job's cached results (after a reopen, a move or a new $VERA_CACHE)."""
    job = _text(node, "job_id")
    root = _cache_root()
    takes = find_takes(root, job)
    if not takes:
        _set_status(
            node, f"results of job {job} are not in the cache {root}: press Generate to make them again"
        )
        update_output(node, has_result=False)
        return None
    result = _show_takes(node, takes, _chosen_take(node, takes))
    more = f", takes {', '.join(map(str, takes))}" if len(takes) > 1 else ""
    _set_status(node, f"cached result of job {job}: frames {result.first}-{result.last}{more}")
    return result


def _show_takes(node: nuke.Node, takes: dict[int, CachedResult], chosen: int) -> CachedResult:
    take_knob = node["take"]
    assert isinstance(take_knob, nuke.Enumeration_Knob)
    take_knob.setValues([str(t) for t in takes])
    take_knob.setValue(str(chosen))
    _point_read(node, takes[chosen])
    return takes[chosen]


def select_take(node: nuke.Node, take: int) -> CachedResult | None:
    """Show take ``take`` of the node's job (its cached files; nothing is regenerated)."""
    takes = find_takes(_cache_root(), _text(node, "job_id"))
    if take not in takes:
        _set_status(node, f"take {take} of job {_text(node, 'job_id')} is not in the cache; Generate again")
        return None
    result = _show_takes(node, takes, take)
    _set_status(
        node, f"showing take {take} of job {_text(node, 'job_id')}: frames {result.first}-{result.last}"
    )
    return result


def _point_read(node: nuke.Node, result: CachedResult) -> None:
    read = _inner(node, "VeraResult")
    _set_read(read, result, _text(node, "working_space"))
    update_output(node)


def tcl_escape(text: str) -> str:
    """``text`` with TCL's substitution characters escaped, for a knob Nuke evaluates as TCL (a Read's or
    Write's ``file``): ``[cmd]`` would run a command (``[python -exec {...}]`` runs Python), ``$name`` reads a
    variable and ``\\`` starts an escape. Nuke's TCL substitution turns ``\\[`` back into ``[``, so the
    evaluated path is ``text`` as given (Nuke Python developer guide, "TCL expressions in knobs")."""
    return re.sub(r"([\\\[\]$])", r"\\\1", text)


def _script_relative(path: str) -> str:
    """``path`` written relative to the saved script's folder as Nuke's TCL (``[file dirname [value root.name]]/
    vera_cache/...``) when it lies inside it; otherwise (``$VERA_CACHE``, an unsaved script) as it is."""
    script = _script_path()
    if not script:
        return tcl_escape(path)
    folder = Path(script).parent
    try:
        relative = Path(path).relative_to(folder)
    except ValueError:
        return tcl_escape(path)
    return f"{_RELATIVE_ROOT}/{tcl_escape(relative.as_posix())}"


def _set_read(read: nuke.Node, result: CachedResult, working_space: str) -> None:
    read["file"].setValue(_script_relative(result.pattern))
    for knob in ("first", "origfirst"):
        read[knob].setValue(result.first)
    for knob in ("last", "origlast"):
        read[knob].setValue(result.last)
    # The engine returns the plate's own working space: reading it "as" that space is the identity.
    if working_space:
        read["colorspace"].setValue(working_space)


# ---------------------------------------------------------------------------------------------------------
# Generate and Cancel


@dataclass
class _Run:
    node: str
    request: GenerateRequest
    upload: Path
    inputs: list[tuple[str, str, str]]  # (input node name, channels, EXR pattern) to render
    preview_size: tuple[int, int]
    preview_dir: Path
    on_finished: Callable[[str, GenerateResult | None, str], None] | None = None
    cancel: threading.Event = dataclass_field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    job_id: str = ""
    previews: int = 0
    status: str = ""


_RUNS: dict[str, _Run] = {}


def _frames(node: nuke.Node, src: nuke.Node) -> tuple[int, int]:
    if _text(node, "frame_range") == "custom":
        first, last = int(node["range_first"].value()), int(node["range_last"].value())
        where = "the node's first/last knobs"
    else:
        first, last = src.firstFrame(), src.lastFrame()
        where = f"the src input {src.name()}"
    if last < first:
        raise OptionsError("frame range", f"{first}-{last} from {where} ends before it starts")
    return first, last


def _working_space() -> str:
    knob = nuke.root().knob("workingSpaceLUT")
    if knob is None:
        return "linear"
    return knob.getText() if isinstance(knob, nuke.String_Knob) else str(knob.value())


def _render_chunk(node_name: str, input_name: str, channels: str, pattern: str, first: int, last: int) -> str:
    """Main thread: render frames ``first..last`` of the node's input ``input_name`` to ``pattern`` as float EXRs.
    Returns ``""`` or what went wrong (executeInMainThreadWithResult would swallow an exception)."""
    node = nuke.toNode(node_name)
    if not isinstance(node, nuke.Group):
        return f"{node_name} was deleted"
    try:
        # A temporary Write: kept out of Edit ▸ Undo, removed whatever happens.
        nuke.Undo.disable()
        try:
            with node:
                write = nuke.nodes.Write(
                    file_type="exr",
                    datatype="32 bit float",
                    compression="Zip (1 scanline)",
                    channels=channels,
                    create_directories=True,
                )
                write["raw"].setValue(
                    True
                )  # the working space's values as they are: a linear EXR, no transform
                write["file"].setValue(tcl_escape(pattern))
                write.setInput(0, _inner(node, input_name))
                try:
                    nuke.execute(write, first, last)
                finally:
                    nuke.delete(write)
        finally:
            nuke.Undo.enable()
    except Exception as exc:  # nuke.execute raises RuntimeError for render errors
        return f"could not render the input: {exc}"
    return ""


def render_input(
    node_name: str,
    inputs: list[tuple[str, str, str]],
    frames: list[int],
    progress: Callable[[float, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> str:
    """Render each ``(input node, channels, EXR pattern)`` of the Vera node ``node_name`` for ``frames``,
    ``RENDER_CHUNK_FRAMES`` at a time on the main thread. Call it from a worker thread to keep the GUI
    responsive between chunks (or on the main thread in a terminal session). Returns ``""``, ``"cancelled"`` or
    what went wrong."""
    total = len(frames) * len(inputs)
    done = 0
    for input_name, channels, pattern in inputs:
        for start in range(0, len(frames), RENDER_CHUNK_FRAMES):
            if cancelled is not None and cancelled():
                return "cancelled"
            chunk = frames[start : start + RENDER_CHUNK_FRAMES]
            error = _on_main(_render_chunk, node_name, input_name, channels, pattern, chunk[0], chunk[-1])
            if error is None:
                return "could not render the input: Nuke's main thread did not answer"
            if error:
                return str(error)
            done += len(chunk)
            if progress is not None:
                progress(
                    done / total, f"rendered {input_name} frames {chunk[0]}-{chunk[-1]} ({done}/{total})"
                )
    return ""


def _prepare(node: nuke.Group, on_finished: Callable[[str, GenerateResult | None, str], None] | None) -> _Run:
    """Main thread: everything Generate needs from the node graph, checked; nothing is rendered yet."""
    src = node.input(0)
    if src is None:
        raise OptionsError("src", "nothing is connected; connect the plate (e.g. a Read) to the src input")
    fields = option_fields(node)
    if not fields:
        if not connect(node, quiet=True):
            raise GenerateError(_text(node, "status").removeprefix("error: "))
        fields = option_fields(node)
    working_space = _working_space()
    prompt, options = job_options(fields, option_values(node), working_space)
    options["model"] = _text(node, "model")
    options.setdefault("name", f"{Path(_script_path() or 'untitled').stem}/{node.name()}")
    first, last = _frames(node, src)
    node["working_space"].setValue(working_space)
    root = _cache_root()
    upload = root / f".upload-{uuid.uuid4().hex[:12]}"
    plate = (upload / "src.####.exr").as_posix()
    mask = (upload / "mask.####.exr").as_posix() if node.input(1) is not None else None
    inputs = [("src", "rgba", plate)] + ([("mask", "alpha", mask)] if mask is not None else [])
    request = GenerateRequest(
        address=_text(node, "engine").strip(),
        prompt=prompt,
        options=options,
        frames=list(range(first, last + 1)),
        plate=plate,
        mask=mask,
        cache_root=root,
        previews=True,
    )
    try:
        size = (int(src.width()), int(src.height()))
    except Exception:  # an input that cannot tell its size yet: previews keep their own
        size = (0, 0)
    return _Run(
        node=node.fullName(),
        request=request,
        upload=upload,
        inputs=inputs,
        preview_size=size,
        preview_dir=root / ".previews" / safe_name(node.fullName()),
        on_finished=on_finished,
    )


class _TaskSink:
    """Progress to a ``nuke.ProgressTask`` (whose cancel cancels the job) and to the node's status knob."""

    def __init__(self, task: nuke.ProgressTask, run: _Run) -> None:
        self.task = task
        self.run = run
        self._last = ""

    def update(self, fraction: float, message: str) -> None:
        self.task.setProgress(round(max(0.0, min(1.0, fraction)) * 100))
        self.task.setMessage(message)
        if message != self._last:
            self._last = message
            _post(_show_status, self.run.node, message)

    def rendering(self, fraction: float, message: str) -> None:
        self.update(fraction, f"rendering the input: {message}")

    def cancelled(self) -> bool:
        return self.run.cancel.is_set() or bool(self.task.isCancelled())


def _show_status(name: str, text: str) -> None:
    node = nuke.toNode(name)
    if node is not None:
        _set_status(node, text)


def _set_job(name: str, job_id: str) -> None:
    node = nuke.toNode(name)
    if node is not None:
        node["job_id"].setValue(job_id)


def _show_preview(name: str, path: str, size: tuple[int, int]) -> None:
    """Main thread: the newest preview in the node's output, fitted to the plate's size, while the job runs."""
    node = nuke.toNode(name)
    if node is None or name not in _RUNS:
        return
    preview = _inner(node, "VeraPreview")
    preview["file"].setValue(tcl_escape(path))
    for knob in ("first", "last", "origfirst", "origlast"):
        preview[knob].setValue(1)
    fit = _inner(node, "VeraPreviewFit")
    if size[0] and size[1]:
        fit["box_width"].setValue(size[0])
        fit["box_height"].setValue(size[1])
        fit["box_fixed"].setValue(True)  # "force this shape": without it Nuke ignores box_height
    _inner(node, "VeraOutput")["which"].setValue(_SWITCH_INPUT["preview"])


def _save_preview(run: _Run, status: pb.JobStatus) -> None:
    """Worker thread: write a new preview as a PNG (a new name each time, so the Read reloads it)."""
    preview = status.preview
    if not status.HasField("preview") or not preview.width or not preview.height:
        return
    run.previews += 1
    # The engine's job id is not trusted to be a file name (issue 28): reduced to safe characters.
    stem = safe_name(run.job_id or "job")
    path = run.preview_dir / f"{stem}.{run.previews:05d}.png"
    write_png(path, preview.width, preview.height, preview.rgb8)
    size = run.preview_size if all(run.preview_size) else (preview.width, preview.height)
    _post(_show_preview, run.node, path.as_posix(), size)
    previous = run.preview_dir / f"{stem}.{run.previews - 1:05d}.png"
    with contextlib.suppress(OSError):
        previous.unlink()


def _worker(run: _Run) -> None:
    task = nuke.ProgressTask(f"Vera Edit {run.node}")
    sink = _TaskSink(task, run)
    request = run.request

    def submitted(job_id: str) -> None:
        run.job_id = job_id
        shutil.rmtree(run.upload, ignore_errors=True)  # the engine has the frames now
        _post(_set_job, run.node, job_id)

    try:
        error = render_input(
            run.node,
            run.inputs,
            request.frames,
            sink.rendering,
            sink.cancelled,
        )
        if error == "cancelled":
            raise GenerateCancelled("cancelled while rendering the input")
        if error:
            raise GenerateError(error)
        result = run_generate(
            request, sink, on_submitted=submitted, on_status=lambda status: _save_preview(run, status)
        )
    except GenerateCancelled:
        _post(_finish, run, None, f"cancelled job {run.job_id}" if run.job_id else "cancelled")
    except GenerateError as exc:
        _post(_finish, run, None, f"error: {exc}")
    except Exception as exc:  # a bug: still a message on the node, not a traceback in a thread
        _post(_finish, run, None, f"error: unexpected {type(exc).__name__}: {exc}")
    else:
        _post(_finish, run, result, "")
    finally:
        shutil.rmtree(run.upload, ignore_errors=True)
        del sink, task  # the last references: Nuke closes the progress bar


def _finish(run: _Run, result: GenerateResult | None, text: str) -> None:
    _RUNS.pop(run.node, None)
    shutil.rmtree(run.preview_dir, ignore_errors=True)
    node = nuke.toNode(run.node)
    if node is not None:  # deleted while generating: the results stay in the cache
        text = _show_finished(node, run, result, text)
    run.status = text
    if run.on_finished is not None:
        run.on_finished(run.node, result, text)


def _show_finished(node: nuke.Node, run: _Run, result: GenerateResult | None, text: str) -> str:
    _inner(node, "VeraPreview")["file"].setValue("")  # its files are gone with the job's previews
    if result is None:
        _set_status(node, text)
        update_output(node)  # the preview goes; the previous result (or the source) comes back
        if text.startswith("error: "):
            nuke.message(f"Vera Edit ({run.node}): {text.removeprefix('error: ')}")
        return text
    node["job_id"].setValue(result.job_id)
    seed = node.knob(_knob_name("seed"))
    if seed is not None:
        seed.setValue(result.seed)
    shown = _show_takes(node, result.takes, 1)
    more = f", takes 1-{max(result.takes)}" if len(result.takes) > 1 else ""
    text = f"done: job {result.job_id}, frames {shown.first}-{shown.last}, seed {result.seed}{more}"
    _set_status(node, text)
    return text


def _vera_group(node: nuke.Node | None) -> nuke.Group | None:
    node = node or nuke.thisNode()
    if isinstance(node, nuke.Group) and is_vera_node(node):
        return node
    _fail(None, f"{node.name()} is not a Vera Edit node; create one with Nodes > Vera > Vera Edit")
    return None


def _start(
    node: nuke.Node | None, on_finished: Callable[[str, GenerateResult | None, str], None] | None
) -> _Run | None:
    group = _vera_group(node)
    if group is None:
        return None
    name = group.fullName()
    if name in _RUNS:
        _fail(
            group, f"{name} is already generating (job {_RUNS[name].job_id or 'uploading'}); cancel it first"
        )
        return None
    try:
        run = _prepare(group, on_finished)
    except (OptionsError, GenerateError) as exc:
        _fail(group, str(exc))
        return None
    _RUNS[name] = run
    _set_status(group, f"rendering the input: {len(run.request.frames)} frames for {run.request.address}")
    return run


def generate(
    node: nuke.Node | None = None,
    on_finished: Callable[[str, GenerateResult | None, str], None] | None = None,
) -> threading.Thread | None:
    """The Generate button: check the node here, then render the input, run the job and fetch the results on a
    worker thread (the GUI stays responsive; the progress bar cancels). ``on_finished(node name, result or None,
    status text)`` runs on the main thread at the end.

    Returns the worker thread (``None`` when nothing was started; the reason is on the node's status knob).
    """
    run = _start(node, on_finished)
    if run is None:
        return None
    run.thread = threading.Thread(target=_worker, args=(run,), name=f"vera-{run.node}", daemon=True)
    run.thread.start()
    return run.thread


def generate_now(node: nuke.Node | None = None) -> str:
    """Generate on this thread, returning the final status text: for terminal sessions (``nuke -t``) and farm
    scripts, which have no event loop to hand work back to."""
    run = _start(node, None)
    if run is None:
        group = node or nuke.thisNode()
        return _text(group, "status") if group.knob("status") is not None else "error: not a Vera Edit node"
    _worker(run)
    return run.status


def cancel(node: nuke.Node | None = None) -> bool:
    """The Cancel button: cancel this node's running Generate (the engine job too)."""
    node = node or nuke.thisNode()
    run = _RUNS.get(node.fullName())
    if run is None:
        _set_status(node, "nothing to cancel")
        return False
    run.cancel.set()
    _set_status(node, "cancelling ...")
    return True


# ---------------------------------------------------------------------------------------------------------
# Bake layers


def bake_layers(node: nuke.Node | None = None) -> dict[str, nuke.Node]:
    """Bake layers: a Read for the edit layer, a Read for the matte and a Merge (over) onto the source.

    Built beside the node in its parent group, from the take the node shows: ``edit Read -> Merge(over, A = edit
    layer) <- source``, then a Copy bringing ``matte.alpha`` from the matte Read into the stream for grading and
    roto. One step of Edit ▸ Undo.
    """
    node = _vera_group(node)
    if node is None:
        return {}
    job = _text(node, "job_id")
    takes = find_takes(_cache_root(), job) if job else {}
    source = node.input(0)
    if not takes or source is None:
        _fail(
            node, "nothing to bake: Generate first" if source is not None else "connect the src input first"
        )
        return {}
    take = _chosen_take(node, takes)
    result = takes[take]
    working_space = _text(node, "working_space")
    label = f"job {job[:8]}" + (f" take {take}" if len(takes) > 1 else "")
    _declare_layers()
    undo = nuke.Undo()
    undo.begin("Bake Vera layers")
    try:
        with node.parent():
            edit = nuke.nodes.Read(label=f"Vera edit layer\n{label}")
            matte = nuke.nodes.Read(label=f"Vera matte (matte.alpha)\n{label}")
            for read in (edit, matte):
                _set_read(read, result, working_space)
            merge = nuke.nodes.Merge2(operation="over", label="Vera edit over source")
            merge["Achannels"].setValue("edit")
            merge.setInput(0, source)  # B
            merge.setInput(1, edit)  # A
            copy = nuke.nodes.Copy(label="Vera matte -> matte.alpha")
            copy["from0"].setValue("matte.alpha")
            copy["to0"].setValue("matte.alpha")
            copy.setInput(0, merge)
            copy.setInput(1, matte)
        for baked, name in (
            (edit, "VeraEditLayer1"),
            (matte, "VeraMatte1"),
            (merge, "VeraOver1"),
            (copy, "VeraMatteCopy1"),
        ):
            baked.setName(name, uncollide=True)  # a second bake gets VeraEditLayer2 ...
        x, y = node.xpos() + 200, node.ypos()
        for i, baked in enumerate((edit, matte, merge, copy)):
            baked.setXYpos(x + (i % 2) * 120, y + (i // 2) * 80)
    finally:
        undo.end()
    _set_status(node, f"baked job {job} into {edit.name()}, {matte.name()}, {merge.name()}, {copy.name()}")
    return {"edit": edit, "matte": matte, "merge": merge, "copy": copy}


# ---------------------------------------------------------------------------------------------------------
# Buttons and menus


def button(action: str) -> None:
    """What the node's buttons run (``generate``, ``cancel``, ``bake``, ``connect``, ``randomise:<option>``).

    Any failure, a bug included, ends up on the node's status knob and in a message, not as a traceback.
    """
    node = nuke.thisNode()
    name, _, option = action.partition(":")
    try:
        if name == "generate":
            generate(node)
        elif name == "cancel":
            cancel(node)
        elif name == "bake":
            bake_layers(node)
        elif name == "connect":
            connect(node)
        elif name == "randomise":
            randomise(option, node)
        else:
            raise ValueError(f"unknown action {action!r}")
    except Exception as exc:
        _fail(node, f"{name} failed unexpectedly ({type(exc).__name__}: {exc}); please report this")


def setup() -> None:
    """Register Nodes ▸ Vera ▸ Vera Edit and the panel; safe to call twice (menu entries are replaced)."""
    nuke.menu("Nodes").addMenu("Vera").addCommand(
        "Vera Edit", "import vera_plugin.hosts.nuke as _vera\n_vera.create_node()"
    )
    try:
        import nukescripts  # type: ignore[import-not-found]  # no stubs for nukescripts

        __import__("vera_plugin.panel")  # needs PySide6 (Nuke 16+)
    except ImportError as exc:  # terminal sessions and Nuke without PySide6: no panel, the node still works
        nuke.tprint(f"Vera Edit: panel not registered ({exc})")
        return
    nukescripts.panels.registerWidgetAsPanel(PANEL_WIDGET, "Vera Edit", PANEL_ID)


def teardown() -> None:
    """Remove the menu entries :func:`setup` added."""
    vera = nuke.menu("Nodes").findItem("Vera")
    if vera is not None:
        nuke.menu("Nodes").removeItem("Vera")
