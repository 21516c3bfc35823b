"""The self-tests studios run inside the real hosts, run here against the fakes so that they stay working: every
line passes, and every host call the adapters make is exercised at least once (the fakes record the calls made
from outside them; the adapters' calls are read from their source)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .test_nuke import REPO, InProcessEngine, SchemaRunner, fake_nuke_session

pytestmark = pytest.mark.timeout(180)

FAKES = Path(__file__).resolve().parent / "fakes"
VOCABULARY = ("add", "a", "red", "ball")
# Methods of Python's own types: a call such as ``dict.values()`` is not a host call, whatever the fake names.
_PYTHON_METHODS = set().union(
    *(dir(t) for t in (dict, list, str, set, bytes, Path, threading.Event, threading.Thread, object))
)


def host_calls(source: Path, module: str, fake_methods: set[str]) -> set[str]:
    """The host API an adapter calls: ``module.f(...)`` as ``f``, ``module.nodes.C(...)`` as ``nodes.C``, and
    method calls whose name is a method of the fake host's classes (and not of Python's own types)."""
    calls: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner, name = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and owner.id == module:
            calls.add(name)
        elif (
            isinstance(owner, ast.Attribute)
            and isinstance(owner.value, ast.Name)
            and owner.value.id == module
        ):
            calls.add(f"{owner.attr}.{name}" if owner.attr == "nodes" else name)
        elif name in fake_methods and name not in _PYTHON_METHODS:
            calls.add(name)
    for node in ast.walk(
        ast.parse(source.read_text())
    ):  # the Resolve adapter's optional calls: _call(obj, "Name")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_call":
            name_arg = node.args[1] if len(node.args) > 1 else None
            if isinstance(name_arg, ast.Constant) and name_arg.value in fake_methods:
                calls.add(name_arg.value)
    return calls


def fake_methods(module: ModuleType) -> set[str]:
    """Public method names of the fake module's classes."""
    names: set[str] = set()
    for value in vars(module).values():
        if isinstance(value, type) and value.__module__ == module.__name__:
            names |= {
                a
                for a, m in vars(value).items()
                if (not a.startswith("_") and callable(m)) or isinstance(m, classmethod)
            }
    return names


# ---------------------------------------------------------------------------------------------------------
# Nuke


