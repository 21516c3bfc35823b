"""The Vera Edit panel (PySide6): engine and its status, options from the schema (words a word-level model
cannot read flagged under the prompt as you type), jobs with progress bars, a live preview, cancel and open
results. Docked in Nuke (``nukescripts.panels.registerWidgetAsPanel``
with ``vera_plugin.panel.VeraPanel``) or standalone as ``vera panel`` (:func:`main`).

Every engine call runs on a Python thread; results come back to the GUI thread through a queue that a Qt
timer drains (worker threads never call Qt), so the panel never freezes on a slow or dead engine. Needs PySide6 (the ``ui`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import queue
import random
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import shiboken6
from PySide6 import QtCore, QtGui, QtWidgets

from vera_plugin.cache import cache_root, job_dir
from vera_plugin.client import (
    FINAL_STATES,
    EngineClient,
    EngineError,
    format_frames,
    parse_frames,
    state_name,
)
from vera_plugin.connection import connection_settings, engine_address
from vera_plugin.generate import GenerateError, describe_engine_error, follow_job, status_text
from vera_plugin.schema_ui import (
    AUTO_COLORSPACE,
    Field,
    OptionsError,
    fields_for_model,
    find_model,
    job_options,
    vocabulary_note,
)
from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = ["MAX_PREVIEW_SIDE", "VeraPanel", "build_parser", "main", "preview_problem"]

_INT32 = 2**31 - 1
_PREVIEW_SIZE = 256


# The largest preview the panel draws, per side: the engine sends small ones (a few hundred pixels).
MAX_PREVIEW_SIDE = 4096


def preview_problem(preview: pb.Preview) -> str:
    """Why ``preview`` cannot be drawn (``""`` when it can): a size over :data:`MAX_PREVIEW_SIDE` or a byte
    length other than width x height x 3 (RGB8)."""
    width, height = preview.width, preview.height
    if not (0 < width <= MAX_PREVIEW_SIDE and 0 < height <= MAX_PREVIEW_SIDE):
        return f"{width}x{height} is outside 1..{MAX_PREVIEW_SIDE} pixels a side"
    if len(preview.rgb8) != width * height * 3:
        return f"{len(preview.rgb8)} bytes for a {width}x{height} RGB8 picture; expected {width * height * 3}"
    return ""


class _QuietSink:
    """A follower with nowhere to show progress (the list shows each status) and nothing to cancel."""

    def update(self, fraction: float, message: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class VeraPanel(QtWidgets.QWidget):
    """The panel. ``address``: the engine (default ``$VERA_ENGINE``); ``poll_ms``: how often the job list
    refreshes; ``cache``: where "open results" downloads to (default ``$VERA_CACHE`` or the temp folder);
    ``working_space``: the host's working colour space, offered as the plate colour space when given.
    ``open_url`` opens a folder (``QDesktopServices.openUrl``; tests replace it)."""

    def __init__(
        self,
        parent: QtWidgets.QWidget | None = None,
        *,
        address: str | None = None,
        poll_ms: int = 1000,
        cache: str | os.PathLike[str] | None = None,
        connect: bool = True,
        working_space: str = "",
    ) -> None:
        super().__init__(parent)
        self.working_space = working_space
        self.setObjectName("VeraPanel")
        self.setWindowTitle("Vera Edit")
        self.cache = Path(cache) if cache is not None else cache_root("")
        self.open_url: Callable[[QtCore.QUrl], Any] = QtGui.QDesktopServices.openUrl
        self.fields: list[Field] = []
        self.info: pb.EngineInfo | None = None
        self.jobs: dict[str, pb.JobStatus] = {}
        self._items: dict[str, QtWidgets.QTreeWidgetItem] = {}
        self._bars: dict[str, QtWidgets.QProgressBar] = {}
        self._editors: dict[str, QtWidgets.QWidget] = {}
        self.prompt_words: QtWidgets.QLabel | None = None
        self._watching = ""
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._refreshing = threading.Event()
        self._client_lock = threading.Lock()
        self._engine_client: EngineClient | None = None
        # Worker threads never touch Qt: they queue (handler, args) and a GUI-thread timer runs them.
        self._inbox: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._handlers: dict[str, Callable[..., None]] = {
            "info": self._on_info,
            "jobs": self._on_jobs,
            "status": self._on_status,
            "error": self._on_error,
            "message": self._show_message,
            "fetched": self._on_fetched,
            "submitted": self._on_submitted,
            "counts": self._on_counts,
        }
        self._pump = QtCore.QTimer(self)
        self._pump.setInterval(30)
        self._pump.timeout.connect(self._deliver)
        self._pump.start()
        self._build(engine_address(address))
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(poll_ms)
        self._timer.timeout.connect(self.refresh_jobs)
        if connect:
            self.connect_engine()

    # -- layout --------------------------------------------------------------------------------------------

    def _build(self, address: str) -> None:
        layout = QtWidgets.QVBoxLayout(self)
        engine_row = QtWidgets.QHBoxLayout()
        self.address_edit = QtWidgets.QLineEdit(address)
        self.address_edit.setToolTip("host:port of a Vera engine (`vera-engine serve`)")
        self.connect_button = QtWidgets.QPushButton("Connect")
        self.connect_button.clicked.connect(self.connect_engine)
        engine_row.addWidget(QtWidgets.QLabel("Engine"))
        engine_row.addWidget(self.address_edit, 1)
        engine_row.addWidget(self.connect_button)
        layout.addLayout(engine_row)
        self.engine_status = QtWidgets.QLabel("not connected")
        self.engine_status.setWordWrap(True)
        layout.addWidget(self.engine_status)

        split = QtWidgets.QHBoxLayout()
        form_box = QtWidgets.QGroupBox("Edit")
        self.form = QtWidgets.QFormLayout(form_box)
        self.model_combo = QtWidgets.QComboBox()
        self.model_combo.currentTextChanged.connect(self._model_changed)
        self.form.addRow("Model", self.model_combo)
        self.plate_edit = QtWidgets.QLineEdit()
        self.plate_edit.setPlaceholderText("/shots/sh010/plate.####.exr")
        self.frames_edit = QtWidgets.QLineEdit()
        self.frames_edit.setPlaceholderText("1001-1100")
        self.mask_edit = QtWidgets.QLineEdit()
        self.mask_edit.setPlaceholderText("optional: /shots/sh010/mask.####.exr")
        self.form.addRow("Plate", self.plate_edit)
        self.form.addRow("Frames", self.frames_edit)
        self.form.addRow("Mask", self.mask_edit)
        self._fixed_rows = self.form.rowCount()
        self.submit_button = QtWidgets.QPushButton("Generate")
        self.submit_button.clicked.connect(self.submit)
        split.addWidget(form_box, 3)

        right = QtWidgets.QVBoxLayout()
        self.preview = QtWidgets.QLabel("no preview")
        self.preview.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.preview.setFixedSize(_PREVIEW_SIZE, _PREVIEW_SIZE * 9 // 16)
        self.preview.setStyleSheet("background: #202020; color: #808080;")
        right.addWidget(self.preview)
        self.preview_caption = QtWidgets.QLabel("")
        right.addWidget(self.preview_caption)
        right.addStretch(1)
        split.addLayout(right, 2)
        layout.addLayout(split)
        layout.addWidget(self.submit_button)

        self.job_list = QtWidgets.QTreeWidget()
        self.job_list.setHeaderLabels(["Job", "State", "Progress", "Prompt", "Frames"])
        self.job_list.setRootIsDecorated(False)
        self.job_list.setMinimumHeight(140)
        for column, width in enumerate((110, 210, 110, 220)):
            self.job_list.setColumnWidth(column, width)
        self.job_list.itemSelectionChanged.connect(self._selection_changed)
        layout.addWidget(self.job_list, 1)
        buttons = QtWidgets.QHBoxLayout()
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_selected)
        self.open_button = QtWidgets.QPushButton("Open results")
        self.open_button.clicked.connect(self.open_selected)
        buttons.addStretch(1)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.open_button)
        layout.addLayout(buttons)
        self.message = QtWidgets.QLabel("")
        self.message.setWordWrap(True)
        layout.addWidget(self.message)

    def _editor(self, field: Field) -> QtWidgets.QWidget:
        widget: QtWidgets.QWidget
        if field.kind == "text":
            text = QtWidgets.QPlainTextEdit(str(field.default or ""))
            text.setFixedHeight(54)
            widget = text
        elif field.kind == "string":
            widget = QtWidgets.QLineEdit(str(field.default or ""))
        elif field.kind == "bool":
            check = QtWidgets.QCheckBox()
            check.setChecked(bool(field.default))
            widget = check
        elif field.kind == "choice":
            combo = QtWidgets.QComboBox()
            combo.addItems(list(field.choices))
            combo.setCurrentText(str(field.default or ""))
            widget = combo
        elif field.kind == "int":
            spin = QtWidgets.QSpinBox()
            low = int(field.minimum) if field.minimum is not None else -_INT32
            high = min(int(field.maximum), _INT32) if field.maximum is not None else _INT32
            spin.setRange(max(low, -_INT32), high)
            spin.setValue(
                int(field.default) if field.default is not None else random.randint(max(low, 0), high)
            )
            widget = spin
        else:
            dspin = QtWidgets.QDoubleSpinBox()
            dspin.setDecimals(3)
            dspin.setRange(
                field.minimum if field.minimum is not None else -1e9,
                field.maximum if field.maximum is not None else 1e9,
            )
            dspin.setValue(float(field.default or 0.0))
            widget = dspin
        widget.setToolTip(field.help)
        widget.setObjectName(f"option_{field.name}")
        return widget

    def _build_options(self, fields: list[Field]) -> None:
        if not self.working_space:
            # Standalone there is no script working space to follow: the engine's own default comes first.
            fields = [
                dataclasses.replace(f, choices=f.choices[1:], default=f.choices[1])
                if f.choices[:1] == (AUTO_COLORSPACE,)
                else f
                for f in fields
            ]
        while self.form.rowCount() > self._fixed_rows:
            self.form.removeRow(self._fixed_rows)
        self._editors = {}
        self.prompt_words = None
        model = self._model()
        for field in fields:
            editor = self._editor(field)
            self._editors[field.name] = editor
            if field.randomise:
                row = QtWidgets.QWidget()
                box = QtWidgets.QHBoxLayout(row)
                box.setContentsMargins(0, 0, 0, 0)
                box.addWidget(editor, 1)
                button = QtWidgets.QPushButton("randomise")
                button.setObjectName(f"randomise_{field.name}")
                button.clicked.connect(
                    lambda _=False, e=editor: e.setValue(random.randint(e.minimum(), e.maximum()))
                )
                box.addWidget(button)
                self.form.addRow(field.label, row)
            else:
                self.form.addRow(field.label, editor)
            if field.name == "prompt" and model is not None and model.vocabulary:
                # Words a word-level checkpoint cannot read, flagged under the prompt as the artist types.
                self.prompt_words = QtWidgets.QLabel("")
                self.prompt_words.setObjectName("prompt_words")
                self.prompt_words.setStyleSheet("color: #c90;")
                self.prompt_words.setWordWrap(True)
                self.form.addRow("", self.prompt_words)
                assert isinstance(editor, QtWidgets.QPlainTextEdit)
                editor.textChanged.connect(self._flag_words)
        self.fields = fields
        self._flag_words()

    def _model(self) -> pb.ModelInfo | None:
        if self.info is None or not self.info.models:
            return None
        name = self.model_combo.currentText()
        return next((m for m in self.info.models if m.name == name), None)

    def _flag_words(self) -> None:
        model, prompt = self._model(), self._editors.get("prompt")
        if self.prompt_words is None or not shiboken6.isValid(self.prompt_words):
            return
        text = prompt.toPlainText() if isinstance(prompt, QtWidgets.QPlainTextEdit) else ""
        self.prompt_words.setText(vocabulary_note(text, model) if model is not None else "")

    def values(self) -> dict[str, Any]:
        """The option values as typed (by option name)."""
        out: dict[str, Any] = {}
        for name, editor in self._editors.items():
            if isinstance(editor, QtWidgets.QPlainTextEdit):
                out[name] = editor.toPlainText()
            elif isinstance(editor, QtWidgets.QLineEdit):
                out[name] = editor.text()
            elif isinstance(editor, QtWidgets.QCheckBox):
                out[name] = editor.isChecked()
            elif isinstance(editor, QtWidgets.QComboBox):
                out[name] = editor.currentText()
            elif isinstance(editor, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
                out[name] = editor.value()
        return out

    def editor(self, name: str) -> QtWidgets.QWidget:
        """The widget editing option ``name``."""
        return self._editors[name]

    # -- threads -------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The engine address typed in the panel."""
        return self.address_edit.text().strip()

    def _client(self, address: str) -> EngineClient:
        # One channel per address, shared by the background calls (EngineClient is thread-safe).
        with self._client_lock:
            if self._closing.is_set():
                raise EngineError("CANCELLED", "the panel is closed", address)
            if self._engine_client is None or self._engine_client.address != address:
                if self._engine_client is not None:
                    self._engine_client.close()
                # The typed address, and the token and TLS settings every Vera client shares (vera_plugin.connection).
                self._engine_client = connection_settings(address).connect(timeout=10)
            return self._engine_client

    def _background(
        self, work: Callable[[EngineClient], None], done: Callable[[], None] | None = None
    ) -> None:
        address = self.address

        def run() -> None:
            try:
                work(self._client(address))
            except EngineError as exc:
                self._emit("error", describe_engine_error(exc, address))
            except (OSError, ValueError, TypeError) as exc:
                self._emit("error", str(exc))
            except Exception as exc:  # a bug: shown in the panel rather than lost in a thread
                self._emit("error", f"unexpected {type(exc).__name__}: {exc}; please report this")
            finally:
                if done is not None:
                    done()

        thread = threading.Thread(target=run, daemon=True, name="vera-panel")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _emit(self, kind: str, *args: Any) -> None:
        # Called from worker threads: once the panel is closing nothing more is delivered to it.
        if not self._closing.is_set():
            self._inbox.put((self._handlers[kind], args))

    def _deliver(self) -> None:
        while True:
            try:
                handler, args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if self._closing.is_set():
                return
            handler(*args)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait for the panel's background calls (tests and shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout)

    # -- engine --------------------------------------------------------------------------------------------

    def connect_engine(self) -> None:
        """Ask the engine for its models (rebuilds the options) and start refreshing the job list."""
        self.engine_status.setText(f"connecting to {self.address} ...")
        self._background(lambda client: self._emit("info", client.info()))

    def _on_info(self, info: pb.EngineInfo) -> None:
        self.info = info
        current = self.model_combo.currentText()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems([m.name for m in info.models])
        self.model_combo.blockSignals(False)
        try:
            model = find_model(info, current if current in [m.name for m in info.models] else "")
        except OptionsError as exc:
            self._on_error(str(exc))
            return
        self.model_combo.setCurrentText(model.name)
        self._build_options(fields_for_model(model))
        self._on_counts(info)
        self._timer.start()
        self.refresh_jobs()

    def _on_counts(self, info: pb.EngineInfo) -> None:
        """The engine line: state, version, device and the queue's counts (refreshed with the job list)."""
        if self.info is not None and info is not self.info:
            self.info.queue_length, self.info.running = info.queue_length, info.running
            self.info.model_loaded = info.model_loaded
        state = "ready" if info.model_loaded else "loading its model"
        self.engine_status.setText(
            f"● {state}: v{info.engine_version} on {info.device.name} ({info.device.kind}), "
            f"{info.queue_length} queued, {info.running} running"
        )
        self.engine_status.setStyleSheet("color: #3a3;")

    def _model_changed(self, name: str) -> None:
        if self.info is not None and name:
            self._build_options(fields_for_model(find_model(self.info, name)))

    def _on_error(self, text: str) -> None:
        if text.startswith("Cannot reach"):
            self.engine_status.setText(f"● unreachable: {text}")
            self.engine_status.setStyleSheet("color: #c33;")
            self._timer.stop()
        self._show_message(text)

    def _show_message(self, text: str) -> None:
        self.message.setText(text)

    # -- jobs ----------------------------------------------------------------------------------------------

    def refresh_jobs(self) -> None:
        """Refresh the job list from the engine (ListJobs, newest 50)."""
        if self._refreshing.is_set():  # a slow engine: never pile refreshes up
            return
        self._refreshing.set()

        def work(client: EngineClient) -> None:
            self._emit("jobs", client.list_jobs(limit=50))
            self._emit("counts", client.info())  # the "N queued, M running" line follows the list

        self._background(work, done=self._refreshing.clear)

    def _on_jobs(self, jobs: Sequence[pb.JobStatus]) -> None:
        for status in jobs:
            self._on_status(status, from_list=True)

    def _on_status(self, status: pb.JobStatus, from_list: bool = False) -> None:
        previous = self.jobs.get(status.job_id)
        # The watch stream is fresher than the list for the job being watched; keep its progress.
        if (
            from_list
            and previous is not None
            and previous.job_id == self._watching
            and previous.state not in FINAL_STATES
            and status.state not in FINAL_STATES
        ):
            return
        self.jobs[status.job_id] = status
        item = self._items.get(status.job_id)
        if item is None:
            item = QtWidgets.QTreeWidgetItem([status.job_id, "", "", "", ""])
            # Newest first (the engine lists in submission order): a new job appears at the top, in view.
            self.job_list.insertTopLevelItem(0, item)
            bar = QtWidgets.QProgressBar()
            bar.setRange(0, 100)
            self.job_list.setItemWidget(item, 2, bar)
            self._items[status.job_id] = item
            self._bars[status.job_id] = bar
        state = state_name(status.state)
        detail = status_text(status)
        item.setText(1, state if detail == state else f"{state}: {detail}")
        item.setToolTip(1, detail)
        item.setText(3, status.header.prompt)
        item.setText(4, format_frames(list(status.header.frames)))
        self._bars[status.job_id].setValue(round(status.progress * 100))
        if status.HasField("preview") and status.preview.width:
            self._show_preview(status.preview)

    def _show_preview(self, preview: pb.Preview) -> None:
        # The engine is not trusted with the process the panel docks in: QImage reads width*height*3 bytes from
        # what it is given, so a short buffer (12 bytes declared 4096x4096) reads past it and crashes Nuke.
        problem = preview_problem(preview)
        if problem:
            self.preview.setText("no preview")
            self.preview_caption.setText(f"preview refused: {problem}")
            return
        image = QtGui.QImage(
            preview.rgb8, preview.width, preview.height, preview.width * 3, QtGui.QImage.Format.Format_RGB888
        ).copy()  # QImage does not own the bytes it was given
        pixmap = QtGui.QPixmap.fromImage(image).scaled(
            self.preview.size(),
            QtCore.Qt.AspectRatioMode.KeepAspectRatio,
            QtCore.Qt.TransformationMode.SmoothTransformation,
        )
        self.preview.setPixmap(pixmap)
        self.preview_caption.setText(f"frame {preview.frame}, step {preview.step}")

    def selected_job(self) -> str:
        """The selected job id ('' when none)."""
        items = self.job_list.selectedItems()
        return items[0].text(0) if items else ""

    def select_job(self, job_id: str) -> None:
        """Select a job in the list, scrolled into view (and watch it with previews)."""
        item = self._items[job_id]
        self.job_list.setCurrentItem(item)
        self.job_list.scrollToItem(item)

    def _on_submitted(self, status: pb.JobStatus) -> None:
        # The job just started with Generate: in the list, selected and in view, its previews shown as they
        # come, and the engine line's counts refreshed at once.
        self._on_status(status)
        self.select_job(status.job_id)
        self._show_message(f"submitted job {status.job_id}")
        self.refresh_jobs()

    def _selection_changed(self) -> None:
        job = self.selected_job()
        status = self.jobs.get(job)
        if not job or status is None or status.state in FINAL_STATES or job == self._watching:
            return
        self._watching = job

        def watch(client: EngineClient) -> None:
            # The hosts' one follow path; the list shows every status (a cancelled or failed end included).
            with contextlib.suppress(GenerateError):
                follow_job(client, job, _QuietSink(), previews=True,
                           on_status=lambda update: self._emit("status", update),
                           stop=lambda: self._closing.is_set() or self._watching != job)  # fmt: skip

        self._background(watch)

    # -- actions -------------------------------------------------------------------------------------------

    def submit(self) -> None:
        """Generate: submit the plate sequence with the options; the job appears in the list."""
        try:
            if not self.fields:
                raise OptionsError("engine", "not connected; press Connect")
            plate = self.plate_edit.text().strip()
            if not plate:
                raise OptionsError("plate", "is empty; give an EXR sequence like /shots/sh010/plate.####.exr")
            frames = parse_frames(self.frames_edit.text())
            prompt, options = job_options(self.fields, self.values(), working_space=self.working_space)
        except (OptionsError, ValueError) as exc:
            self._show_message(f"Cannot submit: {exc}")
            return
        mask = self.mask_edit.text().strip() or None
        options["model"] = self.model_combo.currentText()

        def work(client: EngineClient) -> None:
            job = client.submit_files(plate, frames, prompt=prompt, mask=mask, **options)
            self._emit("submitted", client.status(job))

        self._show_message(f"uploading {len(frames)} frames ...")
        self._background(work)

    def cancel_selected(self) -> None:
        """Cancel the selected job."""
        job = self.selected_job()
        if not job:
            self._show_message("select a job to cancel")
            return
        self._background(lambda client: self._emit("jobs", [client.cancel(job)]))

    def open_selected(self) -> None:
        """Fetch the selected finished job into the cache (once) and open its folder."""
        job = self.selected_job()
        status = self.jobs.get(job)
        if status is None or status.state != pb.JOB_STATE_SUCCEEDED:
            self._show_message("select a succeeded job to open its results")
            return
        folder = job_dir(self.cache, job)

        def work(client: EngineClient) -> None:
            if not folder.is_dir() or len(list(folder.glob("*.exr"))) < len(status.output_files):
                client.fetch(job, folder)
            self._emit("fetched", job, str(folder))

        self._background(work)

    def _on_fetched(self, job: str, folder: str) -> None:
        self._show_message(f"results of job {job} in {folder}")
        self.open_url(QtCore.QUrl.fromLocalFile(folder))

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:
        """Stop refreshing, close the engine channel; background calls end quietly."""
        self._closing.set()
        self._timer.stop()
        self._pump.stop()
        with self._client_lock:  # closing the channel ends running watches at once
            if self._engine_client is not None:
                self._engine_client.close()
                self._engine_client = None
        super().closeEvent(event)


