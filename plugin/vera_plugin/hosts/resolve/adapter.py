"""DaVinci Resolve adapter: send the clip under the playhead to a Vera Edit engine, stack the results above it.

A small set of plain functions that any UI can drive: the ``Vera Edit`` script's UIManager window
(``resolve_scripts/``), the standalone Qt panel (through Resolve's external scripting API, Studio only) or a
TD's own script::

    from vera_plugin.client import EngineClient
    from vera_plugin.hosts import resolve as vera_resolve

    clip = vera_resolve.current_clip()                      # the item under the playhead (top track), or track=N
    with EngineClient("gpu-box:50051") as engine:
        (placed,) = vera_resolve.run_vera_edit(engine, {"prompt": "add a paper boat", "steps": 30}, clip=clip,
                                           progress=lambda f, msg: print(f"{f:4.0%} {msg}"))
    print(placed.track_index, placed.record_frame)

Steps, each its own function: :func:`current_clip` (which item, which frames; retimed clips are refused),
:func:`exr_frames` (the frames as linear EXRs, with optional handles: the files themselves for an EXR sequence,
else a render of the item's range through the render queue, isolated to the item, the Deliver page restored
afterwards exactly as it was), :func:`send_clip` / :func:`follow_job` / :func:`fetch_results` (the engine,
through :class:`~vera_plugin.client.EngineClient`), :func:`place_results` / :func:`place_takes` (import into the
"Vera" bin, the results' colour space set on the clip, a new video track above at the item's record frame, the
matte as a clip matte; one take, or every take on its own track). The module never imports Resolve: the
Resolve object is passed in or found by :func:`get_resolve`. Resolve calls must run on the thread that owns
the script (the UI thread); only the engine steps may run on a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vera_plugin import generate
from vera_plugin.cache import job_dir, take_and_frame
from vera_plugin.client import EngineClient, EngineError
from vera_plugin.generate import GenerateCancelled, GenerateError, describe_engine_error
from vera_plugin.hosts.resolve.matte import write_mattes
from vera_plugin.hosts.resolve.timeline import (
    ClipRange,
    SequencePath,
    append_clip_info,
    choose_exr_codec,
    choose_exr_format,
    frame_to_timecode,
    import_clip_info,
    item_at_frame,
    numbered_files,
    parse_frame_rate,
    parse_resolution,
    parse_sequence_path,
    render_settings,
    sequence_from_files,
    timecode_to_frame,
)
from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = [
    "BIN_NAME",
    "DeliverState",
    "ExrFrames",
    "ExrRender",
    "Placement",
    "RenderColour",
    "ResolveClip",
    "ResolveError",
    "VeraCancelled",
    "append_checked",
    "current_clip",
    "default_work_dir",
    "describe_item",
    "exr_frames",
    "fetch_results",
    "follow_job",
    "get_resolve",
    "open_playhead_page",
    "place_results",
    "place_takes",
    "render_colour",
    "results_by_take",
    "results_folder",
    "run_vera_edit",
    "send_clip",
    "set_clip_colorspace",
]

BIN_NAME = "Vera"
RESULT_PREFIX = "vera_edit."  # the engine's output file names: vera_edit.####.exr
# A Vera result as Resolve names its clip or file: vera_edit.* (take 1) or vera_edit_take<k>.* (take k).
_RESULT_NAME = re.compile(r"^vera_edit(?:_take\d+)?\.")
# Pages on which the playhead can be read and moved (README, Timeline.GetCurrentTimecode/SetCurrentTimecode).
PLAYHEAD_PAGES = ("cut", "edit", "color", "fairlight", "deliver")

ProgressFn = Callable[[float, str], None]


class ResolveError(RuntimeError):
    """A step on the Resolve side failed; the message says which clip or call and what to do."""


class VeraCancelled(ResolveError):
    """The artist cancelled (the render or the engine job was stopped too)."""


def _noop(fraction: float, message: str) -> None:
    pass


def _cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def default_work_dir() -> Path:
    """Where renders and results live: ``$VERA_RESOLVE_CACHE``, else ``~/.cache/vera/resolve``.

    Results must outlive the script (the timeline links to them), so this is not a temporary folder.
    """
    return Path(os.environ.get("VERA_RESOLVE_CACHE") or Path.home() / ".cache" / "vera" / "resolve")


# ---------------------------------------------------------------------------------------------------------
# Finding Resolve and the clip


def get_resolve() -> Any:
    """The running Resolve's scripting object.

    Inside Resolve (Workspace ▸ Scripts, the Console) it is the injected ``resolve`` (or ``bmd``); outside,
    ``DaVinciResolveScript`` from Resolve's ``Developer/Scripting/Modules`` (external scripting: Studio only).
    """
    import __main__

    app = getattr(__main__, "resolve", None)
    if app is None and getattr(__main__, "bmd", None) is not None:
        app = __main__.bmd.scriptapp("Resolve")
    if app is None:
        try:
            import DaVinciResolveScript  # type: ignore[import-not-found]
        except ImportError:
            raise ResolveError(
                "cannot import DaVinciResolveScript: outside Resolve, set RESOLVE_SCRIPT_API and add "
                "$RESOLVE_SCRIPT_API/Modules to PYTHONPATH (see the README's Resolve section)"
            ) from None
        app = DaVinciResolveScript.scriptapp("Resolve")
    if app is None:
        raise ResolveError(
            "no running DaVinci Resolve answered: start Resolve, and for scripts run outside it use Resolve "
            "Studio with Preferences ▸ System ▸ General ▸ External scripting using = Local"
        )
    return app


@dataclass
class _Context:
    resolve: Any
    project: Any
    timeline: Any
    media_pool: Any


def _context(resolve: Any = None) -> _Context:
    app = resolve if resolve is not None else get_resolve()
    project = app.GetProjectManager().GetCurrentProject()
    if not project:
        raise ResolveError("no project is open in Resolve; open the project with the clip to edit")
    timeline = project.GetCurrentTimeline()
    if not timeline:
        raise ResolveError(
            f"project {project.GetName()!r} has no current timeline; open the edit in the Edit page"
        )
    return _Context(app, project, timeline, project.GetMediaPool())


def _timeline_rate(timeline: Any) -> tuple[float, bool]:
    fps, drop = parse_frame_rate(timeline.GetSetting("timelineFrameRate") or "24")
    if str(timeline.GetSetting("timelineDropFrameTimecode") or "0") in ("1", "true", "True"):
        drop = True
    return fps, drop


@dataclass(frozen=True)
class ResolveClip:
    """One timeline item and everything the adapter needs to know about it.

    ``frames`` are the numbers the engine sees and the results carry: the source frame numbers when the
    media is an EXR sequence (``plate.1001.exr`` stays 1001), otherwise the timeline (record) frames.
    """

    item: Any
    media_pool_item: Any
    timeline: Any
    timeline_name: str
    track_index: int
    name: str
    range: ClipRange
    fps: float
    file_path: str
    sequence: SequencePath | None
    resolution: tuple[int, int] | None
    media_fps: float
    retimed: bool = False

    @property
    def reads_files_directly(self) -> bool:
        """True for an EXR sequence at the timeline's rate and 100% speed: its files are sent as they are.
        Anything else is rendered, so the engine gets what the timeline shows."""
        return (
            self.sequence is not None
            and self.sequence.extension == "exr"
            and abs(self.media_fps - self.fps) < 1e-3
            and not self.retimed
        )

    @property
    def frames(self) -> list[int]:
        """Frame numbers sent to the engine (see the class docstring)."""
        if self.reads_files_directly:
            assert self.sequence is not None
            return self.range.source_frames(self.sequence.first)
        return self.range.record_frames

    def with_handles(self, handles: int) -> tuple[list[int], int, int]:
        """``(frames, head, tail)``: :attr:`frames` extended by up to ``handles`` frames either side where the
        media has them. Only an EXR sequence read from disk has frames beyond the item; a rendered clip gets
        none (the timeline shows other material there)."""
        frames = self.frames
        if handles <= 0 or not self.reads_files_directly:
            return frames, 0, 0
        assert self.sequence is not None
        head = min(handles, frames[0] - self.sequence.first)
        tail = min(handles, self.sequence.last - frames[-1])
        return list(range(frames[0] - head, frames[-1] + tail + 1)), head, tail

    def describe(self) -> str:
        """``"plate.[1001-1100].exr on V1 at 01:00:04:00, 48 frames"`` for messages and the window."""
        where = frame_to_timecode(self.range.record_start, self.fps)
        return f"{self.name} on V{self.track_index} at {where}, {self.range.duration} frames"


def _track_of(timeline: Any, item: Any) -> int:
    typed = item.GetTrackTypeAndIndex() if hasattr(item, "GetTrackTypeAndIndex") else None
    if typed and len(typed) == 2 and typed[0] == "video":
        return int(typed[1])
    key = (item.GetStart(), item.GetEnd(), item.GetName())
    for track in range(int(timeline.GetTrackCount("video") or 0), 0, -1):
        for other in timeline.GetItemListInTrack("video", track) or []:
            if (other.GetStart(), other.GetEnd(), other.GetName()) == key:
                return track
    raise ResolveError(f"could not find the track of {item.GetName()!r} on timeline {timeline.GetName()!r}")


def _as_int(value: Any, default: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def describe_item(timeline: Any, item: Any, track_index: int) -> ResolveClip:
    """A :class:`ResolveClip` for ``item`` on video track ``track_index`` of ``timeline``."""
    fps, _ = _timeline_rate(timeline)
    name = item.GetName()
    media = item.GetMediaPoolItem()
    if not media:
        raise ResolveError(
            f"{name!r} on V{track_index} has no media (a generator, title or compound clip); "
            "Vera Edit needs a clip of footage"
        )
    file_path = str(media.GetClipProperty("File Path") or "")
    if not file_path:
        raise ResolveError(f"{name!r} on V{track_index}: its media has no file path; relink the clip")
    if _RESULT_NAME.match(os.path.basename(file_path)):
        raise ResolveError(
            f"the clip on V{track_index} under the playhead is a Vera result ({os.path.basename(file_path)}); "
            "choose the source clip's track in the Track menu (Resolve's current clip is the top track's)"
        )
    fps_text = media.GetClipProperty("FPS")
    media_fps = parse_frame_rate(fps_text)[0] if fps_text else fps
    clip_range = ClipRange(int(item.GetStart()), int(item.GetEnd()), _as_int(item.GetLeftOffset(), 0))
    # A speed change shows up as a source span unlike the duration (newer Resolves report both; older ones
    # do not, and a clip is then taken as 100%). One frame of slack: builds disagree on the end's inclusivity.
    source_start = _as_int(item.GetSourceStartFrame(), -1) if hasattr(item, "GetSourceStartFrame") else -1
    source_end = _as_int(item.GetSourceEndFrame(), -1) if hasattr(item, "GetSourceEndFrame") else -1
    retimed = (
        source_start >= 0 and source_end >= 0 and abs(source_end - source_start - clip_range.duration) > 1
    )
    if retimed:
        raise ResolveError(
            f"{name!r} on V{track_index} is retimed: it shows {source_end - source_start} source frames over "
            f"{clip_range.duration} timeline frames (speed {100 * (source_end - source_start) / clip_range.duration:.0f}%). "
            "Vera Edit needs the clip at 100% speed: reset its speed (Change Clip Speed), or render the retimed "
            "clip to new media and edit that"
        )
    sequence = parse_sequence_path(file_path)
    clip = ResolveClip(
        item=item,
        media_pool_item=media,
        timeline=timeline,
        timeline_name=timeline.GetName(),
        track_index=track_index,
        name=str(media.GetName() or name),
        range=clip_range,
        fps=fps,
        file_path=file_path,
        sequence=sequence,
        resolution=parse_resolution(media.GetClipProperty("Resolution")),
        media_fps=media_fps,
        retimed=retimed,
    )
    if clip.reads_files_directly:
        assert sequence is not None
        frames = clip.frames
        if frames[0] < sequence.first or frames[-1] > sequence.last:
            raise ResolveError(
                f"{clip.describe()} shows frames {frames[0]}-{frames[-1]}, but the sequence on disk is "
                f"{sequence.first}-{sequence.last}; trim the clip to its media"
            )
    return clip


def open_playhead_page(resolve: Any) -> str:
    """Make sure Resolve shows a page whose playhead scripts can read and move (Cut, Edit, Color, Fairlight,
    Deliver: README, Timeline.GetCurrentTimecode); from any other page (Media, Fusion) open the Edit page.
    Returns the page it was on."""
    page = str(_call(resolve, "GetCurrentPage") or "")
    if page and page not in PLAYHEAD_PAGES and not resolve.OpenPage("edit"):
        raise ResolveError(
            f"Resolve is on the {page.title()} page and did not open the Edit page; open it and try again"
        )
    return page


def current_clip(resolve: Any = None, track: int | None = None) -> ResolveClip:
    """The clip to edit: ``Timeline.GetCurrentVideoItem()`` (the top track's item under the playhead), or
    with ``track=N`` the item of video track N under the playhead. Opens the Edit page first when Resolve shows
    a page without a playhead (see :func:`open_playhead_page`)."""
    ctx = _context(resolve)
    open_playhead_page(ctx.resolve)
    timeline = ctx.timeline
    fps, drop = _timeline_rate(timeline)
    timecode = timeline.GetCurrentTimecode()
    if track is None:
        item = timeline.GetCurrentVideoItem()
        if not item:
            raise ResolveError(
                f"no video clip under the playhead ({timecode}) on timeline {timeline.GetName()!r}; "
                "move the playhead onto the clip to edit"
            )
        return describe_item(timeline, item, _track_of(timeline, item))
    count = int(timeline.GetTrackCount("video") or 0)
    if not 1 <= track <= count:
        raise ResolveError(f"track V{track} does not exist; timeline {timeline.GetName()!r} has V1-V{count}")
    playhead = timecode_to_frame(timecode, fps, True if drop else None)
    items = list(timeline.GetItemListInTrack("video", track) or [])
    index = item_at_frame([(int(i.GetStart()), int(i.GetEnd())) for i in items], playhead)
    if index is None:
        raise ResolveError(f"no clip on V{track} under the playhead ({timecode}); move the playhead onto it")
    return describe_item(timeline, items[index], track)


# ---------------------------------------------------------------------------------------------------------
# Frames as linear EXRs


@dataclass(frozen=True)
class ExrFrames:
    """The EXR file of every frame to send, in order, with the frame numbers the engine should see; ``head`` and
    ``tail`` are the handle frames among them before and after the clip's own."""

    paths: list[str]
    frames: list[int]
    rendered: bool
    head: int = 0
    tail: int = 0


def _call(obj: Any, name: str, *args: Any) -> Any:
    # A Resolve call that older versions lack (Timeline.GetMarkInOut is 19.1+): None when it is not there.
    method = getattr(obj, name, None)
    return method(*args) if callable(method) else None


class DeliverState:
    """What a render changes on the Deliver page, taken before and put back after, whatever happens.

    Format and codec (``GetCurrentRenderFormatAndCodec``), render mode, the render settings (target folder,
    name, range mode ...: Resolve has no getter for them, so they are kept as a temporary render preset, which
    holds them, and loaded back), the timeline's In/Out marks (``GetMarkInOut``, Resolve 19.1+), and the clips
    and tracks the render had to switch off or on. :meth:`restore` is safe to call more than once.
    """

    def __init__(self, project: Any, timeline: Any) -> None:
        self.project, self.timeline = project, timeline
        self.preset = f"vera-deliver-{uuid.uuid4().hex[:10]}"
        self.format_codec = dict(project.GetCurrentRenderFormatAndCodec() or {})
        self.mode = project.GetCurrentRenderMode()
        self.marks = _call(timeline, "GetMarkInOut")
        self.clips: list[tuple[Any, bool]] = []  # (timeline item, enabled before)
        self.tracks: list[tuple[int, bool]] = []  # (video track, enabled before)
        self.restored = False
        if not project.SaveAsNewRenderPreset(self.preset):
            raise ResolveError(
                "Resolve did not keep the Deliver page's settings as a render preset, so they could not be put "
                "back after rendering; nothing was changed. Check Deliver > Render Settings > Save As New Preset"
            )

    def set_clip(self, item: Any, enabled: bool) -> None:
        """Switch a clip on or off for the render (remembered for :meth:`restore`)."""
        before = bool(item.GetClipEnabled())
        if before != enabled and item.SetClipEnabled(enabled):
            self.clips.append((item, before))

    def set_track(self, track: int, enabled: bool) -> None:
        """Switch a video track on or off for the render (remembered for :meth:`restore`)."""
        before = bool(self.timeline.GetIsTrackEnabled("video", track))
        if before != enabled and self.timeline.SetTrackEnable("video", track, enabled):
            self.tracks.append((track, before))

    def restore(self) -> list[str]:
        """Put everything back; returns what could not be restored (empty when all of it was)."""
        if self.restored:
            return []
        self.restored = True
        problems = []
        for item, enabled in reversed(self.clips):
            if not item.SetClipEnabled(enabled):
                problems.append(f"clip {item.GetName()!r} enabled={enabled}")
        for track, enabled in reversed(self.tracks):
            if not self.timeline.SetTrackEnable("video", track, enabled):
                problems.append(f"track V{track} enabled={enabled}")
        if not self.project.LoadRenderPreset(self.preset):
            problems.append(f"render settings (preset {self.preset})")
        self.project.DeleteRenderPreset(self.preset)
        fmt, codec = self.format_codec.get("format"), self.format_codec.get("codec")
        if fmt and codec and not self.project.SetCurrentRenderFormatAndCodec(fmt, codec):
            problems.append(f"format {fmt} codec {codec}")
        if self.mode in (0, 1) and not self.project.SetCurrentRenderMode(self.mode):
            problems.append(f"render mode {self.mode}")
        if isinstance(self.marks, dict):
            _call(self.timeline, "ClearMarkInOut", "all")
            for kind, marks in self.marks.items():
                if "in" in marks and "out" in marks:
                    _call(self.timeline, "SetMarkInOut", marks["in"], marks["out"], kind)
        return problems


class ExrRender:
    """One render of a clip's timeline range to an EXR sequence through Resolve's render queue.

    :meth:`start`, then :meth:`poll` until it returns ``True`` (a UI calls it from a timer), then
    :meth:`files`; :meth:`stop` cancels. The EXR format and codec are chosen from what this Resolve offers
    (:func:`~vera_plugin.hosts.resolve.timeline.choose_exr_codec`); every other clip over the range is switched off
    for the render so the frames are the clip's own. The Deliver page (format, codec, mode, settings, marks) and
    the clip and track switches are put back exactly as they were when the render ends, fails or is cancelled.
    """

    def __init__(self, project: Any, clip: ResolveClip, target_dir: str | os.PathLike[str]) -> None:
        self.project = project
        self.clip = clip
        self.target_dir = Path(target_dir)
        self.job_id = ""
        self.codec = ""
        self.fraction = 0.0
        self.deliver: DeliverState | None = None
        self.restore_problems: list[str] = []
        self._done = False

    def start(self) -> None:
        """Choose format and codec, keep the Deliver page, isolate the clip, queue the job and start rendering."""
        project, clip = self.project, self.clip
        formats = project.GetRenderFormats() or {}
        try:
            name, extension = choose_exr_format(formats)
            description, codec = choose_exr_codec(project.GetRenderCodecs(extension) or {})
        except ValueError as exc:
            raise ResolveError(f"cannot render {clip.describe()} to EXR: {exc}") from None
        self.deliver = DeliverState(project, clip.timeline)
        try:
            if not project.SetCurrentRenderFormatAndCodec(extension, codec):
                raise ResolveError(
                    f"Resolve refused render format {name} ({extension}) with codec {description!r} ({codec})"
                )
            self.codec = description
            project.SetCurrentRenderMode(1)  # single clip: one sequence for the range
            self.target_dir.mkdir(parents=True, exist_ok=True)
            settings = render_settings(clip.range.record_start, clip.range.record_end, self.target_dir,
                                       f"vera_src_{uuid.uuid4().hex[:8]}", clip.resolution)  # fmt: skip
            if not project.SetRenderSettings(settings):
                raise ResolveError(f"Resolve refused the render settings {settings}; check the Deliver page")
            self._isolate()
            self.job_id = project.AddRenderJob()
            if not self.job_id:
                raise ResolveError("Resolve did not add the render job; check the Deliver page for a warning")
            if not project.StartRendering([self.job_id]):
                raise ResolveError(
                    f"Resolve did not start render job {self.job_id}; is another render running?"
                )
        except BaseException:
            self._cleanup()
            raise

    def _isolate(self) -> None:
        # The render shows what the viewer shows: only the clip itself may be on over its range.
        assert self.deliver is not None
        timeline, clip = self.clip.timeline, self.clip
        start, end = clip.range.record_start, clip.range.record_end
        self.deliver.set_track(clip.track_index, True)
        self.deliver.set_clip(clip.item, True)
        for track in range(1, int(timeline.GetTrackCount("video") or 0) + 1):
            if track == clip.track_index:
                continue
            for item in timeline.GetItemListInTrack("video", track) or []:
                if int(item.GetStart()) < end and int(item.GetEnd()) > start:
                    self.deliver.set_clip(item, False)

    def _cleanup(self) -> None:
        problems = []
        if self.job_id:
            if not self.project.DeleteRenderJob(self.job_id):
                problems.append(f"render job {self.job_id} is still in the render queue; delete it there")
            self.job_id = ""
        if self.deliver is not None:
            problems += self.deliver.restore()
        self.restore_problems = self.restore_problems + problems

    def poll(self) -> bool:
        """``True`` once the render is complete; :class:`ResolveError` if it failed or was cancelled."""
        if self._done:
            return True
        busy = self.project.IsRenderingInProgress()
        status = self.project.GetRenderJobStatus(self.job_id) or {}
        state = str(status.get("JobStatus", ""))
        self.fraction = min(1.0, float(status.get("CompletionPercentage", 0) or 0) / 100.0)
        if state == "Complete" and not busy:
            self._done = True
            return True
        if state in ("Failed", "Cancelled") or (not busy and state != "Complete"):
            self._cleanup()
            detail = status.get("Error", "") or "see the Deliver page's render queue"
            raise ResolveError(
                f"Resolve's render of {self.clip.describe()} ended {state or 'unexpectedly'}: {detail}"
            )
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the render and undo the set-up. ``StopRendering`` returns before the render has stopped (and
        Resolve refuses to delete a job that is rendering), so this waits up to ``timeout`` seconds for it."""
        if self.job_id and not self._done:
            self.project.StopRendering()
            deadline = time.monotonic() + timeout
            while self.project.IsRenderingInProgress() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._cleanup()

    def files(self) -> list[str]:
        """The rendered frames in order (after :meth:`poll` returned ``True``); removes the queue job."""
        self._cleanup()
        # Recursively: Deliver presets can put the files in sub-folders; their numbers may be timeline frames or
        # start anywhere else (the File tab's options), so only their order is used.
        files = [str(p) for p in numbered_files(self.target_dir, "exr", recursive=True)]
        if len(files) != self.clip.range.duration:
            raise ResolveError(
                f"Resolve rendered {len(files)} EXR files into {self.target_dir} for the "
                f"{self.clip.range.duration} frames of {self.clip.describe()}; render it again"
            )
        return files


def exr_frames(
    clip: ResolveClip,
    work_dir: str | os.PathLike[str] | None = None,
    resolve: Any = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    poll_seconds: float = 0.25,
    handles: int = 0,
) -> ExrFrames:
    """The clip's frames as EXRs: its own files for an EXR sequence (with up to ``handles`` extra frames either
    side where the sequence has them), else a blocking :class:`ExrRender` (no handles)."""
    progress = progress or _noop
    if clip.reads_files_directly:
        assert clip.sequence is not None
        frames, head, tail = clip.with_handles(handles)
        paths = [clip.sequence.path(f) for f in frames]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ResolveError(
                f"{len(missing)} frames of {clip.describe()} are missing on disk, first {missing[0]}"
            )
        return ExrFrames(paths, frames, rendered=False, head=head, tail=tail)
    ctx = _context(resolve)
    target = Path(work_dir or default_work_dir()) / "renders" / uuid.uuid4().hex[:12]
    render = ExrRender(ctx.project, clip, target)
    render.start()
    try:
        while not render.poll():
            if _cancelled(cancel):
                raise VeraCancelled(f"cancelled while rendering {clip.describe()}")
            progress(render.fraction, f"Rendering {clip.name} to EXR ({render.codec}): {render.fraction:.0%}")
            time.sleep(poll_seconds)
    except BaseException:
        render.stop()
        raise
    return ExrFrames(render.files(), clip.frames, rendered=True)


# ---------------------------------------------------------------------------------------------------------
# The engine


class _EventSink:
    """A :class:`~vera_plugin.generate.ProgressSink` from a progress function and a cancel event."""

    def __init__(self, progress: ProgressFn, cancel: threading.Event | None) -> None:
        self.progress, self.cancel = progress, cancel

    def update(self, fraction: float, message: str) -> None:
        self.progress(fraction, message)

    def cancelled(self) -> bool:
        return _cancelled(self.cancel)


@contextlib.contextmanager
def _engine_sentences(client: EngineClient) -> Iterator[None]:
    # The sentences every host shows (vera_plugin.generate), as this adapter's errors.
    try:
        yield
    except GenerateCancelled as exc:
        raise VeraCancelled(str(exc)) from None
    except GenerateError as exc:
        raise ResolveError(str(exc)) from None
    except EngineError as exc:
        raise ResolveError(describe_engine_error(exc, client.address)) from None


def send_clip(client: EngineClient, clip: ResolveClip, frames: ExrFrames, options: Mapping[str, Any]) -> str:
    """Submit the frames with ``options`` (``prompt`` plus JobHeader fields from the schema, ``takes``
    included); the job id."""
    opts = {k: v for k, v in options.items() if v is not None}
    prompt = str(opts.pop("prompt", "") or "")
    if not prompt.strip():
        raise ResolveError("the prompt is empty; describe the edit, e.g. 'add a paper boat drifting left'")
    opts.setdefault("name", clip.name)
    with _engine_sentences(client):
        return client.submit_files(frames.paths, frames.frames, prompt=prompt, **opts)


def follow_job(
    client: EngineClient,
    job_id: str,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> pb.JobStatus:
    """Watch ``job_id`` to the end with progress; cancels it on the engine when ``cancel`` is set. The one
    follow path of every host (:func:`vera_plugin.generate.follow_job`), its sentences as
    :class:`ResolveError` / :class:`VeraCancelled`."""
    with _engine_sentences(client):
        final = generate.follow_job(client, job_id, _EventSink(progress or _noop, cancel))
    assert final is not None  # no stop() given
    return final


def fetch_results(
    client: EngineClient,
    job_id: str,
    out_dir: str | os.PathLike[str],
    progress: ProgressFn | None = None,
    final: pb.JobStatus | None = None,
) -> list[Path]:
    """Download a finished job's EXRs into ``out_dir``: only the files its status lists, and only if each is a
    Vera result name (``vera_edit.<frame>.exr``, ``vera_edit_take<k>.<frame>.exr``); an engine that names
    anything else is refused before a byte is written."""
    progress = progress or _noop
    with _engine_sentences(client):
        final = final if final is not None else client.status(job_id)
        names = generate.result_names(job_id, final)
        files = client.fetch(
            job_id,
            out_dir,
            files=names,
            progress=lambda i, n, name: progress(i / max(n, 1), f"Fetched {name} ({i}/{n})"),
        )
    unexpected = [f.name for f in files if f.name not in names]
    if unexpected:
        raise ResolveError(f"the engine sent files it did not list for job {job_id}: {unexpected[:3]}")
    return files


def results_folder(work_dir: str | os.PathLike[str], job_id: str) -> Path:
    """Where a job's results are kept under the work folder: ``<work>/results/<job id>``, through the cache's
    job-folder check (a job id that is not a plain name is refused)."""
    try:
        return job_dir(Path(work_dir) / "results", job_id)
    except ValueError as exc:
        raise ResolveError(f"the engine answered with {exc}") from None


def results_by_take(files: list[Path] | list[str]) -> dict[int, list[Path]]:
    """Result files by take (``vera_edit.*`` take 1, ``vera_edit_take<k>.*`` take k), each in frame order."""
    takes: dict[int, list[tuple[int, Path]]] = {}
    for f in files:
        found = take_and_frame(Path(f).name)
        if found is not None:
            takes.setdefault(found[0], []).append((found[1], Path(f)))
    return {take: [p for _, p in sorted(found)] for take, found in sorted(takes.items())}


# ---------------------------------------------------------------------------------------------------------
# Results on the timeline


@dataclass(frozen=True)
class Placement:
    """Where one take went: the media pool clip, the timeline item, its track and record frame, the colour
    space set on the clip (``""`` when the project's colour management did not allow it; ``colour_note`` says)."""

    media_pool_item: Any
    timeline_item: Any
    track_index: int
    record_frame: int
    frames: int
    matte_attached: bool
    sequence: SequencePath
    take: int = 1
    colour_space: str = ""
    colour_note: str = ""


def _vera_bin(media_pool: Any, name: str) -> Any:
    root = media_pool.GetRootFolder()
    for folder in root.GetSubFolderList() or []:
        if folder.GetName() == name:
            return folder
    folder = media_pool.AddSubFolder(root, name)
    if not folder:
        raise ResolveError(f"Resolve did not create the media pool bin {name!r}; is the project read-only?")
    return folder


# What the engine's colour spaces are called where a Resolve project lets a clip declare its own: Resolve Color
# Managed projects ("Input Color Space") and ACES projects (the clip's "IDT"). Names differ between versions, so
# each has candidates, tried in order; SetClipProperty answers False to a name it does not know.
_CLIP_COLOUR_SPACES = {
    "Input Color Space": {
        "ACEScg": ("ACEScg", "ACES (AP1) Linear", "ACES AP1 Linear"),
        "Linear Rec.709 (sRGB)": ("Rec.709 Linear", "Linear Rec.709", "sRGB Linear"),
        "Gamma 2.4 Rec.709 - Texture": ("Rec.709 Gamma 2.4",),
        "Gamma 2.2 Rec.709 - Texture": ("Rec.709 Gamma 2.2",),
        "sRGB - Texture": ("sRGB",),
        "Camera Rec.709": ("Rec.709 (Scene)",),
    },
    "IDT": {
        "ACEScg": ("ACEScg - CSC", "ACEScg"),
        "Linear Rec.709 (sRGB)": ("sRGB (Linear) - CSC", "Linear - sRGB"),
        "Gamma 2.4 Rec.709 - Texture": ("Rec.709", "Rec.709 - CSC"),
        "sRGB - Texture": ("sRGB", "sRGB - CSC"),
    },
}


# Resolve's names of the display-referred spaces it renders in, to the names the engine's OCIO config (the ACES
# studio config) gives them. Resolve renders in the project's output space: Rec.709 Gamma 2.4 in a default
# DaVinci YRGB or Resolve Color Managed SDR project.
_RESOLVE_TO_OCIO = {
    "Rec.709 Gamma 2.4": "Gamma 2.4 Rec.709 - Texture",
    "Rec.709 Gamma 2.2": "Gamma 2.2 Rec.709 - Texture",
    "Rec.709-A": "Gamma 2.4 Rec.709 - Texture",
    "sRGB": "sRGB - Texture",
    "Rec.709 (Scene)": "Camera Rec.709",
    "Linear": "Linear Rec.709 (sRGB)",
    "Rec.709 Linear": "Linear Rec.709 (sRGB)",
}
DEFAULT_RENDER_SPACE = "Rec.709 Gamma 2.4"


@dataclass(frozen=True)
class RenderColour:
    """The colour space of frames Resolve renders for a clip: ``resolve_name`` as the project names it,
    ``engine_name`` the engine's name for it (``""`` when the engine does not offer it); ``note`` says which."""

    resolve_name: str
    engine_name: str
    note: str


def render_colour(project: Any, offered: list[str] | tuple[str, ...]) -> RenderColour:
    """What Resolve's render of a clip is in, and whether the engine takes it as a plate colour space.

    A render is in the project's output space: a Resolve Color Managed project's ``colorSpaceOutput``; a DaVinci
    YRGB project renders the timeline's display-referred values (Rec.709 Gamma 2.4 in a default SDR project); an
    ACES project its output transform (``acesODT``). ``offered`` is the engine's ``colorspace`` choices."""
    science = str(project.GetSetting("colorScienceMode") or "")
    if "colormanaged" in science.lower():
        name = str(project.GetSetting("colorSpaceOutput") or "") or DEFAULT_RENDER_SPACE
    elif science.lower().startswith("aces"):
        odt = str(project.GetSetting("acesODT") or "")
        name = {"Rec.709": "Rec.709 Gamma 2.4", "sRGB": "sRGB"}.get(odt, odt or DEFAULT_RENDER_SPACE)
    else:
        name = DEFAULT_RENDER_SPACE
    engine_name = _RESOLVE_TO_OCIO.get(name, name)
    if engine_name in offered:
        return RenderColour(name, engine_name, f"rendered frames are {name} (sent as {engine_name!r})")
    return RenderColour(
        name,
        "",
        f"rendered frames are {name}, which this engine does not offer as a plate colour space (it offers "
        f"{', '.join(list(offered)[:4])}): they are sent as the chosen space and their colours will be off. An "
        "engine publishing its OCIO config's display spaces takes them as they are",
    )


def set_clip_colorspace(project: Any, media_pool_item: Any, colorspace: str) -> tuple[str, str]:
    """Declare the results' colour space on their clip (not on the project): ``(name set, note)``.

    In a Resolve Color Managed project the clip's "Input Color Space", in an ACES project its "IDT"; a DaVinci
    YRGB project has no per-clip colour space, and the note says what to do instead.
    """
    colorspace = colorspace or "ACEScg"
    science = str(project.GetSetting("colorScienceMode") or "")
    if "colormanaged" in science.lower():
        key = "Input Color Space"
    elif science.lower().startswith("aces"):
        key = "IDT"
    else:
        return "", (
            f"project colour science {science or 'DaVinci YRGB'} has no per-clip colour space: the results are "
            f"{colorspace} values; set the clip's Input Color Space by hand once colour management is on"
        )
    candidates = _CLIP_COLOUR_SPACES[key].get(colorspace, (colorspace,))
    for name in candidates:
        if media_pool_item.SetClipProperty(key, name):
            return name, f"clip {key} set to {name!r}"
    return "", (
        f"Resolve accepted none of {list(candidates)} as the clip's {key}; set it to the results' colour space "
        f"({colorspace}) in Clip Attributes"
    )


def append_checked(
    media_pool: Any, timeline: Any, media: Any, first_frame: int, count: int, track: int, record_frame: int
) -> Any:
    """``AppendToTimeline`` ``count`` frames of ``media`` from its frame ``first_frame`` (its own numbering) onto
    video track ``track`` at ``record_frame``; the placed item, or ``None``. Builds differ on whether
    ``endFrame`` is inclusive: the exclusive form is tried first, and the inclusive one when Resolve refuses it
    or places one frame too many (that item is taken away first)."""
    for inclusive in (False, True):
        info = append_clip_info(media, first_frame, count, track, record_frame, inclusive)
        placed = media_pool.AppendToTimeline([info])
        item = placed[0] if placed else None
        # Some builds answer a refusal with a dead item whose getters all return None (AYON checks
        # GetDuration() is None): that is a refusal too, and the inclusive form is still tried.
        duration = item.GetDuration() if item else None
        if duration is None:
            continue
        if int(duration) == count:
            return item
        timeline.DeleteClips([item])
    return None


def place_results(
    clip: ResolveClip,
    files: list[Path] | list[str],
    resolve: Any = None,
    bin_name: str = BIN_NAME,
    track_name: str = "Vera",
    mattes: list[Path] | None = None,
    head: int = 0,
    tail: int = 0,
    colorspace: str = "",
    take: int = 1,
) -> Placement:
    """Import ``files`` (one EXR per frame sent: the clip's frames plus ``head``/``tail`` handle frames) into the
    bin ``bin_name``, set their colour space on the clip (``colorspace``: the plate's, as sent to the engine)
    and place the clip's own frames on a new video track above ``clip`` at its record frame; the handles stay
    in the media for trimming. ``mattes`` (from :func:`~vera_plugin.hosts.resolve.matte.write_mattes`) become the
    clip's clip matte. The placed item is read back: record frame, duration and source frames must match."""
    ctx = _context(resolve)
    sequence = sequence_from_files([str(f) for f in files])
    sent = [clip.frames[0] - head, clip.frames[-1] + tail]
    if [sequence.first, sequence.last] != sent:
        raise ResolveError(
            f"results {sequence.pattern} hold frames {sequence.first}-{sequence.last}, but {clip.describe()} "
            f"was sent as {sent[0]}-{sent[1]}; fetch the job again"
        )
    count = clip.range.duration
    timeline = ctx.timeline
    if timeline.GetName() != clip.timeline_name and not ctx.project.SetCurrentTimeline(clip.timeline):
        raise ResolveError(f"switch back to timeline {clip.timeline_name!r} to place the results")
    media_pool = ctx.media_pool
    folder = _vera_bin(media_pool, bin_name)
    previous = media_pool.GetCurrentFolder()
    media_pool.SetCurrentFolder(folder)
    try:
        imported = media_pool.ImportMedia([import_clip_info(sequence)])
    finally:
        if previous:
            media_pool.SetCurrentFolder(previous)
    if not imported:
        raise ResolveError(f"Resolve did not import {sequence.pattern} ({sequence.first}-{sequence.last})")
    media = imported[0]
    media_start = _as_int(media.GetClipProperty("Start"), -1)
    if media_start < 0:
        raise ResolveError(
            f"Resolve gave no start frame for {sequence.pattern} (clip property 'Start' is "
            f"{media.GetClipProperty('Start')!r}); expected {sequence.first}"
        )
    colour_space, colour_note = set_clip_colorspace(ctx.project, media, colorspace)

    before = int(clip.timeline.GetTrackCount("video") or 0)
    if not clip.timeline.AddTrack("video") or int(clip.timeline.GetTrackCount("video") or 0) != before + 1:
        raise ResolveError(f"Resolve did not add a video track to {clip.timeline_name!r}; is it locked?")
    track = before + 1  # AddTrack appends on top: above the source, whatever track it is on
    clip.timeline.SetTrackName("video", track, track_name)

    # The media's frames are addressed in its own numbers (Start = the first file's), the clip's from `head`.
    item = append_checked(
        media_pool, clip.timeline, media, media_start + head, count, track, clip.range.record_start
    )
    where = frame_to_timecode(clip.range.record_start, clip.fps)
    if not item:
        raise ResolveError(
            f"Resolve did not place {sequence.pattern} on V{track} at {where} for {count} frames"
        )
    placed_at = (int(item.GetStart()), int(item.GetDuration()), _as_int(item.GetLeftOffset(), -1))
    if placed_at != (clip.range.record_start, count, head):
        raise ResolveError(
            f"Resolve placed the results at frame {placed_at[0]} for {placed_at[1]} frames from source frame "
            f"{media_start + placed_at[2]}; expected {clip.range.record_start} for {count} from "
            f"{media_start + head} (move the clip on V{track} to line it up)"
        )
    storage = ctx.resolve.GetMediaStorage()
    matte = bool(mattes and storage and storage.AddClipMattesToMediaPool(media, [str(m) for m in mattes]))
    return Placement(
        media, item, track, clip.range.record_start, count, matte, sequence, take, colour_space, colour_note
    )


def place_takes(
    clip: ResolveClip,
    files: list[Path] | list[str],
    which: int | str = 1,
    resolve: Any = None,
    mattes: dict[int, list[Path] | None] | None = None,
    head: int = 0,
    tail: int = 0,
    colorspace: str = "",
) -> list[Placement]:
    """Place take ``which`` of a job's ``files``, or with ``which="all"`` every take on its own new track,
    stacked with take 1 on top (the one the viewer shows)."""
    takes = results_by_take(files)
    if not takes:
        raise ResolveError(f"no result files among {[Path(f).name for f in files][:3]}")
    if which == "all":
        chosen = sorted(takes, reverse=True)
    elif int(which) in takes:
        chosen = [int(which)]
    else:
        raise ResolveError(f"the job has takes {', '.join(map(str, takes))}, not take {which}")
    placements = []
    for take in chosen:
        name = "Vera" if len(takes) == 1 else f"Vera take {take}"
        placements.append(
            place_results(
                clip,
                takes[take],
                resolve,
                track_name=name,
                mattes=(mattes or {}).get(take),
                head=head,
                tail=tail,
                colorspace=colorspace,
                take=take,
            )
        )
    return placements[::-1]


# ---------------------------------------------------------------------------------------------------------
# The whole thing


def _offered_spaces(info: pb.EngineInfo, model: str) -> list[str]:
    chosen = next((m for m in info.models if m.name == model), None) or next(
        (m for m in info.models if m.is_default), info.models[0] if info.models else None
    )
    if chosen is None:
        return []
    return next((list(o.choices) for o in chosen.options if o.name == "colorspace"), [])


def run_vera_edit(
    client: EngineClient,
    options: Mapping[str, Any],
    *,
    clip: ResolveClip | None = None,
    resolve: Any = None,
    track: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    take: int | str = 1,
    handles: int = 0,
) -> list[Placement]:
    """Current clip -> EXRs -> engine -> results on new tracks, blocking, with progress 0..1 overall.

    ``take``: which take to place (``"all"``: every take, stacked); ``handles``: extra frames either side, when
    the media has them. Returns the placements, the top track's first.
    """
    progress = progress or _noop
    work = Path(work_dir or default_work_dir())
    clip = clip or current_clip(resolve, track)
    progress(0.0, f"Clip: {clip.describe()}")
    frames = exr_frames(
        clip, work, resolve, progress=lambda f, m: progress(0.2 * f, m), cancel=cancel, handles=handles
    )
    if frames.rendered:  # in the project's output space, not a plate space the caller chose
        with _engine_sentences(client):
            offered = _offered_spaces(client.info(), str(options.get("model") or ""))
        colour = render_colour(_context(resolve).project, offered)
        if colour.engine_name:
            options = {**options, "colorspace": colour.engine_name}
        progress(0.2, f"Colour: {colour.note}")
    progress(0.2, f"Uploading {len(frames.paths)} frames to {client.address}")
    job_id = send_clip(client, clip, frames, options)
    final = follow_job(client, job_id, lambda f, m: progress(0.25 + 0.65 * f, m), cancel)
    out = results_folder(work, job_id)
    files = fetch_results(client, job_id, out, lambda f, m: progress(0.9 + 0.07 * f, m), final)
    progress(0.97, "Writing the clip mattes")
    mattes = {t: write_mattes(take_files, out / "matte") for t, take_files in results_by_take(files).items()}
    placed = place_takes(clip, files, take, resolve, mattes, frames.head, frames.tail,
                         str(options.get("colorspace") or ""))  # fmt: skip
    where = ", ".join(f"take {p.take} on V{p.track_index}" for p in placed)
    progress(1.0, f"Placed {placed[0].frames} frames: {where} (job {job_id})")
    return placed