@pytest.fixture
def nk(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from fake_nuke_session(monkeypatch)


@pytest.fixture
def vocab_engine(tmp_path: Path) -> Iterator[InProcessEngine]:
    eng = InProcessEngine(tmp_path / "spool", SchemaRunner(vocabulary=VOCABULARY))
    yield eng
    eng.stop()


@pytest.fixture
def qt_app() -> Any:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    widgets = pytest.importorskip("PySide6.QtWidgets")
    return widgets.QApplication.instance() or widgets.QApplication([])


def test_nuke_selftest_in_a_gui_session_passes_and_exercises_every_host_call(
    nk: ModuleType,
    vocab_engine: InProcessEngine,
    qt_app: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 25 item 12: the GUI route as a studio runs it, from the Script Editor in a new script (which holds
    Viewer1), the engine given by $VERA_ENGINE; the job runs through the node's Generate button."""
    import runpy

    import shiboken6

    from vera_plugin.hosts.nuke import selftest

    nk._fake_reset_calls()
    assert [n.name() for n in nk.allNodes()] == ["Viewer1"]  # File > New in a GUI session
    monkeypatch.setenv("VERA_ENGINE", vocab_engine.address)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runpy.run_path(str(REPO / "nuke_gizmos" / "vera_selftest.py"))  # what exec(open(...).read()) runs
    test = selftest.last_run
    assert test is not None
    nk._fake_process_events(until=test.done.is_set, timeout=120)  # the job's lines arrive on the main thread
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    try:
        assert lines == test.lines
        assert test.failures == 0, "\n".join(lines)
        assert [line.split()[0] for line in lines] == ["PASS"] * len(lines), "\n".join(lines)
        names = [line.split(":")[0].split(None, 1)[1] for line in lines]
        assert names[-2:] == ["engine job", "summary"] and "menus and pane" in names
        assert "Generate button, worker thread 'vera-" in lines[-2], lines[-2]
    finally:
        for widget in getattr(test.pane, "widgets", []):
            widget.close()
            widget.wait_idle()
            shiboken6.delete(widget)
    used = host_calls(REPO / "plugin/vera_plugin/hosts/nuke/adapter.py", "nuke", fake_methods(nk))
    missing = used - nk._fake_calls()
    assert not missing, f"host calls of the Nuke adapter the self-test never made: {sorted(missing)}"
    assert {
        "executeInMainThreadWithResult",
        "executeInMainThread",
        "createNode",
        "getText",
        "thisKnob",
    } <= used


def test_nuke_selftest_runs_as_nuke_t_does_in_a_terminal(
    vocab_engine: InProcessEngine, tmp_path: Path
) -> None:
    """``nuke -t nuke_gizmos/vera_selftest.py --engine ADDR``: a terminal session (no GUI, no menus), its own
    process; the exit status is the number of failed checks."""
    script = REPO / "nuke_gizmos" / "vera_selftest.py"
    launcher = (
        f"import runpy, sys; sys.path.insert(0, {str(FAKES)!r}); import nuke; nuke.GUI = False; "
        f"sys.argv = [{str(script)!r}, '--engine', {vocab_engine.address!r}, '--folder', {str(tmp_path / 'st')!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VERA_CACHE")}
    done = subprocess.run(
        [sys.executable, "-c", launcher], capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path
    )
    lines = [line for line in done.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = {line.split(":")[0].split(None, 1)[1]: line.split()[0] for line in lines}
    assert verdicts.pop("menus and pane") == "SKIP"  # no menus in nuke -t
    assert set(verdicts.values()) == {"PASS"} and "engine job" in verdicts, done.stdout


# ---------------------------------------------------------------------------------------------------------
# Resolve


def _resolve_model_methods() -> set[str]:
    from tests import resolve_fake

    classes = (
        resolve_fake.FakeMediaPoolItem, resolve_fake.FakeFolder, resolve_fake.FakeTimelineItem,
        resolve_fake.FakeTimeline, resolve_fake.FakeMediaPool, resolve_fake.FakeMediaStorage,
        resolve_fake.FakeProject, resolve_fake.FakeProjectManager, resolve_fake.FakeResolve,
    )  # fmt: skip
    return {name for cls in classes for name in vars(cls) if name[:1].isupper()}


def test_resolve_selftest_from_the_workspace_menu_passes_and_exercises_every_host_call(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    passthrough_engine: str,
) -> None:
    """Issue 25 items 13 and 14: started on the Fusion page (no playhead), with an engine in $VERA_ENGINE, the
    self-test also drives the window (timer, worker, placing, closing) inside the fake RunLoop."""
    from tests.resolve_fake import CALLS, FakeBmd, FakeFusion, FakeResolve

    app = FakeResolve(page="fusion")
    yours = app.project
    CALLS.clear()
    monkeypatch.setenv("VERA_ENGINE", passthrough_engine)
    runpy_globals = {"resolve": app, "fusion": FakeFusion(), "bmd": FakeBmd()}
    import runpy

    runpy.run_path(
        str(REPO / "resolve_scripts" / "Utility" / "Vera Self-test.py"), init_globals=runpy_globals
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert lines and all(line.startswith("PASS") for line in lines), "\n".join(lines)
    names = [line.split(":")[0].split(None, 1)[1] for line in lines]
    assert names[-2:] == ["scratch project deleted", "summary"] and "render 3 frames" in names
    window = next(line for line in lines if line.startswith("PASS  Vera Edit window:"))
    assert "outcome ['placed']" in window and "timer ticks" in window, window
    assert app.project is yours and app.manager.GetProjectListInCurrentFolder() == [yours.GetName()]
    methods = _resolve_model_methods()
    used = set()
    for module in ("adapter.py", "window.py"):
        used |= host_calls(REPO / "plugin/vera_plugin/hosts/resolve" / module, "", methods)
    assert {
        "AppendToTimeline",
        "GetRenderCodecs",
        "SaveAsNewRenderPreset",
        "GetMarkInOut",
        "SetClipProperty",
    } <= used
    missing = used - CALLS
    assert not missing, f"host calls of the Resolve adapter the self-test never made: {sorted(missing)}"


def test_resolve_selftest_as_an_external_script(tmp_path: Path) -> None:
    """Resolve Studio's external scripting: ``python3 "Vera Self-test.py"`` finds Resolve through
    DaVinciResolveScript (here a stand-in module answering with the fake)."""
    (tmp_path / "DaVinciResolveScript.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.resolve_fake import FakeResolve\n"
        "_app = FakeResolve()\n"
        "def scriptapp(name):\n"
        "    return _app if name == 'Resolve' else None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERA_ENGINE"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    script = REPO / "resolve_scripts" / "Utility" / "Vera Self-test.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "files")],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    # Outside Resolve there is no UIManager window to drive (and no engine given here): that check skips.
    skipped = [line for line in lines if line.startswith("SKIP")]
    assert [line.split(":")[0] for line in skipped] == ["SKIP  Vera Edit window"], done.stdout
    assert done.returncode == 0 and lines and all(line[:4] in ("PASS", "SKIP") for line in lines), (
        done.stdout + done.stderr
    )
    assert (tmp_path / "files" / "media" / "plate.1001.exr").is_file()
