"""The "Vera Edit" window inside DaVinci Resolve, built with Fusion's UIManager (``fusion.UIManager`` +
``bmd.UIDispatcher``), driving :mod:`vera_plugin.hosts.resolve`.

Engine address, model, the options the engine's schema declares (prompt, task, steps, takes, ...), which clip
(the top clip under the playhead, or a chosen track's), which take to place (or all of them, stacked), handles,
a progress line, Generate and Cancel, and a log where errors land. Whatever goes wrong, the window logs it and
is ready for the next Generate (never left "busy"). Resolve calls run on the window's thread, from button handlers and a timer; only the engine
steps (upload, watch, download) run on a worker thread, which talks to the window through a queue. The UI
objects are passed in, so this module imports neither Resolve nor Fusion.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vera_plugin.client import DEFAULT_ADDRESS, EngineClient, EngineError
from vera_plugin.generate import client_options_from_env, describe_engine_error
from vera_plugin.hosts.resolve import adapter as vera_resolve
from vera_plugin.hosts.resolve.matte import write_mattes
from vera_plugin.hosts.resolve.timeline import frame_to_timecode
from vera_plugin.schema_ui import Field, OptionsError, fields_for_model, find_model, job_options

__all__ = ["TIMER_ID", "WINDOW_ID", "VeraEditWindow", "main", "no_window_reason"]

WINDOW_ID = "VeraEdit"
TIMER_ID = "VeraEditPoll"
YIELD_SECONDS = 0.015  # per timer tick, the engine thread's time to run while RunLoop holds the GIL
TOP_CLIP = "Top clip under the playhead"


def _bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction:4.0%}"


class VeraEditWindow:
    """One "Vera Edit" window: build with :meth:`show`, run with :meth:`run` (blocks until closed)."""

    def __init__(
        self,
        ui: Any,
        dispatcher: Any,
        resolve: Any,
        *,
        address: str | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        client_factory: Callable[..., EngineClient] = EngineClient,
        client_options: dict[str, Any] | None = None,
        close_when_done: bool = False,
    ) -> None:
        self.ui, self.dispatcher, self.resolve = ui, dispatcher, resolve
        self.address = address or os.environ.get("VERA_ENGINE") or DEFAULT_ADDRESS
        self.work_dir = Path(work_dir or vera_resolve.default_work_dir())
        self.client_factory = client_factory
        # The panel's connection options: $VERA_TOKEN_FILE, $VERA_CA_CERT, $VERA_SERVER_NAME.
        self.client_options = client_options_from_env() if client_options is None else dict(client_options)
        self.close_when_done = close_when_done  # the self-test's window closes itself after one Generate
        self.ticks = 0
        self.results: list[str] = []  # "placed", "error: ..." or "cancelled: ..." per finished Generate
        self.client: EngineClient | None = None
        self.fields: list[Field] = []
        self.model_names: list[str] = []
        self.window: Any = None
        self.items: dict[str, Any] = {}
        self.timer: Any = None
        # The run in progress.
        self.clip: vera_resolve.ResolveClip | None = None
        self.render: vera_resolve.ExrRender | None = None
        self.job_id = ""
        self.cancel = threading.Event()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.worker: threading.Thread | None = None
        self.placements: list[vera_resolve.Placement] = []
        self.sent: vera_resolve.ExrFrames | None = None
        self._pending_options: dict[str, Any] = {}
        self.log_lines: list[str] = []

    # -- building ------------------------------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)connect to the engine at the address field and read its models' options schema."""
        if self.items.get("Engine") is not None:
            self.address = self.items["Engine"].Text.strip() or DEFAULT_ADDRESS
        if self.client is not None:
            self.client.close()
        self.client, self.fields, self.model_names = None, [], []
        try:
            client = self.client_factory(self.address, **self.client_options)
        except (OSError, ValueError) as exc:  # a token or CA file that cannot be read
            self.log(f"Error: cannot connect to {self.address}: {exc}")
            return
        try:
            info = client.info()
            model = find_model(info)
        except EngineError as exc:
            client.close()
            self.log(f"{describe_engine_error(exc, self.address)} Then press Connect.")
            return
        except OptionsError as exc:
            client.close()
            self.log(f"Error: the engine at {self.address} offers no usable model: {exc}")
            return
        self.client = client
        self.model_names = [m.name for m in info.models]
        self.fields = fields_for_model(model)
        self.log(f"Connected to {self.address}: engine {info.engine_version} on {info.device.name or 'cpu'}")

    def _option_widget(self, field: Field) -> Any:
        ui, wid = self.ui, f"opt_{field.name}"
        tip = field.help
        if field.kind == "text":
            return ui.TextEdit({"ID": wid, "PlaceholderText": tip, "ToolTip": tip, "MinimumSize": [300, 48]})
        if field.kind == "bool":
            return ui.CheckBox(
                {"ID": wid, "Text": field.label, "Checked": bool(field.default), "ToolTip": tip}
            )
        if field.kind == "choice":
            return ui.ComboBox({"ID": wid, "ToolTip": tip})
        if field.kind == "float":
            return ui.DoubleSpinBox({"ID": wid, "Minimum": field.minimum or 0.0, "Maximum": field.maximum or 1e6,
                                     "Value": float(field.default or 0.0), "SingleStep": 0.5, "ToolTip": tip})  # fmt: skip
        if field.kind == "int" and field.default is not None:
            return ui.SpinBox({"ID": wid, "Minimum": int(field.minimum or 0), "Maximum": int(field.maximum or 10**6),
                               "Value": int(field.default), "ToolTip": tip})  # fmt: skip
        # Strings, and ints the engine draws itself when left empty (the seed).
        return ui.LineEdit({"ID": wid, "Text": "" if field.default is None else str(field.default),
                            "PlaceholderText": "random" if field.kind == "int" else "", "ToolTip": tip})  # fmt: skip

    def _layout(self) -> Any:
        ui = self.ui
        rows = [
            ui.HGroup({"Weight": 0}, [
                ui.Label({"Text": "Engine", "Weight": 0}),
                ui.LineEdit({"ID": "Engine", "Text": self.address}),
                ui.Button({"ID": "Connect", "Text": "Connect", "Weight": 0}),
            ]),
            ui.HGroup({"Weight": 0}, [
                ui.Label({"Text": "Model", "Weight": 0}), ui.ComboBox({"ID": "Model"}),
                ui.Label({"Text": "Clip", "Weight": 0}), ui.ComboBox({"ID": "Track"}),
            ]),
        ]  # fmt: skip
        for field in self.fields:
            widget = self._option_widget(field)
            label = (
                []
                if field.kind == "bool"
                else [ui.Label({"Text": field.label, "Weight": 0, "MinimumSize": [120, 0]})]
            )
            rows.append(ui.HGroup({"Weight": 1 if field.kind == "text" else 0}, [*label, widget]))
        rows += [
            ui.HGroup({"Weight": 0}, [
                ui.Label({"Text": "Place take", "Weight": 0}),
                ui.SpinBox({"ID": "PlaceTake", "Minimum": 1, "Maximum": 8, "Value": 1,
                            "ToolTip": "which take goes on the timeline (a job with several takes)"}),
                ui.CheckBox({"ID": "AllTakes", "Text": "all takes, stacked", "Checked": False}),
                ui.Label({"Text": "Handles", "Weight": 0}),
                ui.SpinBox({"ID": "Handles", "Minimum": 0, "Maximum": 100, "Value": 0,
                            "ToolTip": "extra frames either side, when the clip's EXR sequence has them"}),
            ]),
            ui.Label({"ID": "Progress", "Text": _bar(0.0) + " idle", "Weight": 0}),
            ui.HGroup({"Weight": 0}, [
                ui.Button({"ID": "Generate", "Text": "Generate"}),
                ui.Button({"ID": "Cancel", "Text": "Cancel", "Enabled": False}),
            ]),
            ui.TextEdit({"ID": "Log", "ReadOnly": True, "Weight": 1, "MinimumSize": [300, 80]}),
        ]  # fmt: skip
        return ui.VGroup(rows)

    def show(self) -> None:
        """Build (or rebuild after Connect, since the options follow the engine's schema) and show the window."""
        if self.window is not None:
            self.window.Hide()
        self.window = self.dispatcher.AddWindow(
            {"ID": WINDOW_ID, "WindowTitle": "Vera Edit", "Geometry": [200, 200, 460, 520]}, self._layout()
        )
        self.items = self.window.GetItems()
        self.items["Log"].PlainText = "\n".join(self.log_lines)
        self.items["Model"].AddItems(self.model_names)
        timeline = self.resolve.GetProjectManager().GetCurrentProject().GetCurrentTimeline()
        tracks = int(timeline.GetTrackCount("video") or 0) if timeline else 0
        self.items["Track"].AddItems([TOP_CLIP] + [f"V{t}" for t in range(1, tracks + 1)])
        for field in self.fields:
            if field.kind == "choice":
                choices = self._choices(field)
                combo = self.items[f"opt_{field.name}"]
                combo.AddItems(choices)
                if field.default in choices:
                    combo.CurrentIndex = choices.index(field.default)
        on = self.window.On
        on[WINDOW_ID].Close = lambda ev: self.close()
        on.Connect.Clicked = lambda ev: self._guard(self._reconnect)
        on.Generate.Clicked = lambda ev: self._guard(self.generate)
        on.Cancel.Clicked = lambda ev: self._guard(self.stop)
        self.window.Show()

    @staticmethod
    def _choices(field: Field) -> list[str]:
        # Resolve declares no scene-linear working space to follow: offer the engine's own spaces only.
        if field.name == "colorspace" and field.default not in field.choices[1:]:
            return list(field.choices[1:])
        return list(field.choices)

    def _reconnect(self) -> None:
        self.connect()
        self.show()

    # -- feedback --------------------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        """Append a line to the window's log (and print it to Resolve's console)."""
        print(f"Vera Edit: {text}")
        self.log_lines.append(text)
        if self.items.get("Log") is not None:
            self.items["Log"].PlainText = "\n".join(self.log_lines)

    def progress(self, fraction: float, message: str) -> None:
        """Show overall progress."""
        if self.items.get("Progress") is not None:
            self.items["Progress"].Text = f"{_bar(fraction)} {message}"

    def _guard(self, action: Callable[[], None]) -> None:
        # Every failure is logged and the window made ready again: a None from a Resolve call (AttributeError,
        # TypeError), a damaged result file, a bug. A window left "busy" would need Resolve restarted.
        try:
            action()
        except vera_resolve.VeraCancelled as exc:
            self._ended(f"Cancelled: {exc}")
        except vera_resolve.ResolveError as exc:
            self._ended(f"Error: {exc}")
        except EngineError as exc:
            self._ended(f"Error: {describe_engine_error(exc, self.address)}")
        except (OptionsError, OSError, ValueError) as exc:
            self._ended(f"Error: {exc}")
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self._ended(
                f"Error: unexpected {type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno}); "
                "please report this line"
            )

    def _ended(self, line: str) -> None:
        self.log(line)
        busy = self.worker is not None or self.render is not None or self.clip is not None
        if busy:
            self.results.append(line)
        self._finish()

    def _busy(self, busy: bool) -> None:
        self.items["Generate"].Enabled = not busy
        self.items["Cancel"].Enabled = busy

    # -- running ---------------------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The window's values checked against the schema: ``prompt`` plus JobHeader fields."""
        values: dict[str, Any] = {}
        for field in self.fields:
            widget = self.items[f"opt_{field.name}"]
            if field.kind == "text":
                values[field.name] = widget.PlainText
            elif field.kind == "bool":
                values[field.name] = bool(widget.Checked)
            elif field.kind == "choice":
                values[field.name] = widget.CurrentText
            elif field.kind in ("int", "float") and hasattr(widget, "Value") and field.default is not None:
                values[field.name] = widget.Value
            else:
                text = str(widget.Text).strip()
                values[field.name] = None if field.kind == "int" and not text else text
        prompt, options = job_options(self.fields, values)
        model = self.items["Model"].CurrentText
        return {"prompt": prompt, **options, **({"model": model} if model else {})}

    def generate(self) -> None:
        """Generate: check the options, find the clip, get its EXRs (render if needed), then the engine."""
        if self.client is None:
            raise vera_resolve.ResolveError(
                f"not connected to an engine; check the address ({self.address}) and Connect"
            )
        if self.worker is not None or self.render is not None:
            raise vera_resolve.ResolveError("a Generate is already running; wait for it or Cancel")
        options = self.options()
        takes = int(options.get("takes") or 1)
        if not self.items["AllTakes"].Checked and int(self.items["PlaceTake"].Value) > takes:
            raise vera_resolve.ResolveError(
                f"Place take is {self.items['PlaceTake'].Value} but the job makes {takes} take(s); choose 1-{takes}"
            )
        choice = self.items["Track"].CurrentText
        track = None if choice in ("", TOP_CLIP) else int(choice.lstrip("V"))
        self.cancel.clear()
        self.placements, self.job_id, self.sent = [], "", None
        self.clip = vera_resolve.current_clip(self.resolve, track)
        self.log(f"Clip: {self.clip.describe()}")
        self._busy(True)
        if self.clip.reads_files_directly:
            handles = int(self.items["Handles"].Value)
            frames = vera_resolve.exr_frames(self.clip, self.work_dir, self.resolve, handles=handles)
            if handles and (frames.head, frames.tail) != (handles, handles):
                self.log(f"Handles: {frames.head} before, {frames.tail} after (all the media has)")
            self._start_engine(frames, options)
            return
        if int(self.items["Handles"].Value):
            self.log(
                "Handles: none for a clip rendered from the timeline (only an EXR sequence has frames beyond it)"
            )
        project = self.resolve.GetProjectManager().GetCurrentProject()
        # Resolve renders in the project's output space, not the plate space chosen for EXR sequences.
        offered = next((list(f.choices) for f in self.fields if f.name == "colorspace"), [])
        colour = vera_resolve.render_colour(project, offered)
        if colour.engine_name:
            options["colorspace"] = colour.engine_name
        self.log(f"Colour: {colour.note}")
        target = self.work_dir / "renders" / os.urandom(6).hex()
        self.render = vera_resolve.ExrRender(project, self.clip, target)
        self.render.start()
        self._pending_options = options
        self.progress(0.0, f"Rendering {self.clip.name} to EXR ({self.render.codec})")

    def _start_engine(self, frames: vera_resolve.ExrFrames, options: dict[str, Any]) -> None:
        assert self.client is not None and self.clip is not None
        client, clip, events = self.client, self.clip, self.events
        self.sent = frames
        self._pending_options = options

        def work() -> None:
            try:
                events.put(("progress", (0.2, f"Uploading {len(frames.paths)} frames to {client.address}")))
                job_id = vera_resolve.send_clip(client, clip, frames, options)
                events.put(("job", job_id))
                final = vera_resolve.follow_job(
                    client, job_id, lambda f, m: events.put(("progress", (0.25 + 0.65 * f, m))), self.cancel
                )
                out = vera_resolve.results_folder(self.work_dir, job_id)
                files = vera_resolve.fetch_results(client, job_id, out,
                                                   lambda f, m: events.put(("progress", (0.9 + 0.07 * f, m))), final)  # fmt: skip
                events.put(("progress", (0.97, "Writing the clip mattes")))
                mattes = {
                    take: write_mattes(take_files, out / "matte")
                    for take, take_files in vera_resolve.results_by_take(files).items()
                }
                events.put(("fetched", (files, mattes)))
            except BaseException as exc:  # reported in the window by the timer, never lost on this thread
                events.put(("error", exc))

        self.worker = threading.Thread(target=work, name="vera-resolve-engine", daemon=True)
        self.worker.start()

    def on_timeout(self, ev: Any) -> None:
        """The dispatcher's generic ``On.Timeout``: Resolve delivers a ``ui.Timer``'s timeouts there (``ev["who"]``
        names the timer), in builds where ``On[<timer ID>].Timeout`` never fires."""
        try:
            who = ev["who"]
        except (KeyError, TypeError, IndexError):
            who = TIMER_ID  # no sender given: ours is the window's only timer
        if who == TIMER_ID:
            self.tick()

    def tick(self) -> None:
        """Timer: advance a render, show the worker's progress, place the results when they are in; then let the
        engine thread run for a moment (Resolve's RunLoop holds the GIL between callbacks)."""
        self.ticks += 1
        self._guard(self._tick)
        worker = self.worker
        if worker is not None and worker.is_alive():
            # A UIManager tool measured RunLoop keeping the GIL between callbacks ("21 clips took 30 s instead of
            # 0.6 s") and yields in every tick; without this the upload, watch and fetch only crawl.
            worker.join(YIELD_SECONDS)

    def _tick(self) -> None:
        if self.render is not None:
            assert self.clip is not None
            if self.cancel.is_set():
                render, self.render = self.render, None
                render.stop()
                self._log_restore(render)
                raise vera_resolve.VeraCancelled("render stopped")
            if not self.render.poll():
                self.progress(
                    0.2 * self.render.fraction, f"Rendering {self.clip.name}: {self.render.fraction:.0%}"
                )
                return
            files = self.render.files()
            self._log_restore(self.render)
            self.render = None
            self._start_engine(
                vera_resolve.ExrFrames(files, self.clip.frames, rendered=True), self._pending_options
            )
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self.progress(*value)
            elif kind == "job":
                self.job_id = value
                self.log(f"Job {value} submitted")
            elif kind == "error":
                raise value
            elif kind == "fetched":
                self._place(*value)

    def _place(self, files: list[Any], mattes: dict[int, Any]) -> None:
        assert self.clip is not None and self.sent is not None
        which: int | str = "all" if self.items["AllTakes"].Checked else int(self.items["PlaceTake"].Value)
        colorspace = str(self._pending_options.get("colorspace") or "")
        self.placements = vera_resolve.place_takes(
            self.clip, files, which, self.resolve, mattes, self.sent.head, self.sent.tail, colorspace
        )
        self.progress(1.0, "Done")
        where = frame_to_timecode(self.placements[0].record_frame, self.clip.fps)
        for placed in self.placements:
            take = f"take {placed.take} " if len(self.placements) > 1 or placed.take > 1 else ""
            self.log(
                f"Placed {take}{placed.frames} frames on V{placed.track_index} at {where} "
                f"(bin {vera_resolve.BIN_NAME!r})"
                + ("" if placed.matte_attached else "; no clip matte (needs numpy and zip/none/rle output)")
            )
        self.log(f"Colour: {self.placements[0].colour_note}")
        self.results.append("placed")
        self._finish()

    def stop(self) -> None:
        """Cancel: stops the render, or cancels the job on the engine."""
        self.cancel.set()
        if self.job_id and self.client is not None:
            self.client.cancel(self.job_id, ended_ok=True)
        self.log("Cancelling...")

    def _log_restore(self, render: vera_resolve.ExrRender) -> None:
        if render.restore_problems:
            self.log(
                f"Warning: the Deliver page could not be put back entirely: {'; '.join(render.restore_problems)}"
            )

    def _finish(self) -> None:
        render, self.render, self.worker, self.job_id = self.render, None, None, ""
        self.clip = None
        try:
            if render is not None:
                render.stop()
                self._log_restore(render)
        except Exception as exc:  # even then the window must come back
            self.log(f"Error: stopping the render failed ({type(exc).__name__}: {exc})")
        finally:
            if self.items.get("Generate") is not None:
                self._busy(False)
            if self.close_when_done and self.results:
                self.close()

    def close(self) -> None:
        """Close the window: cancel what runs and leave the event loop."""
        if self.worker is not None or self.render is not None:
            self.stop()
        if self.timer is not None:
            self.timer.Stop()
        if self.client is not None:
            self.client.close()
        self.dispatcher.ExitLoop()

    def start(self) -> None:
        """Connect, show the window and start its timer (what :meth:`run` does before the event loop)."""
        self.connect()
        self.show()
        self.timer = self.ui.Timer({"ID": TIMER_ID, "Interval": 200})
        # Both: some builds deliver a timer's Timeout only to the generic On.Timeout (ev["who"] is the timer).
        self.dispatcher.On[TIMER_ID].Timeout = lambda ev: self.tick()
        self.dispatcher.On.Timeout = self.on_timeout
        self.timer.Start()

    def run(self) -> None:
        """Connect, show the window and run Resolve's UI event loop until it is closed."""
        self.start()
        self.dispatcher.RunLoop()
        self.window.Hide()