def build_parser() -> argparse.ArgumentParser:
    """The ``vera panel`` argument parser."""
    parser = argparse.ArgumentParser(prog="vera panel", description="The Vera Edit panel, standalone.")
    parser.add_argument(
        "--engine",
        metavar="HOST:PORT",
        help="engine address (default: $VERA_ENGINE, else 127.0.0.1:50051); the token and TLS settings come from "
        "$VERA_TOKEN_FILE, $VERA_CA_CERT, $VERA_TLS and $VERA_SERVER_NAME, as for the vera CLI",
    )
    parser.add_argument(
        "--cache", help="folder for fetched results (default: $VERA_CACHE or the temp folder)"
    )
    parser.add_argument(
        "--screenshot", metavar="PNG", help="connect, wait --wait seconds, save a screenshot, exit"
    )
    parser.add_argument("--wait", type=float, default=2.0, help="seconds before --screenshot (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``vera panel``: the panel as a standalone window; returns the exit code."""
    args = build_parser().parse_args(argv)
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    panel = VeraPanel(address=args.engine, cache=args.cache)
    panel.resize(760, 620)
    panel.show()
    if args.screenshot:

        def shoot() -> None:
            panel.grab().save(args.screenshot)
            panel.close()
            app.quit()

        QtCore.QTimer.singleShot(int(args.wait * 1000), shoot)
    code = int(app.exec())
    panel.close()
    panel.wait_idle()
    # Delete the widget here, on the GUI thread: left to Python's garbage collector it could be destroyed
    # on whatever thread happens to collect it, which Qt does not allow.
    shiboken6.delete(panel)
    return code
