"""The "Vera Edit" UIManager window and the thin Resolve menu script, on the fake Resolve and UIManager, against
a real engine (pass-through runner) on loopback."""

from __future__ import annotations

import re
import runpy
import time
from pathlib import Path

import numpy as np
import pytest

from tests.resolve_fake import FakeBmd, FakeDispatcher, FakeFusion, FakeResolve, FakeUI
from vera_engine.service import Engine, create_server
from vera_engine.service.testing import PassThroughRunner
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
    assert "Cannot reach the engine at 127.0.0.1:1" in window.items["Log"].PlainText
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
    fusion, bmd = FakeFusion(), FakeBmd()
    runpy.run_path(
        str(REPO / "resolve_scripts" / "Utility" / "Vera Edit.py"),
        init_globals={"resolve": _resolve(tmp_path), "fusion": fusion, "bmd": bmd},
    )
    (dispatcher,) = bmd.dispatchers
    assert dispatcher.loops == 1 and dispatcher.ui is fusion.UIManager
    window = dispatcher.windows[-1]
    assert window.GetItems()["Model"].items == ["passthrough"]
    assert fusion.UIManager.timers[0].active and fusion.UIManager.timers[0].Interval == 200
    assert callable(dispatcher.On["VeraEditPoll"].Timeout)


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
