"""The "Vera Edit" UIManager window and the thin Resolve menu script, on the fake Resolve and UIManager, against
a real engine (pass-through runner) on loopback."""

from __future__ import annotations

import re
import runpy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.resolve_fake import FakeBmd, FakeDispatcher, FakeFusion, FakeResolve, FakeUI
from vera_engine.service import Engine, create_server
from vera_engine.service.testing import PassThroughRunner
from vera_plugin.hosts.resolve import window as window_module
from vera_plugin.hosts.resolve.window import TOP_CLIP, WINDOW_ID, VeraEditWindow

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
T0 = 86400


@pytest.fixture
def address(passthrough_engine: str) -> str:
    return passthrough_engine


def _resolve(tmp_path: Path) -> FakeResolve:
    app = FakeResolve()
    plate = app.media_pool.add_exr_sequence(tmp_path / "media", "plate", 1001, 1010)
    movie = app.media_pool.add_movie("/media/interview.mov", 300)
    app.timeline.add_item(plate, track=1, start=T0 + 48, duration=4, left_offset=2)
    app.timeline.add_item(movie, track=1, start=T0 + 100, duration=3, left_offset=10)
    app.timeline.add_item(movie, track=2, start=T0 + 100, duration=3, left_offset=50)
    app.timeline.playhead = T0 + 50
    return app


def _window(tmp_path: Path, app: FakeResolve, address: str) -> tuple[VeraEditWindow, FakeDispatcher]:
    ui = FakeUI()
    dispatcher = FakeDispatcher(ui)
    window = VeraEditWindow(ui, dispatcher, app, address=address, work_dir=tmp_path / "cache")
    window.connect()
    window.show()
    return window, dispatcher


def _run_until_done(window: VeraEditWindow) -> None:
    deadline = time.monotonic() + 60
    while window.items["Cancel"].Enabled and time.monotonic() < deadline:
        window.tick()
        time.sleep(0.02)
    assert not window.items["Cancel"].Enabled, window.items["Log"].PlainText


def test_window_builds_its_options_from_the_engine_schema(tmp_path: Path, address: str) -> None:
    window, dispatcher = _window(tmp_path, _resolve(tmp_path), address)
    items = window.items
    assert dispatcher.windows[-1].props["ID"] == WINDOW_ID and dispatcher.windows[-1].shown
    assert items["Engine"].Text == address and items["Model"].items == ["passthrough"]
    assert items["Track"].items == [TOP_CLIP, "V1", "V2"]
    assert items["opt_prompt"].kind == "TextEdit"
    assert items["opt_task"].items == ["object_addition", "background_change"]
    assert items["opt_steps"].kind == "SpinBox" and items["opt_steps"].Value == 3
    assert items["opt_steps"].Maximum == 200
    assert items["opt_guidance"].kind == "DoubleSpinBox"
    assert items["opt_seed"].kind == "LineEdit" and items["opt_seed"].PlaceholderText == "random"
    assert items["opt_hdr"].kind == "CheckBox"
    assert items["opt_colorspace"].items == ["ACEScg", "Linear Rec.709 (sRGB)"]
    assert items["opt_colorspace"].CurrentText == "ACEScg"
    assert "Connected to " + address in items["Log"].PlainText


def test_generate_from_the_window_places_the_results(tmp_path: Path, address: str) -> None:
    app = _resolve(tmp_path)
    window, _ = _window(tmp_path, app, address)
    items = window.items

    window.window.On.Generate.Clicked({})
    assert "Error: prompt: is empty" in items["Log"].PlainText and items["Generate"].Enabled

    items["opt_prompt"].PlainText = "add a paper boat"
    items["opt_steps"].Value = 1
    items["opt_seed"].Text = "12"
    window.window.On.Generate.Clicked({})
    assert items["Cancel"].Enabled and not items["Generate"].Enabled
    _run_until_done(window)
    log = items["Log"].PlainText
    assert "Clip: plate.[1001-1010].exr on V1 at 01:00:02:00, 4 frames" in log
    assert "Placed 4 frames on V3 at 01:00:02:00 (bin 'Vera')" in log, log
    assert items["Progress"].Text.endswith("100% Done")
    job = window.client.list_jobs()[-1]
    assert list(job.header.frames) == [1003, 1004, 1005, 1006] and job.header.seed == 12
    assert job.header.steps == 1 and job.header.model == "passthrough"

    # The movie on V1 (hidden under V2's clip): picked by track, rendered through the queue by the timer.
    app.timeline.playhead = T0 + 101
    items["Track"].CurrentIndex = items["Track"].items.index("V1")
    window.window.On.Generate.Clicked({})
    assert window.render is not None  # the render runs on the timer, not blocking the window
    _run_until_done(window)
    assert "Placed 3 frames on V4 at 01:00:04:04" in items["Log"].PlainText, items["Log"].PlainText
    assert list(window.client.list_jobs()[-1].header.frames) == [T0 + 100, T0 + 101, T0 + 102]
    assert app.timeline.enabled == [True, True, True, True]

    window.window.On[WINDOW_ID].Close({})
    assert window.dispatcher.exited


