"""The Nuke adapter: the "Vera Edit" node (a Python-built Group), Generate, Cancel, Bake layers, menus.

Thin on purpose: knob layout comes from :mod:`vera_plugin.schema_ui`, the cache from :mod:`vera_plugin.cache`
and the job itself from :mod:`vera_plugin.generate`. Threading follows Nuke's rules: the node graph is only
touched on the main thread (rendering the input, pointing Reads at results); the upload, the watch and the
download run on a worker thread that reports through ``nuke.ProgressTask`` and hands results back with
``nuke.executeInMainThread``. The worker never holds node objects, only node names.

Inside the node::

    src (Input 0) ─────────────────────────────┐
    mask (Input 1, optional)                   │ 0 source
    VeraResult (Read of vera_edit.####.exr) ───┤ 1 composite: rgba + edit.* + matte.alpha
        └─ VeraEditToRGBA (Copy edit -> rgba) ─┤ 2 edit
        └─ VeraMatteToRGBA (Copy matte -> rgba)┘ 3 matte
                                   VeraOutput (Switch, from the output knob) ─ Output
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shutil
import threading
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import nuke

from vera_plugin.cache import CachedResult, cache_root, find_results
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
from vera_plugin.schema_ui import (
    Field,
    OptionsError,
    fields_for_model,
    find_model,
    job_options,
    model_from_json,
    model_to_json,
)
from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = [
    "NODE_MARKER",
    "OUTPUTS",
    "PANEL_ID",
    "bake_layers",
    "button",
    "cancel",
    "connect",
    "create_node",
    "generate",
    "is_vera_node",
    "knob_changed",
    "on_create",
    "option_fields",
    "randomise",
    "relink",
    "setup",
    "teardown",
    "update_output",
]

NODE_MARKER = "vera_edit_node"
OUTPUTS = ("composite", "edit", "matte", "source")
_SWITCH_INPUT = {"source": 0, "composite": 1, "edit": 2, "matte": 3}
PANEL_ID = "uk.co.vera.VeraEditPanel"
# Knob names a Group already has (or that this module uses); a schema option with such a name gets a prefix.
_RESERVED = {
    "name", "label", "help", "disable", "onCreate", "knobChanged", "onDestroy", "tile_color", "note_font",
    "selected", "hide_input", "icon", "postage_stamp", "xpos", "ypos", "engine", "connect", "engine_status",
    "model", "frame_range", "range_first", "range_last", "output", "generate", "cancel", "bake", "status",
    "job_id",
}  # fmt: skip
# Python run by the node itself (saved in the script); guarded so a script opens even without vera_plugin.
_GUARD = "try:\n    import vera_plugin.hosts.nuke as _vera\nexcept ImportError:\n    _vera = None\nif _vera:\n    _vera.{call}"
_BUTTON = "import vera_plugin.hosts.nuke as _vera\n_vera.button({action!r})"


def _knob_name(option: str) -> str:
    return f"opt_{option}" if option in _RESERVED else option


def is_vera_node(node: nuke.Node | None) -> bool:
    """True for a node built by :func:`create_node`."""
    return node is not None and node.knob(NODE_MARKER) is not None


def _text(node: nuke.Node, name: str) -> str:
    return str(node[name].value())


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


# ---------------------------------------------------------------------------------------------------------
# Building the node


def _hidden(knob: nuke.Knob) -> nuke.Knob:
    knob.setFlag(nuke.INVISIBLE)
    return knob


def create_node(address: str | None = None, connect_timeout: float = 3.0) -> nuke.Group:
    """Create a "Vera Edit" node in the current group, wired to the selected node when there is one.

    The options come from the engine's ``GetInfo``; when the engine cannot be reached the node is still
    created and says so in its status (press "connect" later).
    """
    try:
        selected: nuke.Node | None = nuke.selectedNode()
    except ValueError:  # Nuke raises when nothing is selected
        selected = None
    group = nuke.nodes.Group()
    group.setName("VeraEdit1", uncollide=True)
    _build_internals(group)
    _build_knobs(group, address or os.environ.get("VERA_ENGINE", DEFAULT_ADDRESS))
    if selected is not None and selected is not group:
        group.setInput(0, selected)
        group.setXYpos(selected.xpos(), selected.ypos() + 60)
    connect(group, timeout=connect_timeout, quiet=True)
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
        switch = nuke.nodes.Switch(name="VeraOutput")
        for index, node in ((0, src), (1, read), (2, edit), (3, matte)):
            switch.setInput(index, node)
        output = nuke.nodes.Output(name="Output1")
        output.setInput(0, switch)
        for i, node in enumerate((src, mask, read, edit, matte, switch, output)):
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


def option_fields(node: nuke.Node) -> list[Field]:
    """The option fields of the node's current model (empty before the first connect)."""
    models = _models(node)
    if not models:
        return []
    name = _text(node, "model")
    model = next((m for m in models if m.name == name), models[0])
    return fields_for_model(model)