def no_window_reason(resolve: Any, fusion: Any) -> str:
    """Why this Resolve cannot show the window (``""`` when it can): free DaVinci Resolve 19.1 and later has no
    UIManager for scripts (``fusion.UIManager`` is None), and 21.1 no longer lists Python scripts at all."""
    if fusion is not None and getattr(fusion, "UIManager", None) is not None:
        return ""
    product = f"{_product(resolve)}".strip() or "this DaVinci Resolve"
    return (
        f"Vera Edit needs DaVinci Resolve Studio: {product} gives scripts no UIManager (fusion.UIManager is None), "
        "so no script window can open. The free Resolve dropped script windows in 19.1 (and lists no Python "
        "scripts from 21.1); use Resolve Studio, or the standalone panel (`vera panel`) with Nuke or files"
    )


def _product(resolve: Any) -> str:
    try:
        return f"{resolve.GetProductName()} {resolve.GetVersionString()}"
    except Exception:  # an odd build without them: the sentence still reads
        return ""


def main(resolve: Any = None, fusion: Any = None, bmd: Any = None) -> None:
    """Entry point of the ``Vera Edit`` script: Resolve passes its ``resolve``, ``fusion`` and ``bmd``."""
    resolve = resolve or vera_resolve.get_resolve()
    fusion = fusion or resolve.Fusion()
    reason = no_window_reason(resolve, fusion)
    if reason:
        print(f"Vera Edit: {reason}.")
        return
    if bmd is None:
        import DaVinciResolveScript as bmd  # type: ignore[import-not-found, no-redef]
    ui = fusion.UIManager
    VeraEditWindow(ui, bmd.UIDispatcher(ui), resolve).run()