def test_errors_and_an_unreachable_engine_land_in_the_log(tmp_path: Path, address: str) -> None:
    app = _resolve(tmp_path)
    app.timeline.playhead = T0 + 10  # nothing there
    window, _ = _window(tmp_path, app, address)
    window.items["opt_prompt"].PlainText = "x"
    window.window.On.Generate.Clicked({})
    assert "Error: no video clip under the playhead (01:00:00:10)" in window.items["Log"].PlainText
    assert window.items["Generate"].Enabled

    window.items["Engine"].Text = "127.0.0.1:1"
    window.window.On.Connect.Clicked({})
    assert "Cannot reach the Vera engine at 127.0.0.1:1" in window.items["Log"].PlainText
    window.window.On.Generate.Clicked({})
    assert "Error: not connected to an engine" in window.items["Log"].PlainText


def test_cancel_stops_the_render(tmp_path: Path, address: str) -> None:
    app = _resolve(tmp_path)
    app.timeline.playhead = T0 + 101
    window, _ = _window(tmp_path, app, address)
    window.items["opt_prompt"].PlainText = "x"
    window.items["Track"].CurrentIndex = 1  # V1
    window.window.On.Generate.Clicked({})
    window.tick()
    window.window.On.Cancel.Clicked({})
    window.tick()
    assert "Cancelled: render stopped" in window.items["Log"].PlainText
    assert window.items["Generate"].Enabled and app.project.rendering == []
    assert app.timeline.enabled == [True, True] and app.timeline.GetTrackCount("video") == 2