def _install_options(node: nuke.Node, fields: list[Field]) -> None:
    # Nuke appends knobs, so the option knobs and everything after them are rebuilt in order; values the
    # artist set survive when the new model has an option of the same name and kind.
    knobs = node.allKnobs()
    names = [k.name() for k in knobs]
    start = names.index("model") + 1
    saved: dict[str, tuple[str, Any]] = {}
    for knob in knobs[start:]:
        saved[knob.name()] = (knob.Class(), knob.value())
        node.removeKnob(knob)
    for field in fields:
        for knob in _option_knob(field):
            node.addKnob(knob)
            previous = saved.get(knob.name())
            if previous and previous[0] == knob.Class() and knob.Class() != "PyScript_Knob":
                with contextlib.suppress(ValueError):  # a choice the new model lacks: keep the default
                    knob.setValue(previous[1])
    _add_trailing_knobs(node)
    for name, (cls, value) in saved.items():
        restored = node.knob(name)
        keep = cls not in ("PyScript_Knob", "Text_Knob") or name == "status"
        if restored is not None and cls == restored.Class() and keep:
            restored.setValue(value)
    _sync_range_knobs(node)


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
    node["vera_models"].setValue(
        json.dumps([json.loads(model_to_json(m)) for m in info.models], sort_keys=True)
    )
    model_knob = node["model"]
    assert isinstance(model_knob, nuke.Enumeration_Knob)
    previous = _text(node, "model")
    model_knob.setValues([m.name for m in info.models])
    try:
        model = find_model(info, previous if previous in [m.name for m in info.models] else "")
    except OptionsError as exc:
        _fail(node, str(exc))
        return False
    model_knob.setValue(model.name)
    _install_options(node, fields_for_model(model))
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


def knob_changed() -> None:
    """The node's knobChanged: output switch, model choice, frame range mode."""
    node, knob = nuke.thisNode(), nuke.thisKnob()
    if knob is None or not is_vera_node(node):
        return
    name = knob.name()
    try:
        if name == "output":
            update_output(node)
        elif name == "frame_range":
            _sync_range_knobs(node)
        elif name == "model":
            _install_options(node, option_fields(node))
        elif name == "engine":
            node["engine_status"].setValue("address changed: press connect")
    except Exception as exc:  # a callback must not raise into Nuke
        _fail(node, f"changing {name} failed unexpectedly ({type(exc).__name__}: {exc}); please report this")


def update_output(node: nuke.Node, has_result: bool | None = None) -> None:
    """Point the internal Switch at the chosen output; the source until there is a result."""
    if has_result is None:
        has_result = bool(_text(node, "job_id")) and bool(_inner(node, "VeraResult")["file"].value())
    which = _SWITCH_INPUT[_text(node, "output")] if has_result else _SWITCH_INPUT["source"]
    _inner(node, "VeraOutput")["which"].setValue(which)


def on_create() -> None:
    """The node's onCreate (also when a script opens): find cached results of its job."""
    node = nuke.thisNode()
    if is_vera_node(node) and _text(node, "job_id"):
        try:
            relink(node)
        except Exception as exc:  # a script must open whatever happens here
            _set_status(node, f"error: could not look for cached results ({type(exc).__name__}: {exc})")


