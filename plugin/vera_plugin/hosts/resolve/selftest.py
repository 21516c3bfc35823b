"""Vera Edit's self-test inside DaVinci Resolve: Workspace ▸ Scripts ▸ Vera Self-test (also runnable as an
external script on Resolve Studio). The first thing a studio runs.

One line per check, ``PASS``/``FAIL``/``SKIP``, the check's name and the value seen, so that a failing line can
be sent back as it is. It opens the Edit page (playhead calls need it), works in a scratch project it creates and
deletes (your project is saved first and loaded again at the end): generated EXR sequences numbered from 1001 and
a PNG sequence Resolve has to render, on a scratch timeline. It records what this Resolve offers
(``GetRenderFormats``, ``GetRenderCodecs``), how it reads ``AppendToTimeline``'s ``endFrame``, renders 3 frames
through the adapter and checks their pixels (wherever the Deliver page puts and numbers the files), stops a render
half way and checks the queue is empty again, places a result declared in the output space and checks the placed
item's source frames and its first and last pixels as rendered, records what a result declared ACEScg looks like
after the project's output transform (a diagnostic), counts the clip mattes, and checks after every render that
the Deliver page is as it was. With an engine (``$VERA_ENGINE`` or ``--engine``) and the window's UIManager
(Resolve Studio), it also drives the Vera Edit window: open, Generate on the scratch plate, the timer ticking, the
worker finishing, the result placed, the window closed.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vera_plugin.hosts.checklog import CheckLog, Outcome
from vera_plugin.hosts.imagefiles import read_pixel, write_constant_exr, write_png
from vera_plugin.hosts.resolve import adapter
from vera_plugin.hosts.resolve.matte import write_mattes
from vera_plugin.hosts.resolve.timeline import (
    ClipRange,
    choose_exr_codec,
    choose_exr_format,
    frame_to_timecode,
    parse_frame_rate,
)

__all__ = ["SelfTest", "main"]

_SIZE = (32, 18)
_PLATE_FRAMES = range(1001, 1007)  # the EXR plate, numbered as film frames are
_PNG_FRAMES = range(0, 3)  # the source Resolve renders: 3 frames


def _code(frame: int) -> float:
    # A value per frame that survives 8-bit PNG and half float exactly: (frame % 8 + 1) / 16.
    return (frame % 8 + 1) / 16


class SelfTest(CheckLog):
    """The checks, run in order by :meth:`run`; ``lines`` holds the report, ``failures`` counts FAIL lines."""

    def __init__(
        self,
        resolve: Any = None,
        folder: Path | None = None,
        out: Callable[[str], None] | None = None,
        *,
        engine: str = "",
        fusion: Any = None,
        bmd: Any = None,
    ) -> None:
        self.resolve = resolve
        self.engine = engine  # HOST:PORT of an engine the window check generates with ("" skips it)
        self.fusion, self.bmd = fusion, bmd
        self.folder = folder or Path(tempfile.mkdtemp(prefix="vera_resolve_selftest_"))
        super().__init__(out or (lambda line: print(line, flush=True)))
        self.scratch = f"Vera self-test {time.strftime('%Y%m%d-%H%M%S')}"
        self.original = ""
        self.project: Any = None
        self.timeline: Any = None
        self.items: dict[str, Any] = {}
        self.deliver: dict[str, Any] = {}

    def run(self) -> SelfTest:
        """All checks, then the scratch project's removal (always)."""
        checks: list[tuple[str, Callable[[], Outcome]]] = [
            ("versions", self._versions),
            ("Edit page", self._edit_page),
            ("scratch project", self._scratch_project),
            ("media imported", self._media),
            ("scratch timeline", self._timeline),
            ("AppendToTimeline endFrame", self._end_frame),
            ("render formats and codecs", self._formats),
            ("Deliver page set up as an artist might leave it", self._artist_state),
            ("clip under the playhead", self._current_clip),
            ("render 3 frames", self._render),
            ("Deliver page restored after the render", self._deliver_restored),
            ("render stopped half way", self._cancelled_render),
            ("Deliver page restored after the stop", self._deliver_restored),
            ("result placed", self._place),
            ("placed pixels, first and last frame", self._placed_pixels),
            ("colour path (diagnostic)", self._colour_path),
            ("clip mattes", self._mattes),
            ("Vera Edit window", self._window),
            ("Deliver page restored at the end", self._deliver_restored),
        ]
        try:
            for name, test in checks:
                if not self.check(name, test) and name in ("versions", "scratch project", "scratch timeline"):
                    self.report("FAIL", "stopped", "the checks after this one need it")
                    break
        finally:
            self.check("scratch project deleted", self._cleanup)
            verdict = "PASS" if not self.failures else "FAIL"
            self.report(
                verdict, "summary", f"{len(self.lines)} lines, {self.failures} failed; files in {self.folder}"
            )
        return self

    # -- the checks ----------------------------------------------------------------------------------------

    def _versions(self) -> Outcome:
        import grpc
        from google.protobuf import __version__ as protobuf_version

        self.resolve = self.resolve or adapter.get_resolve()
        try:
            import numpy

            numpy_version = numpy.__version__
        except ImportError:
            numpy_version = "not installed (no clip mattes)"
        python = ".".join(map(str, sys.version_info[:3]))
        return "PASS", (f"{self.resolve.GetProductName()} {self.resolve.GetVersionString()}, Python {python}, "
                        f"grpcio {grpc.__version__}, protobuf {protobuf_version}, numpy {numpy_version}")  # fmt: skip

    def _edit_page(self) -> Outcome:
        # Playhead calls work only on the Cut, Edit, Color, Fairlight and Deliver pages; a script started from
        # Workspace > Scripts may find Resolve on another (README, Timeline.GetCurrentTimecode).
        before = self.resolve.GetCurrentPage() if hasattr(self.resolve, "GetCurrentPage") else "n/a"
        opened = self.resolve.OpenPage("edit")
        return ("PASS" if opened else "FAIL"), f"was on the {before!r} page; OpenPage('edit') gave {opened}"

    def _scratch_project(self) -> Outcome:
        manager = self.resolve.GetProjectManager()
        current = manager.GetCurrentProject()
        if current:
            self.original = current.GetName()
            if not manager.SaveProject():
                return (
                    "FAIL",
                    f"Resolve did not save your project {self.original!r}; the self-test leaves it alone",
                )
        self.project = manager.CreateProject(self.scratch) and manager.LoadProject(self.scratch)
        if not self.project:
            return "FAIL", f"Resolve did not create and load the project {self.scratch!r}"
        # Colour managed, so that the results' colour space can be set on their clip (checked when placed).
        managed = self.project.SetSetting("colorScienceMode", "davinciYRGBColorManagedv2")
        science = self.project.GetSetting("colorScienceMode")
        return (
            "PASS",
            f"{self.scratch!r} (your project {self.original or '(none)'!r} saved); colour science {science} (set: {managed})",
        )

    def _media(self) -> Outcome:
        media = self.folder / "media"
        for frame in _PLATE_FRAMES:
            write_constant_exr(
                media / f"plate.{frame:04d}.exr", *_SIZE, {"R": 0.25, "G": _code(frame), "B": 0.5, "A": 1.0}
            )
        for frame in _PNG_FRAMES:
            value = round(_code(frame) * 255)
            write_png(
                media / f"source.{frame:04d}.png", *_SIZE, bytes([64, value, 64]) * (_SIZE[0] * _SIZE[1])
            )
        pool = self.project.GetMediaPool()
        plate = pool.ImportMedia(
            [{"FilePath": (media / "plate.%04d.exr").as_posix(), "StartIndex": 1001, "EndIndex": 1006}]
        )
        source = pool.ImportMedia(
            [{"FilePath": (media / "source.%04d.png").as_posix(), "StartIndex": 0, "EndIndex": 2}]
        )
        if not plate or not source:
            return (
                "FAIL",
                f"ImportMedia gave {plate!r} for the EXR sequence and {source!r} for the PNG sequence",
            )
        self.items["plate media"], self.items["source media"] = plate[0], source[0]
        start, end = plate[0].GetClipProperty("Start"), plate[0].GetClipProperty("End")
        ok = (str(start), str(end)) == ("1001", "1006")
        return (
            ("PASS" if ok else "FAIL"),
            f"plate Start {start!r} End {end!r} (expected 1001, 1006); source {source[0].GetClipProperty('File Path')!r}",
        )

    def _timeline(self) -> Outcome:
        pool = self.project.GetMediaPool()
        self.timeline = pool.CreateEmptyTimeline("Vera self-test")
        if not self.timeline or not self.project.SetCurrentTimeline(self.timeline):
            return "FAIL", "Resolve did not create and open a timeline"
        t0 = int(self.timeline.GetStartFrame())
        while int(self.timeline.GetTrackCount("video") or 0) < 2:
            self.timeline.AddTrack("video")
        plate, source = self.items["plate media"], self.items["source media"]
        placed = {
            # V1: the plate at the start, the PNG source after it; V2: the plate again over the source, which the
            # render must switch off to get the source's own frames.
            "plate": adapter.append_checked(pool, self.timeline, plate, 1001, 6, 1, t0),
            "source": adapter.append_checked(pool, self.timeline, source, 0, 3, 1, t0 + 10),
            "cover": adapter.append_checked(pool, self.timeline, plate, 1001, 3, 2, t0 + 10),
        }
        missing = [name for name, item in placed.items() if not item]
        self.items.update(placed)
        if missing:
            return "FAIL", f"AppendToTimeline placed nothing for {missing}"
        return "PASS", ", ".join(
            f"{name} at {item.GetStart()} for {item.GetDuration()}" for name, item in placed.items()
        )

    def _end_frame(self) -> Outcome:
        # How this build reads endFrame, for the record: 2 frames asked for with an exclusive end.
        pool, timeline = self.project.GetMediaPool(), self.timeline
        timeline.AddTrack("video")
        track = int(timeline.GetTrackCount("video"))
        info = {"mediaPoolItem": self.items["plate media"], "startFrame": 1002, "endFrame": 1004, "mediaType": 1,
                "trackIndex": track, "recordFrame": int(timeline.GetStartFrame()) + 40}  # fmt: skip
        placed = pool.AppendToTimeline([info])
        if not placed:
            return "FAIL", f"AppendToTimeline refused {dict(info, mediaPoolItem='plate')}"
        duration = int(placed[0].GetDuration())
        source = placed[0].GetSourceStartFrame() if hasattr(placed[0], "GetSourceStartFrame") else "n/a"
        timeline.DeleteClips(placed)
        reading = {2: "exclusive", 3: "inclusive"}.get(duration, f"unexpected ({duration} frames)")
        return ("PASS" if duration in (2, 3) else "FAIL"), (f"startFrame 1002 endFrame 1004 gave {duration} frames: endFrame "
                                                             f"{reading}; GetSourceStartFrame {source}")  # fmt: skip

    def _formats(self) -> Outcome:
        formats = self.project.GetRenderFormats() or {}
        name, extension = choose_exr_format(formats)
        codecs = self.project.GetRenderCodecs(extension) or {}
        description, codec = choose_exr_codec(codecs)
        return "PASS", (f"GetRenderFormats {formats}; GetRenderCodecs({extension!r}) {codecs}; chosen {name} "
                        f"({extension}) {description} ({codec}); by display name {self.project.GetRenderCodecs(name) or {}}")  # fmt: skip

    def _artist_state(self) -> Outcome:
        # Marks and a switched-off track, as an artist might leave them: the renders must put both back, and
        # render the source even though its track is off.
        marked = self.timeline.SetMarkInOut(2, 8) if hasattr(self.timeline, "SetMarkInOut") else "n/a"
        switched = self.timeline.SetTrackEnable("video", 1, False)
        self.deliver = self._deliver_state()
        return "PASS", f"marks 2-8 (set: {marked}), V1 switched off (set: {switched}); {self.deliver}"

    def _current_clip(self) -> Outcome:
        plate = self.items["plate"]
        self.timeline.SetCurrentTimecode(frame_to_timecode(int(plate.GetStart()) + 2, self._fps()))
        clip = adapter.current_clip(self.resolve)
        ok = clip.reads_files_directly and clip.frames == list(_PLATE_FRAMES) and clip.track_index == 1
        return ("PASS" if ok else "FAIL"), f"{clip.describe()}, frames {clip.frames[0]}-{clip.frames[-1]}"

    def _fps(self) -> float:
        return parse_frame_rate(self.timeline.GetSetting("timelineFrameRate") or "24")[0]

    def _source_clip(self) -> adapter.ResolveClip:
        return adapter.describe_item(self.timeline, self.items["source"], 1)

    def _render_to_end(self, render: adapter.ExrRender, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not render.poll():
            if time.monotonic() > deadline:
                render.stop()
                raise TimeoutError(f"the render did not finish in {timeout:.0f} s")
            time.sleep(0.05)

    def _render(self) -> Outcome:
        clip = self._source_clip()
        render = adapter.ExrRender(self.project, clip, self.folder / "render")
        render.start()
        self._render_to_end(render)
        files = [Path(f) for f in render.files()]  # found in sub-folders too, ordered by their numbers
        numbers = [int(re.findall(r"\d+", f.stem)[-1]) for f in files]
        pixels = [read_pixel(f, 1, 1) for f in files]
        greens = [round(p.get("G", -1.0), 3) for p in pixels]
        expected = [round(_code(f), 3) for f in _PNG_FRAMES]
        blue = {round(p.get("B", -1.0), 2) for p in pixels}
        # 8-bit PNG values: within one code value (1/255) of the frame's code. The file numbers are recorded, not
        # required: the Deliver page's options number them from the timeline frame or from elsewhere.
        same = all(abs(g - e) <= 1 / 255 + 1e-3 for g, e in zip(greens, expected, strict=True))
        ok = len(files) == len(clip.frames) and same and blue == {0.25}
        where = sorted({f.parent.relative_to(self.folder / "render").as_posix() for f in files})
        return ("PASS" if ok else "FAIL"), (f"{[f.name for f in files]} in {where} (numbers {numbers}, timeline frames "
                                            f"{clip.frames}); green {greens} (expected {expected}), blue {sorted(blue)} "
                                            "(0.25: the source, not the clip above it)")  # fmt: skip

    def _cancelled_render(self) -> Outcome:
        before = len(self.project.GetRenderJobList() or [])
        render = adapter.ExrRender(self.project, self._source_clip(), self.folder / "stopped")
        render.start()
        render.poll()  # under way
        render.stop()  # waits for StopRendering to take effect, then deletes the job (checked)
        after = len(self.project.GetRenderJobList() or [])
        busy = self.project.IsRenderingInProgress()
        ok = after == before and not busy and not render.restore_problems
        problems = "; ".join(render.restore_problems) or "none"
        return ("PASS" if ok else "FAIL"), (f"stopped; render queue {before} -> {after} job(s), rendering {busy}, "
                                            f"problems putting things back: {problems}")  # fmt: skip

    def _deliver_state(self) -> dict[str, Any]:
        timeline = self.timeline
        enables = {}
        for track in range(1, int(timeline.GetTrackCount("video") or 0) + 1):
            enables[f"V{track}"] = bool(timeline.GetIsTrackEnabled("video", track))
            for index, item in enumerate(timeline.GetItemListInTrack("video", track) or []):
                enables[f"V{track}.{index}"] = bool(item.GetClipEnabled())
        return {
            "format and codec": self.project.GetCurrentRenderFormatAndCodec(),
            "render mode": self.project.GetCurrentRenderMode(),
            "marks": timeline.GetMarkInOut() if hasattr(timeline, "GetMarkInOut") else "n/a (Resolve < 19.1)",
            "presets": sorted(self.project.GetRenderPresetList() or [], key=str),
            "jobs": len(self.project.GetRenderJobList() or []),
            "enables": enables,
        }

    def _deliver_restored(self) -> Outcome:
        now = self._deliver_state()
        # Tracks and clips the self-test added since are not the Deliver page's business.
        now["enables"] = {k: v for k, v in now["enables"].items() if k in self.deliver.get("enables", {})}
        changed = {k: (self.deliver.get(k), v) for k, v in now.items() if self.deliver.get(k) != v}
        if changed:
            return "FAIL", f"changed (before, after): {changed}"
        return (
            "PASS",
            f"{now['format and codec']}, mode {now['render mode']}, marks {now['marks']}, {now['jobs']} job(s)",
        )

    def _place(self) -> Outcome:
        clip = adapter.describe_item(self.timeline, self.items["plate"], 1)
        results = self.folder / "results" / "selftest"
        files = []
        for frame in clip.frames:
            values = {"R": _code(frame), "G": 0.25, "B": 0.5, "A": 1.0, "edit.R": 0.0, "edit.G": 0.0,
                      "edit.B": 0.0, "edit.A": 0.0, "matte.A": 0.5}  # fmt: skip
            files.append(write_constant_exr(results / f"vera_edit.{frame:04d}.exr", *_SIZE, values))
        try:
            mattes = {1: write_mattes(files, results / "matte")}
        except ImportError:
            mattes = {1: None}
        # Declared in the space the timeline shows (what the adapter sends for a rendered clip), so that the
        # placed pixels render back as they are; the colour path itself is the diagnostic after.
        colour = adapter.render_colour(self.project, ["Gamma 2.4 Rec.709 - Texture"])
        space = colour.engine_name or "ACEScg"
        (placed,) = adapter.place_takes(clip, files, 1, self.resolve, mattes, colorspace=space)
        self.items["placed"] = placed
        item = placed.timeline_item
        seen = (int(item.GetStart()), int(item.GetDuration()), int(item.GetLeftOffset()))
        expected = (clip.range.record_start, len(clip.frames), 0)
        source = item.GetSourceStartFrame() if hasattr(item, "GetSourceStartFrame") else "n/a"
        return ("PASS" if seen == expected else "FAIL"), (f"V{placed.track_index} start, duration, left offset {seen} "
                                                          f"(expected {expected}); GetSourceStartFrame {source}; "
                                                          f"Start {placed.media_pool_item.GetClipProperty('Start')!r}; "
                                                          f"colour: {placed.colour_note}")  # fmt: skip

    def _render_placed(self, folder: str) -> list[float]:
        placed = self.items["placed"]
        plate = adapter.describe_item(self.timeline, self.items["plate"], 1)
        # The placed track rendered on its own: what the timeline shows of the result, frame by frame.
        clip = replace(plate, item=placed.timeline_item, media_pool_item=placed.media_pool_item,
                       track_index=placed.track_index, range=ClipRange(placed.record_frame, placed.record_frame + placed.frames, 0))  # fmt: skip
        render = adapter.ExrRender(self.project, clip, self.folder / folder)
        render.start()
        self._render_to_end(render)
        files = [Path(f) for f in render.files()]
        return [round(read_pixel(files[i], 1, 1).get("R", -1.0), 4) for i in (0, -1)]

    def _placed_pixels(self) -> Outcome:
        plate = adapter.describe_item(self.timeline, self.items["plate"], 1)
        reds = self._render_placed("placed")
        expected = [round(_code(plate.frames[i]), 4) for i in (0, -1)]
        # Declared in the output space, rendered to it: the same values, to within a half float's rounding.
        same = all(abs(r - e) <= 2e-3 for r, e in zip(reds, expected, strict=True))
        space = self.items["placed"].colour_space or "(not set)"
        return ("PASS" if same else "FAIL"), (f"red of the first and last frame {reds} (expected {expected}); "
                                              f"clip colour space {space!r}")  # fmt: skip

    def _colour_path(self) -> Outcome:
        # What a result declared scene-linear ACEScg looks like after the project's output transform: recorded to
        # compare with the same values written, not required to equal them.
        placed = self.items["placed"]
        declared, note = adapter.set_clip_colorspace(self.project, placed.media_pool_item, "ACEScg")
        reds = self._render_placed("placed_acescg")
        if placed.colour_space:
            adapter.set_clip_colorspace(self.project, placed.media_pool_item, "Gamma 2.4 Rec.709 - Texture")
        output = self.project.GetSetting("colorSpaceOutput") or "(not reported)"
        science = self.project.GetSetting("colorScienceMode")
        return "PASS", (f"values {[round(_code(f), 4) for f in (_PLATE_FRAMES[0], _PLATE_FRAMES[-1])]} declared "
                        f"{declared or 'nothing'!r} ({note}) render as {reds} in {science}, output {output!r}")  # fmt: skip

    def _window(self) -> Outcome:
        from vera_plugin.hosts.resolve.window import TIMER_ID, VeraEditWindow, no_window_reason

        if not self.engine:
            return (
                "SKIP",
                "no engine given: set VERA_ENGINE=HOST:PORT (or --engine) to drive the Vera Edit window",
            )
        reason = no_window_reason(self.resolve, self.fusion)
        if reason or self.bmd is None:
            return "SKIP", reason or "no bmd (UIDispatcher): run the self-test from Workspace > Scripts"
        ui = self.fusion.UIManager
        dispatcher = self.bmd.UIDispatcher(ui)
        window = VeraEditWindow(ui, dispatcher, self.resolve, address=self.engine,
                                work_dir=self.folder / "window", close_when_done=True)  # fmt: skip
        window.start()
        if window.client is None:
            window.close()
            return "FAIL", f"the window did not connect: {window.log_lines[-1] if window.log_lines else ''}"
        plate = self.items["plate"]
        self.timeline.SetCurrentTimecode(frame_to_timecode(int(plate.GetStart()) + 1, self._fps()))
        window.items["opt_prompt"].PlainText = "add a red ball"
        if window.items.get("opt_steps") is not None:
            window.items["opt_steps"].Value = 1
        window.items["Track"].CurrentIndex = window.items["Track"].items.index("V1")
        # A watchdog, so that a window that never finishes cannot hold Resolve: it closes the window.
        watchdog = ui.Timer({"ID": "VeraSelfTestWatchdog", "Interval": 300_000})
        generic = dispatcher.On.Timeout

        def timeout(ev: Any) -> None:
            try:
                who = ev["who"]
            except (KeyError, TypeError, IndexError):
                who = ""
            if who == "VeraSelfTestWatchdog":
                window.log("the self-test's watchdog closed the window after 300 s")
                window.close()
            else:
                generic(ev)

        dispatcher.On.Timeout = timeout
        dispatcher.On["VeraSelfTestWatchdog"].Timeout = timeout
        watchdog.Start()
        window.window.On.Generate.Clicked({})  # as the artist's click
        dispatcher.RunLoop()
        watchdog.Stop()
        window.window.Hide()
        ok = window.results == ["placed"] and window.ticks > 0 and window.worker is None
        placed = f"V{window.placements[0].track_index}" if window.placements else "nothing"
        last = window.log_lines[-1] if window.log_lines else ""
        return ("PASS" if ok else "FAIL"), (f"{window.ticks} timer ticks ({TIMER_ID}), outcome {window.results}, "
                                            f"placed on {placed}; last log line: {last}")  # fmt: skip

    def _mattes(self) -> Outcome:
        placed = self.items["placed"]
        mattes = self.project.GetMediaPool().GetClipMatteList(placed.media_pool_item) or []
        if not placed.matte_attached:
            try:
                import numpy  # noqa: F401
            except ImportError:
                return (
                    "SKIP",
                    "numpy is not installed in Resolve's Python: results are placed without clip mattes",
                )
            return "FAIL", "the clip matte was not attached"
        ok = len(mattes) == placed.frames
        return ("PASS" if ok else "FAIL"), f"{len(mattes)} clip matte files for {placed.frames} frames"

    def _cleanup(self) -> Outcome:
        if self.project is None:
            return "SKIP", "no scratch project was made"
        manager = self.resolve.GetProjectManager()
        loaded = manager.LoadProject(self.original) if self.original else manager.CloseProject(self.project)
        deleted = bool(loaded) and manager.DeleteProject(self.scratch)
        remaining = self.scratch in (manager.GetProjectListInCurrentFolder() or [])
        if not deleted or remaining:
            return (
                "FAIL",
                f"{self.scratch!r} is still there (loaded back {self.original!r}: {bool(loaded)}); delete it by hand",
            )
        return "PASS", f"deleted {self.scratch!r}; {self.original or 'no project'!r} loaded again"


def main(resolve: Any = None, argv: list[str] | None = None, fusion: Any = None, bmd: Any = None) -> int:
    """The Resolve self-test: ``[FOLDER] [--engine HOST:PORT]`` (default ``$VERA_ENGINE``); prints the report;
    returns the number of failed checks (0: all passed). ``fusion`` and ``bmd`` (Resolve gives them to menu
    scripts) let it drive the Vera Edit window against the engine."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="Vera Self-test.py")
    parser.add_argument(
        "folder", nargs="?", type=Path, help="where the self-test writes (default: a temp folder)"
    )
    parser.add_argument("--engine", default=os.environ.get("VERA_ENGINE", ""), metavar="HOST:PORT")
    args = parser.parse_args(list(argv or []))
    test = SelfTest(resolve, args.folder, engine=args.engine, fusion=fusion, bmd=bmd).run()
    return test.failures
