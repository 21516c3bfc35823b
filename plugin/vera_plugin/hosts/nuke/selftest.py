"""Vera Edit's self-test inside Nuke: the first thing a studio runs, ``nuke -t nuke_gizmos/vera_selftest.py``.

One line per check, ``PASS``/``FAIL``/``SKIP``, the check's name and the value seen, so that a failing line can
be sent back as it is. It builds a Vera Edit node in an empty script and exercises what the node does with Nuke:
its knobs, a prompt holding TCL characters, the input rendered through the node's own input path to EXR, a
layered result read back (``edit.*``, ``matte.alpha``, takes), the script saved, moved and reopened (relative
result paths), Bake layers, the error path, and with ``--engine HOST:PORT`` one real job end to end. In a GUI
session the menus and the pane are checked too, and the engine job runs the way the Generate button runs it (a
worker thread; the result lines arrive when it finishes, ``SelfTest.done`` is set then).

Without an engine the node's options come from a small schema of the self-test's own (the engine's option names,
a vocabulary, takes), so everything but the job itself is checked offline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nuke

from vera_plugin.cache import cache_root, job_dir
from vera_plugin.hosts.checklog import CheckLog, Outcome
from vera_plugin.hosts.nuke import adapter
from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = ["SELFTEST_PROMPT", "SelfTest", "main", "offline_model"]

SELFTEST_PROMPT = "add a [x] $y"
_FORMAT = "32 24 1 vera_selftest"
_PLATE = (0.25, 0.5, 0.75, 1.0)
_FRAMES = [1, 2, 3]


def offline_model() -> pb.ModelInfo:
    """The schema the node gets when no engine is given: the engine's option names and kinds, a vocabulary."""
    text, integer, choice = pb.OPTION_TYPE_STRING, pb.OPTION_TYPE_INT, pb.OPTION_TYPE_CHOICE
    return pb.ModelInfo(
        name="selftest",
        is_default=True,
        options=[
            pb.OptionSpec(name="task", label="Task", type=choice, choices=["object_addition", "background_change"],
                          default=pb.OptionValue(string_value="object_addition")),
            pb.OptionSpec(name="prompt", label="Prompt", type=text, required=True, help="What to add"),
            pb.OptionSpec(name="negative_prompt", label="Negative prompt", type=text,
                          default=pb.OptionValue(string_value="")),
            pb.OptionSpec(name="seed", label="Seed", type=integer, min=0, max=2**31 - 1),
            pb.OptionSpec(name="steps", label="Steps", type=integer, default=pb.OptionValue(int_value=2), min=1,
                          max=200),
            pb.OptionSpec(name="colorspace", label="Plate colour space", type=choice,
                          choices=["ACEScg", "Linear Rec.709 (sRGB)"], default=pb.OptionValue(string_value="ACEScg")),
            pb.OptionSpec(name="takes", label="Takes", type=integer, default=pb.OptionValue(int_value=1), min=1,
                          max=8),
        ],
        vocabulary=["add", "a", "red", "ball", "[", "]", "$"],
    )  # fmt: skip


def _sample(node: Any, channel: str, x: int = 1, y: int = 1) -> float:
    """``node.sample(channel, x, y)``: one pixel of the node's output at the current frame."""
    return float(node.sample(channel, x, y))