def test_the_menu_script_opens_the_window(
    tmp_path: Path, address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERA_ENGINE", address)
    # The artist closes the window a moment after it opens (RunLoop runs until then).
    fusion, bmd = FakeFusion(), FakeBmd([(0.3, lambda d: d.windows[-1].On[WINDOW_ID].Close({}))])
    runpy.run_path(
        str(REPO / "resolve_scripts" / "Utility" / "Vera Edit.py"),
        init_globals={"resolve": _resolve(tmp_path), "fusion": fusion, "bmd": bmd},
    )
    (dispatcher,) = bmd.dispatchers
    assert dispatcher.loops == 1 and dispatcher.ui is fusion.UIManager
    window = dispatcher.windows[-1]
    assert window.GetItems()["Model"].items == ["passthrough"]
    timer = fusion.UIManager.timers[0]
    assert timer.Interval == 200 and timer.fired >= 1 and not dispatcher.timed_out
    assert callable(dispatcher.On["VeraEditPoll"].Timeout) and callable(dispatcher.On.Timeout)


def test_resolve_modules_need_only_grpcio_and_protobuf(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys
    import textwrap

    from tests.test_client import _isolated_site
    from vera_engine.imaging.exr import write_layered_exr

    result = write_layered_exr(tmp_path / "vera_edit.0001.exr", np.zeros((16, 16, 4), np.float32),
                               np.zeros((16, 16, 4), np.float32), np.ones((16, 16), np.float32))  # fmt: skip
    site = _isolated_site(tmp_path)
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        sys.path[:0] = [{str(site)!r}]

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"numpy", "torch", "OpenImageIO", "vera_engine", "PySide6"}}:
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Block())
        from vera_plugin.hosts import resolve as vera_resolve
        from vera_plugin.hosts.resolve import timeline, window as resolve_window
        from vera_plugin.hosts.resolve.matte import write_mattes

        print(json.dumps({{
            "tc": timeline.timecode_to_frame("01:00:00:00", 24),
            "seq": timeline.parse_sequence_path("/s/p.[1001-1002].exr").pattern,
            "window": resolve_window.WINDOW_ID,
            "mattes": write_mattes([{str(result)!r}], {str(tmp_path / "matte")!r}),  # no numpy: no mattes
            "heavy": sorted(m for m in ("numpy", "torch", "OpenImageIO", "vera_engine") if m in sys.modules),
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tc": 86400, "seq": "/s/p.%04d.exr", "window": "VeraEdit", "mattes": None, "heavy": []}


def test_cancel_cancels_the_engine_job(tmp_path: Path) -> None:
    runner = PassThroughRunner(step_seconds=0.5, gate_step=1)
    engine = Engine(tmp_path / "spool", runner)
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    try:
        app = _resolve(tmp_path)
        window, _ = _window(tmp_path, app, f"127.0.0.1:{port}")
        window.items["opt_prompt"].PlainText = "x"
        window.window.On.Generate.Clicked({})
        assert runner.at_gate.wait(30)  # the job is running, held at step 1
        while not window.job_id:
            window.tick()
            time.sleep(0.01)
        runner.gate.set()  # two slow steps remain
        window.window.On.Cancel.Clicked({})
        _run_until_done(window)
        log = window.items["Log"].PlainText
        assert "Cancelling..." in log and re.search(r"Cancelled: (cancelled )?job", log), log
        assert window.client.status(window.client.list_jobs()[-1].job_id).state == 5  # CANCELLED
        assert app.timeline.GetTrackCount("video") == 2  # nothing placed
    finally:
        runner.gate.set()
        server.stop(0).wait()
        engine.stop()


def _broken_media_pool(window: VeraEditWindow, app: FakeResolve, monkeypatch: pytest.MonkeyPatch) -> None:
    app.project.GetMediaPool = lambda: None  # a Get* call answering None, as Resolve does in odd states


def _truncated_stream(window: VeraEditWindow, app: FakeResolve, monkeypatch: pytest.MonkeyPatch) -> None:
    import zlib

    def damaged(files: Any, out_dir: Any) -> None:
        raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")

    monkeypatch.setattr(window_module, "write_mattes", damaged)


def _missing_key(window: VeraEditWindow, app: FakeResolve, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("channels")

    monkeypatch.setattr(window_module.vera_resolve, "place_takes", broken)


@pytest.mark.parametrize(
    ("breakage", "logged"),
    [
        (_broken_media_pool, "Error: unexpected AttributeError: 'NoneType' object has no attribute"),
        (_truncated_stream, "Error: unexpected error: Error -5 while decompressing data"),
        (_missing_key, "Error: unexpected KeyError: 'channels'"),
    ],
)
def test_any_failure_is_logged_and_the_window_is_ready_again(
    tmp_path: Path, address: str, monkeypatch: pytest.MonkeyPatch, breakage: Any, logged: str
) -> None:
    """Defect 5: whatever goes wrong (a None from a Resolve call, a zlib or KeyError while writing mattes), the
    window logs it and comes back; it is never left busy."""
    app = _resolve(tmp_path)
    window, _ = _window(tmp_path, app, address)
    breakage(window, app, monkeypatch)
    window.items["opt_prompt"].PlainText = "x"
    window.window.On.Generate.Clicked({})
    _run_until_done(window)  # the timer's ticks must not raise into Resolve's event loop
    log = window.items["Log"].PlainText
    assert logged in log and "please report this line" in log, log
    assert window.items["Generate"].Enabled and not window.items["Cancel"].Enabled
    assert window.worker is None and window.render is None


def test_takes_and_handles_from_the_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_nuke import SchemaRunner

    engine = Engine(tmp_path / "spool", SchemaRunner())
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    try:
        app = _resolve(tmp_path)
        window, _ = _window(tmp_path, app, f"127.0.0.1:{port}")
        items = window.items
        items["opt_prompt"].PlainText = "add a kite"
        items["opt_takes"].Value = 2
        items["PlaceTake"].Value = 3
        window.window.On.Generate.Clicked({})
        assert "Error: Place take is 3 but the job makes 2 take(s); choose 1-2" in items["Log"].PlainText
        items["AllTakes"].Checked = True
        items["Handles"].Value = 3
        window.window.On.Generate.Clicked({})
        _run_until_done(window)
        log = items["Log"].PlainText
        assert "Handles: 2 before, 3 after (all the media has)" in log, log
        assert (
            "Placed take 1 4 frames on V4 at 01:00:02:00" in log and "Placed take 2 4 frames on V3" in log
        ), log
        assert "Colour: project colour science davinciYRGB has no per-clip colour space" in log
        assert [p.take for p in window.placements] == [1, 2]
        job = window.client.list_jobs()[-1]
        assert list(job.header.frames) == list(range(1001, 1010)) and job.header.takes == 2
        # A clip rendered from the timeline: the Deliver page is as the artist left it afterwards.
        app.timeline.playhead = T0 + 101
        items["Track"].CurrentIndex = items["Track"].items.index("V1")
        deliver = app.project.deliver_page()
        items["AllTakes"].Checked = False
        items["PlaceTake"].Value = 1
        window.window.On.Generate.Clicked({})
        _run_until_done(window)
        assert "Handles: none for a clip rendered from the timeline" in items["Log"].PlainText
        after = app.project.deliver_page()
        assert after["settings"] == deliver["settings"] and after["format_codec"] == deliver["format_codec"]
        assert after["mode"] == deliver["mode"] and after["marks"] == deliver["marks"]
        assert after["presets"] == [] and after["jobs"] == []
    finally:
        server.stop(0).wait()
        engine.stop()


def test_the_menu_script_names_the_version_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 7: protobuf's VersionError (not an ImportError) must not escape into Resolve's console."""
    import importlib.abc
    import sys

    from google.protobuf.runtime_version import VersionError

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
            if fullname == "vera_plugin.hosts.resolve.window":
                raise VersionError(
                    "Detected incompatible Protobuf Gencode/Runtime versions when loading vera/v1/engine.proto: "
                    "gencode 7.35.1 runtime 6.30.0. Runtime version cannot be older than the linked gencode version."
                )

    monkeypatch.delitem(sys.modules, "vera_plugin.hosts.resolve.window")
    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    runpy.run_path(str(REPO / "resolve_scripts" / "Utility" / "Vera Edit.py"), init_globals={"resolve": None})
    out = capsys.readouterr().out
    assert out.startswith("Vera Edit: cannot load vera_plugin (VersionError: Detected incompatible Protobuf")
    assert (
        "protobuf 6.30.0 is older than the protobuf 7.35.1 Vera Edit's generated code needs: "
        "python3 -m pip install 'protobuf>=7.35.1,<8' for the Python" in out
    )
