"""The Qt panel under pytest-qt (offscreen) against a real engine service on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
pytest.importorskip("pytestqt")

from vera_engine.service.testing import PassThroughRunner  # noqa: E402
from vera_plugin import panel as vera_panel  # noqa: E402
from vera_plugin.client import EngineClient  # noqa: E402
from vera_proto.vera.v1 import engine_pb2 as pb  # noqa: E402

from .test_nuke import InProcessEngine, write_plate  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def gated(tmp_path: Path):
    """An engine whose jobs pause after their first step until the test opens the gate."""
    eng = InProcessEngine(tmp_path / "spool", PassThroughRunner(gate_step=1))
    yield eng
    eng.stop()


@pytest.fixture
def make_panel(qtbot, tmp_path: Path):
    """Panels on an engine address; closed, their calls finished and deleted on the GUI thread after the test."""
    import shiboken6

    panels: list[vera_panel.VeraPanel] = []

    def make(address: str) -> vera_panel.VeraPanel:
        widget = vera_panel.VeraPanel(address=address, poll_ms=100, cache=tmp_path / "cache")
        panels.append(widget)
        widget.resize(760, 620)
        widget.show()
        qtbot.waitUntil(
            lambda: bool(widget.fields) or "unreachable" in widget.engine_status.text(), timeout=10000
        )
        return widget

    yield make
    for widget in panels:
        widget.close()
        widget.wait_idle()
        shiboken6.delete(widget)


def test_options_come_from_the_schema(qtbot, gated: InProcessEngine, make_panel) -> None:
    widget = make_panel(gated.address)
    with EngineClient(gated.address) as client:
        model = client.info().models[0]
    assert widget.model_combo.currentText() == model.name
    assert [f.name for f in widget.fields] == [o.name for o in model.options]
    assert widget.engine_status.text().startswith("● ready: v")
    assert isinstance(widget.editor("prompt"), QtWidgets.QPlainTextEdit)
    assert isinstance(widget.editor("hdr"), QtWidgets.QCheckBox)
    task = widget.editor("task")
    assert [task.itemText(i) for i in range(task.count())] == ["object_addition", "background_change"]
    colours = widget.editor("colorspace")
    assert [colours.itemText(i) for i in range(colours.count())] == ["ACEScg", "Linear Rec.709 (sRGB)"]
    steps = widget.editor("steps")
    assert (steps.value(), steps.minimum(), steps.maximum()) == (3, 1, 200)
    assert widget.editor("guidance").value() == 5.0
    seed = widget.editor("seed")
    before = seed.value()
    button = widget.findChild(QtWidgets.QPushButton, "randomise_seed")
    for _ in range(3):  # three draws below 2**31 all equal to the old seed: practically impossible
        qtbot.mouseClick(button, pytest.importorskip("PySide6.QtCore").Qt.MouseButton.LeftButton)
        if seed.value() != before:
            break
    assert seed.value() != before
    widget.submit()  # no prompt typed: the panel says so, nothing is sent
    assert widget.message.text().startswith("Cannot submit: plate: is empty")
    widget.plate_edit.setText("/x/plate.####.exr")
    widget.frames_edit.setText("1-3")
    widget.submit()
    assert widget.message.text().startswith("Cannot submit: prompt: is empty")


def test_submit_progress_preview_cancel_and_open(
    qtbot, make_panel, gated: InProcessEngine, tmp_path: Path
) -> None:
    widget = make_panel(gated.address)
    opened: list[str] = []
    widget.open_url = lambda url: opened.append(url.toLocalFile())
    widget.plate_edit.setText(write_plate(tmp_path / "plate"))
    widget.frames_edit.setText("1001-1003")
    widget.editor("prompt").setPlainText("add a red ball")
    widget.submit()
    qtbot.waitUntil(lambda: len(widget.jobs) == 1, timeout=10000)
    job = next(iter(widget.jobs))
    qtbot.waitUntil(gated.runner.at_gate.is_set, timeout=10000)
    widget.select_job(job)
    # The watched job shows its progress and the engine's preview thumbnail while it runs.
    qtbot.waitUntil(
        lambda: widget.preview.pixmap() is not None and not widget.preview.pixmap().isNull(), timeout=10000
    )
    assert widget.preview_caption.text() == "frame 1001, step 1"
    assert widget._bars[job].value() > 0
    assert widget.job_list.topLevelItem(0).text(3) == "add a red ball"
    assert widget.job_list.topLevelItem(0).text(4) == "1001-1003"
    widget.cancel_button.click()
    qtbot.waitUntil(
        lambda: gated.engine.cancel_requested(job),
        timeout=10000,
    )
    gated.runner.gate.set()
    qtbot.waitUntil(lambda: widget.jobs[job].state == pb.JOB_STATE_CANCELLED, timeout=10000)
    assert widget.job_list.topLevelItem(0).text(1) == "cancelled"
    assert widget._bars[job].value() < 100
    widget.open_selected()
    assert widget.message.text() == "select a succeeded job to open its results"
    # A second job runs through (the gate is open now); "Open results" fetches it into the cache.
    widget.submit()
    qtbot.waitUntil(
        lambda: (
            len(widget.jobs) == 2
            and all(s.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_CANCELLED) for s in widget.jobs.values())
        ),
        timeout=10000,
    )
    second = next(j for j in widget.jobs if j != job)
    widget.select_job(second)
    widget.open_selected()
    qtbot.waitUntil(lambda: bool(opened), timeout=10000)
    folder = tmp_path / "cache" / second
    assert opened == [str(folder)]
    assert sorted(p.name for p in folder.iterdir()) == [
        "vera_edit.1001.exr",
        "vera_edit.1002.exr",
        "vera_edit.1003.exr",
    ]


def test_a_new_job_is_selected_in_view_with_its_preview_and_counts(
    qtbot, make_panel, gated: InProcessEngine, tmp_path: Path
) -> None:
    # Twelve finished jobs fill more than the list's visible rows.
    plate = write_plate(tmp_path / "plate")
    gated.runner.gate.set()
    with EngineClient(gated.address) as client:
        old = [client.submit_files(plate, [1001], prompt=f"old {i}") for i in range(12)]
        for job in old:
            assert client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    gated.runner.gate.clear()  # the next job stops after its first step, with a preview to show
    widget = make_panel(gated.address)
    widget.resize(760, 520)
    qtbot.waitUntil(lambda: len(widget.jobs) == 12, timeout=10000)
    assert "0 queued, 0 running" in widget.engine_status.text()
    widget.plate_edit.setText(plate)
    widget.frames_edit.setText("1001-1003")
    widget.editor("prompt").setPlainText("add a red ball")
    widget.submit()
    qtbot.waitUntil(lambda: len(widget.jobs) == 13, timeout=10000)
    new = next(job for job in widget.jobs if job not in old)
    # Selected, scrolled into view, its preview shown and the engine line's counts refreshed.
    qtbot.waitUntil(lambda: widget.selected_job() == new, timeout=10000)
    item = widget._items[new]
    assert widget.job_list.viewport().rect().contains(widget.job_list.visualItemRect(item).center())
    qtbot.waitUntil(
        lambda: widget.preview.pixmap() is not None and not widget.preview.pixmap().isNull(), timeout=10000
    )
    assert widget.preview_caption.text() == "frame 1001, step 1"
    qtbot.waitUntil(lambda: "0 queued, 1 running" in widget.engine_status.text(), timeout=10000)
    assert widget.message.text() == f"submitted job {new}"


def test_engine_down_shows_unreachable(make_panel) -> None:
    widget = make_panel("127.0.0.1:1")
    assert widget.engine_status.text().startswith(
        "● unreachable: Cannot reach the Vera engine at 127.0.0.1:1"
    )
    assert not widget.fields
    widget.submit()
    assert widget.message.text() == "Cannot submit: engine: not connected; press Connect"


def test_words_the_model_cannot_read_are_flagged_as_you_type(make_panel, tmp_path: Path) -> None:
    from .test_nuke import SchemaRunner

    eng = InProcessEngine(tmp_path / "spool2", SchemaRunner(vocabulary=("add", "a", "red", "ball", ",")))
    try:
        widget = make_panel(eng.address)
        words = widget.findChild(QtWidgets.QLabel, "prompt_words")
        assert words is not None and words.text() == ""
        widget.editor("prompt").setPlainText("Add a red kite, quickly")  # as if typed: textChanged fires
        assert words.text() == "unknown to this model: kite, quickly"
        widget.editor("prompt").setPlainText("add a red ball")
        assert words.text() == ""
        assert isinstance(
            widget.editor("takes"), QtWidgets.QSpinBox
        )  # the engine's takes option, from its schema
    finally:
        eng.stop()


def test_free_text_models_have_no_word_flags(qtbot, gated: InProcessEngine, make_panel) -> None:
    widget = make_panel(gated.address)
    assert widget.findChild(QtWidgets.QLabel, "prompt_words") is None


def test_main_saves_a_screenshot(tmp_path: Path, gated: InProcessEngine) -> None:
    shot = tmp_path / "panel.png"
    assert vera_panel.main(["--engine", gated.address, "--screenshot", str(shot), "--wait", "0.5"]) == 0
    from PySide6 import QtGui

    image = QtGui.QImage(str(shot))
    assert image.width() >= 700 and image.height() >= 500