class SelfTest(CheckLog):
    """The checks, run in order by :meth:`run`; ``lines`` holds the report, ``failures`` counts FAIL lines."""

    def __init__(
        self, engine: str = "", folder: Path | None = None, out: Callable[[str], None] | None = None
    ) -> None:
        self.engine = engine
        self.folder = folder or Path(tempfile.mkdtemp(prefix="vera_selftest_"))
        super().__init__(
            out or nuke.tprint
        )  # Nuke's own console: the terminal, or the Script Editor's output
        self.pane: Any = None
        self._vera_cache: str | None = None
        self.done = threading.Event()
        self.node: Any = None
        self.job = f"selftest-{uuid.uuid4().hex[:8]}"

    # -- the checks ----------------------------------------------------------------------------------------

    def run(self) -> SelfTest:
        """All checks; returns at once in a GUI session with an engine (the job's lines follow, then ``done``)."""
        checks: list[tuple[str, Callable[[], Outcome]]] = [
            ("versions", self._versions),
            ("empty script", self._empty_script),
            ("menus and pane", self._menus),
            ("node", self._node),
            ("knob classes and names", self._knobs),
            ("prompt round trip", self._prompt),
            ("unknown words flagged", self._words),
            ("input rendered to EXR", self._render),
            ("layered result read", self._layered),
            ("take switch", self._takes),
            ("save, move and reopen", self._reopen),
            ("bake layers", self._bake),
            ("errors reported", self._errors),
        ]
        for name, test in checks:
            if not self.check(name, test) and name in ("versions", "empty script", "node"):
                self.report("FAIL", "stopped", "the checks after this one need it")
                self._finish()
                return self
        if self.engine:
            self._engine_job()
        else:
            self.report("SKIP", "engine job", "no --engine given")
            self._finish()
        return self

    def _finish(self) -> None:
        if self._vera_cache is not None:
            os.environ["VERA_CACHE"] = self._vera_cache
        verdict = "PASS" if not self.failures else "FAIL"
        self.report(
            verdict, "summary", f"{len(self.lines)} lines, {self.failures} failed; files in {self.folder}"
        )
        self.done.set()

    def _versions(self) -> Outcome:
        import grpc
        from google.protobuf import __version__ as protobuf_version

        nuke_version = getattr(nuke, "NUKE_VERSION_STRING", "unknown")
        python = ".".join(map(str, sys.version_info[:3]))
        return "PASS", (f"Nuke {nuke_version}, Python {python}, grpcio {grpc.__version__}, "
                        f"protobuf {protobuf_version}, GUI {bool(nuke.GUI)}")  # fmt: skip

    def _empty_script(self) -> Outcome:
        # The self-test saves and reopens its script: it must never touch an artist's work. A new GUI script
        # always holds a Viewer (Viewer1): that is still an empty script.
        nodes = [n for n in nuke.allNodes(group=nuke.root()) if n.Class() != "Viewer"]
        if nodes:
            return "FAIL", (f"the script holds {len(nodes)} nodes; run it in a new script (File > New) or as "
                            "nuke -t vera_selftest.py")  # fmt: skip
        # Results beside the self-test's script, so that relative paths are checked; put back at the end.
        self._vera_cache = os.environ.pop("VERA_CACHE", None)
        (self.folder / "shot").mkdir(parents=True, exist_ok=True)
        nuke.scriptSaveAs(str(self.folder / "shot" / "selftest.nk"), 1)
        return "PASS", f"script {adapter._script_path()}"

    def _menus(self) -> Outcome:
        if not nuke.GUI:
            return (
                "SKIP",
                "terminal session: no menus (run the self-test from the Script Editor to check them)",
            )
        adapter.setup()
        adapter.teardown()
        if nuke.menu("Nodes").findItem("Vera") is not None:
            return "FAIL", "teardown() left Nodes > Vera"
        adapter.setup()
        adapter.setup()  # safe twice
        item = nuke.menu("Nodes").findItem("Vera/Vera Edit")
        if item is None:
            return "FAIL", "Nodes > Vera > Vera Edit is missing after setup()"
        try:
            import nukescripts  # type: ignore[import-not-found]  # no stubs for nukescripts
            from PySide6 import QtWidgets

            __import__("vera_plugin.panel")
        except ImportError as exc:
            return "PASS", f"Nodes > Vera > Vera Edit; no pane ({exc}): Nuke 15 has no PySide6"
        if QtWidgets.QApplication.instance() is None:
            return "PASS", "Nodes > Vera > Vera Edit; pane not opened (no Qt application)"
        # What Windows > Custom > Vera Edit (or a saved layout) does; the pane stays open for the artist.
        self.pane = nukescripts.panels.restorePanel(adapter.PANEL_ID)
        if self.pane is None:
            return "FAIL", f"no pane registered as {adapter.PANEL_ID}"
        return "PASS", f"Nodes > Vera > Vera Edit; pane {adapter.PANEL_ID} opened"

    def _node(self) -> Outcome:
        nuke.addFormat(_FORMAT)
        plate = nuke.nodes.Constant(
            format="vera_selftest", color=list(_PLATE), first=_FRAMES[0], last=_FRAMES[-1]
        )
        plate.setName("SelfTestPlate")
        plate.setSelected(True)
        self.node = adapter.create_node(
            self.engine or "127.0.0.1:1", connect_timeout=3.0 if self.engine else 0.2
        )
        node = self.node
        if not self.engine:
            adapter.use_models(node, [offline_model()])
        inputs = sorted(n.name() for n in node.nodes() if n.Class() == "Input")
        # Nuke hands out a new Python wrapper for a node on every call: compare nodes with ==, never `is`.
        if node.input(0) != plate or inputs != ["mask", "src"]:
            return "FAIL", f"{node.name()}: inputs {inputs}, src connected to {node.input(0)}"
        return "PASS", (f"{node.name()} ({node.Class()}) below {plate.name()}, inputs src and mask, model "
                        f"{adapter._text(node, 'model')}, engine {adapter._text(node, 'engine_status')}")  # fmt: skip

    def _knobs(self) -> Outcome:
        expected = {
            "engine": "String_Knob", "connect": "PyScript_Knob", "engine_status": "Text_Knob",
            "model": "Enumeration_Knob", "prompt": "Multiline_Eval_String_Knob", "seed": "Int_Knob",
            "steps": "Int_Knob", "frame_range": "Enumeration_Knob", "range_first": "Int_Knob",
            "output": "Enumeration_Knob", "take": "Enumeration_Knob", "generate": "PyScript_Knob",
            "cancel": "PyScript_Knob", "bake": "PyScript_Knob", "status": "Text_Knob", "job_id": "String_Knob",
        }  # fmt: skip
        seen = {
            name: (self.node.knob(name).Class() if self.node.knob(name) else "missing") for name in expected
        }
        wrong = {name: cls for name, cls in seen.items() if cls != expected[name]}
        if wrong:
            return "FAIL", f"unexpected knobs {wrong}"
        return "PASS", f"{len(expected)} knobs as expected, {len(self.node.allKnobs())} in all"

    def _prompt(self) -> Outcome:
        self.node["prompt"].setValue(SELFTEST_PROMPT)
        sent = adapter.option_values(self.node)["prompt"]
        try:
            evaluated = repr(self.node["prompt"].value())
        except Exception as exc:
            evaluated = f"{type(exc).__name__}: {exc}"
        verdict = "PASS" if sent == SELFTEST_PROMPT else "FAIL"
        return verdict, f"sent {sent!r} (Nuke's own value() gives {evaluated})"

    def _words(self) -> Outcome:
        words = self.node.knob("prompt_words")
        if words is None:
            return "SKIP", "the engine's model reads free text (no vocabulary)"
        self.node["prompt"].setValue("add a red kite")
        adapter._update_words(self.node)
        note = words.value()
        self.node["prompt"].setValue(SELFTEST_PROMPT)
        return ("PASS" if note == "unknown to this model: kite" else "FAIL"), repr(note)

    def _render(self) -> Outcome:
        pattern = (self.folder / "render" / "src.####.exr").as_posix()
        error = adapter.render_input(self.node.fullName(), [("src", "rgba", pattern)], _FRAMES)
        if error:
            return "FAIL", error
        read = nuke.nodes.Read(file=pattern, first=_FRAMES[0], last=_FRAMES[-1])
        try:
            channels = [c for c in read.channels() if c.startswith("rgba.")]
            values = [_sample(read, f"rgba.{c}", 1, 1) for c in ("red", "green", "blue", "alpha")]
        finally:
            nuke.delete(read)
        files = sorted(p.name for p in (self.folder / "render").iterdir())
        ok = files == [f"src.{f:04d}.exr" for f in _FRAMES] and len(channels) == 4 and values == list(_PLATE)
        return ("PASS" if ok else "FAIL"), f"{files}, channels {channels}, pixel {values}"

    def _write_take(self, take: int, edit: float, matte: float) -> None:
        # A layered result made in Nuke itself: the plate with edit.* and matte.alpha, named like the engine's.
        adapter._declare_layers()
        colour = nuke.nodes.Constant(format="vera_selftest", color=[edit] * 3 + [matte], first=1, last=3)
        layers = nuke.nodes.Copy()
        for i, channel in enumerate(("red", "green", "blue", "alpha")):
            layers[f"from{i}"].setValue(f"rgba.{channel}")
            layers[f"to{i}"].setValue(f"edit.{channel}")
        matte_copy = nuke.nodes.Copy(from0="rgba.alpha", to0="matte.alpha")
        plate = nuke.toNode("SelfTestPlate")
        layers.setInput(0, plate)
        layers.setInput(1, colour)
        matte_copy.setInput(0, layers)
        matte_copy.setInput(1, colour)
        prefix = "vera_edit" if take == 1 else f"vera_edit_take{take}"
        folder = job_dir(cache_root(adapter._script_path()), self.job)
        write = nuke.nodes.Write(file=(folder / f"{prefix}.####.exr").as_posix(), file_type="exr",
                                 channels="all", datatype="16 bit half", create_directories=True)  # fmt: skip
        write.setInput(0, matte_copy)
        try:
            nuke.execute(write, _FRAMES[0], _FRAMES[-1])
        finally:
            for made in (write, matte_copy, layers, colour):
                nuke.delete(made)

    def _layered(self) -> Outcome:
        self._write_take(1, edit=0.125, matte=0.5)
        self._write_take(2, edit=0.375, matte=0.25)
        self.node["job_id"].setValue(self.job)
        result = adapter.relink(self.node)
        if result is None:
            return "FAIL", adapter._text(self.node, "status")
        channels = self.node.channels()
        wanted = ["edit.red", "edit.green", "edit.blue", "edit.alpha", "matte.alpha", "rgba.red"]
        missing = [c for c in wanted if c not in channels]
        self.node["output"].setValue("matte")
        adapter.update_output(self.node)
        matte_as_rgba = _sample(self.node, "rgba.red", 1, 1)
        self.node["output"].setValue("composite")
        adapter.update_output(self.node)
        ok = not missing and matte_as_rgba == 0.5
        return ("PASS" if ok else "FAIL"), (f"channels {sorted(channels)}{', missing ' + str(missing) if missing else ''}"
                                            f"; output 'matte' shows {matte_as_rgba}")  # fmt: skip

    def _takes(self) -> Outcome:
        takes = self.node["take"].values()
        before = _sample(self.node, "edit.red", 1, 1)
        adapter.select_take(self.node, 2)
        after = _sample(self.node, "edit.red", 1, 1)
        path = adapter._text(adapter._inner(self.node, "VeraResult"), "file")
        ok = takes == ["1", "2"] and (before, after) == (0.125, 0.375) and "vera_edit_take2." in path
        return ("PASS" if ok else "FAIL"), f"takes {takes}, edit.red {before} -> {after}, Read {path}"

    def _reopen(self) -> Outcome:
        name = self.node.name()
        stored = adapter._text(adapter._inner(self.node, "VeraResult"), "file")
        nuke.scriptSave()
        moved = self.folder / "moved"
        shutil.copytree(self.folder / "shot", moved)
        nuke.scriptClear()
        nuke.scriptOpen(str(moved / "selftest.nk"))
        self.node = nuke.toNode(name)
        read = adapter._inner(self.node, "VeraResult")["file"]
        evaluated = read.evaluate() if isinstance(read, nuke.EvalString_Knob) else str(read.value())
        ok = (
            stored.startswith("[file dirname [value root.name]]/")
            and evaluated.startswith(moved.as_posix())
            and adapter._text(self.node, "status").startswith(f"cached result of job {self.job}")
            and self.node["take"].value() == "2"
        )
        return ("PASS" if ok else "FAIL"), f"stored {stored!r}, after the move {evaluated!r}"

    def _bake(self) -> Outcome:
        baked = adapter.bake_layers(self.node)
        if set(baked) != {"edit", "matte", "merge", "copy"}:
            return "FAIL", adapter._text(self.node, "status")
        # edit over source: plate * (1 - edit.alpha) + edit.red, with take 2's edit.red 0.375 and edit.alpha 0.25.
        red = _sample(baked["copy"], "rgba.red", 1, 1)
        expected = _PLATE[0] * (1 - 0.25) + 0.375
        ok = abs(red - expected) < 1e-3 and _sample(baked["copy"], "matte.alpha", 1, 1) == 0.25
        return (
            "PASS" if ok else "FAIL"
        ), f"{', '.join(n.name() for n in baked.values())}; red {red} (expected {expected})"

    def _errors(self) -> Outcome:
        lonely = adapter.create_node(self.engine or "127.0.0.1:1", connect_timeout=0.2)
        lonely.setInput(0, None)
        button = lonely["generate"]
        assert isinstance(button, nuke.Script_Knob)
        button.execute()  # as the artist's click: the button reports, it does not raise
        status = adapter._text(lonely, "status")
        adapter.cancel(lonely)
        nuke.delete(lonely)
        ok = status.startswith("error: src: nothing is connected") or status.startswith("error: Cannot reach")
        return ("PASS" if ok else "FAIL"), repr(status)

    def _engine_job(self) -> None:
        node = self.node
        adapter.connect(node, quiet=True)
        node["prompt"].setValue("add a red ball")
        node["steps"].setValue(1)
        if node.knob("takes") is not None:
            node["takes"].setValue(2)
        if not nuke.GUI:
            self._job_done(None, adapter.generate_now(node))
            return
        # As the artist's click: the node's Generate button, a worker thread that renders the input in chunks on
        # the main thread (executeInMainThreadWithResult), a ProgressTask, results handed back with
        # executeInMainThread. A watcher waits for that worker, then reads the node on the main thread.
        button = node["generate"]
        assert isinstance(button, nuke.Script_Knob)
        button.execute()
        run = adapter._RUNS.get(node.fullName())
        if run is None or run.thread is None:
            self._job_done(None, adapter._text(node, "status"))
            return
        worker = run.thread

        def watch() -> None:
            worker.join()
            # Knobs are read on the main thread only (Nuke's threading rule): _job_done reads the status there.
            nuke.executeInMainThread(self._job_done, (None, "", worker.name))

        threading.Thread(target=watch, name="vera-selftest-watch", daemon=True).start()

    def _job_done(self, result: Any, text: str, worker: str = "") -> None:
        def outcome() -> Outcome:
            # On the main thread, after the worker's own hand-back (queued before it ended) has run.
            text_now = adapter._text(self.node, "status") if worker else text
            if not text_now.startswith("done: "):
                return "FAIL", text_now
            channels = self.node.channels()
            ok = "edit.red" in channels and "matte.alpha" in channels
            where = f"; Generate button, worker thread {worker!r}" if worker else "; on this thread (nuke -t)"
            return ("PASS" if ok else "FAIL"), f"{text_now}{where}; output channels {sorted(channels)}"

        self.check("engine job", outcome)
        self._finish()


# The self-test main() ran last: in a GUI session its engine job's lines arrive after main() returns (``done``).
last_run: SelfTest | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """``nuke -t vera_selftest.py [--engine HOST:PORT] [--folder DIR]``: prints the report; returns the number of
    failed checks (0: all passed)."""
    parser = argparse.ArgumentParser(prog="vera_selftest.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine",
        default=os.environ.get("VERA_ENGINE", ""),
        metavar="HOST:PORT",
        help="also run one real job on this engine (default: $VERA_ENGINE; in the GUI the only way to give it)",
    )
    parser.add_argument("--folder", type=Path, help="where the self-test writes (default: a new temp folder)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    global last_run
    test = last_run = SelfTest(args.engine, args.folder)
    test.run()
    if not nuke.GUI:  # in a GUI session the job's lines arrive later, on the main thread
        test.done.wait()
    return test.failures
