"""The self-tests studios run inside the real hosts, run here against the fakes so that they stay working: every
line passes, and every host call the adapters make is exercised at least once (the fakes record the calls made
from outside them; the adapters' calls are read from their source)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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
) -> None:
    import shiboken6

    from vera_plugin.hosts.nuke.selftest import SelfTest

    nk._fake_reset_calls()
    test = SelfTest(vocab_engine.address, tmp_path / "selftest").run()
    nk._fake_process_events(
        until=test.done.is_set, timeout=120
    )  # the job runs as the Generate button runs it
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    try:
        assert lines == test.lines
        assert test.failures == 0, "\n".join(lines)
        assert [line.split()[0] for line in lines] == ["PASS"] * len(lines), "\n".join(lines)
        names = [line.split(":")[0].split(None, 1)[1] for line in lines]
        assert names[-2:] == ["engine job", "summary"] and "menus and pane" in names
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