def relink(node: nuke.Node) -> CachedResult | None:
    """Point the node's Read at its job's cached results (after a reopen, a move or a new $VERA_CACHE)."""
    job = _text(node, "job_id")
    root = cache_root(str(nuke.root()["name"].value()))
    result = find_results(root, job)
    if result is None:
        _set_status(
            node, f"results of job {job} are not in the cache {root}: press Generate to make them again"
        )
        update_output(node, has_result=False)
        return None
    _point_read(node, result)
    _set_status(node, f"cached result of job {job}: frames {result.first}-{result.last}")
    return result


def _point_read(node: nuke.Node, result: CachedResult) -> None:
    read = _inner(node, "VeraResult")
    _set_read(read, result, _text(node, "working_space"))
    update_output(node)


def _set_read(read: nuke.Node, result: CachedResult, working_space: str) -> None:
    read["file"].setValue(result.pattern)
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
    cancel: threading.Event = dataclass_field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    job_id: str = ""


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
    return str(knob.value()) if knob is not None else "linear"


def _render(node: nuke.Group, input_name: str, channels: str, pattern: str, first: int, last: int) -> None:
    with node:
        write = nuke.nodes.Write(
            file_type="exr",
            datatype="32 bit float",
            compression="Zip (1 scanline)",
            channels=channels,
            create_directories=True,
        )
        write["raw"].setValue(True)  # the working space's values as they are: a linear EXR, no transform
        write["file"].setValue(pattern)
        write.setInput(0, _inner(node, input_name))
        try:
            nuke.execute(write, first, last)
        finally:
            nuke.delete(write)


def _prepare(node: nuke.Group) -> tuple[GenerateRequest, Path]:
    src = node.input(0)
    if src is None:
        raise OptionsError("src", "nothing is connected; connect the plate (e.g. a Read) to the src input")
    fields = option_fields(node)
    if not fields:
        if not connect(node, quiet=True):
            raise GenerateError(_text(node, "status").removeprefix("error: "))
        fields = option_fields(node)
    values = {f.name: node[_knob_name(f.name)].value() for f in fields}
    working_space = _working_space()
    prompt, options = job_options(fields, values, working_space)
    options["model"] = _text(node, "model")
    options.setdefault("name", f"{Path(str(nuke.root()['name'].value()) or 'untitled').stem}/{node.name()}")
    first, last = _frames(node, src)
    node["working_space"].setValue(working_space)
    root = cache_root(str(nuke.root()["name"].value()))
    upload = root / f".upload-{uuid.uuid4().hex[:12]}"
    plate = (upload / "src.####.exr").as_posix()
    mask = (upload / "mask.####.exr").as_posix() if node.input(1) is not None else None
    try:
        _render(node, "src", "rgba", plate, first, last)
        if mask is not None:
            _render(node, "mask", "alpha", mask, first, last)
    except Exception:
        shutil.rmtree(upload, ignore_errors=True)
        raise
    request = GenerateRequest(
        address=_text(node, "engine").strip(),
        prompt=prompt,
        options=options,
        frames=list(range(first, last + 1)),
        plate=plate,
        mask=mask,
        cache_root=root,
    )
    return request, upload


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
            nuke.executeInMainThread(_show_status, (self.run.node, message))

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


def _worker(run: _Run, request: GenerateRequest, upload: Path) -> None:
    task = nuke.ProgressTask(f"Vera Edit {run.node}")
    sink = _TaskSink(task, run)

    def submitted(job_id: str) -> None:
        run.job_id = job_id
        shutil.rmtree(upload, ignore_errors=True)  # the engine has the frames now
        nuke.executeInMainThread(_set_job, (run.node, job_id))

    try:
        result = run_generate(request, sink, on_submitted=submitted)
    except GenerateCancelled:
        nuke.executeInMainThread(_finish, (run, None, f"cancelled job {run.job_id}".strip()))
    except GenerateError as exc:
        nuke.executeInMainThread(_finish, (run, None, f"error: {exc}"))
    except Exception as exc:  # a bug: still a message on the node, not a traceback in a thread
        nuke.executeInMainThread(_finish, (run, None, f"error: unexpected {type(exc).__name__}: {exc}"))
    else:
        nuke.executeInMainThread(_finish, (run, result, ""))
    finally:
        shutil.rmtree(upload, ignore_errors=True)
        del sink, task  # the last references: Nuke closes the progress bar


def _finish(run: _Run, result: GenerateResult | None, text: str) -> None:
    _RUNS.pop(run.node, None)
    node = nuke.toNode(run.node)
    if node is None:  # deleted while generating: the results stay in the cache
        return
    if result is None:
        _set_status(node, text)
        if text.startswith("error: "):
            nuke.message(f"Vera Edit ({run.node}): {text.removeprefix('error: ')}")
        return
    node["job_id"].setValue(result.job_id)
    seed = node.knob(_knob_name("seed"))
    if seed is not None:
        seed.setValue(result.seed)
    _point_read(node, result.result)
    _set_status(
        node,
        f"done: job {result.job_id}, frames {result.result.first}-{result.result.last}, seed {result.seed}",
    )


def _vera_group(node: nuke.Node | None) -> nuke.Group | None:
    node = node or nuke.thisNode()
    if isinstance(node, nuke.Group) and is_vera_node(node):
        return node
    _fail(None, f"{node.name()} is not a Vera Edit node; create one with Nodes > Vera > Vera Edit")
    return None


def generate(node: nuke.Node | None = None) -> threading.Thread | None:
    """The Generate button: render the input on this (main) thread, then run the job on a worker thread.

    Returns the worker thread (``None`` when nothing was started; the reason is on the node's status knob).
    """
    node = _vera_group(node)
    if node is None:
        return None
    name = node.fullName()
    if name in _RUNS:
        _fail(
            node, f"{name} is already generating (job {_RUNS[name].job_id or 'uploading'}); cancel it first"
        )
        return None
    try:
        _set_status(node, "rendering the input ...")
        request, upload = _prepare(node)
    except (OptionsError, GenerateError) as exc:
        _fail(node, str(exc))
        return None
    except (RuntimeError, OSError, ValueError) as exc:  # nuke.execute raises RuntimeError for render errors
        _fail(node, f"could not render the input: {exc}")
        return None
    run = _Run(node=name)
    run.thread = threading.Thread(
        target=_worker, args=(run, request, upload), name=f"vera-{name}", daemon=True
    )
    _RUNS[name] = run
    _set_status(node, f"submitting {len(request.frames)} frames to {request.address}")
    run.thread.start()
    return run.thread


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

    Built beside the node in its parent group: ``edit Read -> Merge(over, A = edit layer) <- source``, then a
    Copy bringing ``matte.alpha`` from the matte Read into the stream for grading and roto.
    """
    node = _vera_group(node)
    if node is None:
        return {}
    job = _text(node, "job_id")
    result = find_results(cache_root(str(nuke.root()["name"].value())), job) if job else None
    source = node.input(0)
    if result is None or source is None:
        _fail(
            node, "nothing to bake: Generate first" if source is not None else "connect the src input first"
        )
        return {}
    working_space = _text(node, "working_space")
    label = job[:8]
    _declare_layers()
    with node.parent():
        edit = nuke.nodes.Read(label=f"Vera edit layer\njob {label}")
        matte = nuke.nodes.Read(label=f"Vera matte (matte.alpha)\njob {label}")
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

        importlib.import_module("vera_plugin.panel")  # needs PySide6
    except ImportError as exc:  # terminal sessions and Nuke without PySide6: no panel, the node still works
        nuke.tprint(f"Vera Edit: panel not registered ({exc})")
        return
    nukescripts.panels.registerWidgetAsPanel("vera_plugin.panel.VeraPanel", "Vera Edit", PANEL_ID)


def teardown() -> None:
    """Remove the menu entries :func:`setup` added."""
    vera = nuke.menu("Nodes").findItem("Vera")
    if vera is not None:
        nuke.menu("Nodes").removeItem("Vera")
