"""DaVinci Resolve adapter: send the clip under the playhead to a Vera Edit engine, stack the results above it.

A small set of plain functions that any UI can drive: the ``Vera Edit`` script's UIManager window
(``resolve_scripts/``), the standalone Qt panel (through Resolve's external scripting API, Studio only) or a
TD's own script::

    from vera_plugin.client import EngineClient
    from vera_plugin.hosts import resolve as vera_resolve

    clip = vera_resolve.current_clip()                      # the item under the playhead (top track), or track=N
    with EngineClient("gpu-box:50051") as engine:
        placed = vera_resolve.run_vera_edit(engine, {"prompt": "add a paper boat", "steps": 30}, clip=clip,
                                  progress=lambda f, msg: print(f"{f:4.0%} {msg}"))
    print(placed.track_index, placed.record_frame)

Steps, each its own function: :func:`current_clip` (which item, which frames), :func:`exr_frames` (the frames
as linear EXRs: the files themselves for an EXR sequence, else a render of the item's range through the
render queue, isolated to its track), :func:`send_clip` / :func:`follow_job` / :func:`fetch_results` (the
engine, through :class:`~vera_plugin.client.EngineClient`), :func:`place_results` (import into the "Vera" bin,
a new video track above, the item's record frame, the matte as a clip matte). The module never imports
Resolve: the Resolve object is passed in or found by :func:`get_resolve`. Resolve calls must run on the
thread that owns the script (the UI thread); only the engine steps may run on a worker thread.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vera_plugin.client import EngineClient, EngineError, state_name
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
    "ExrFrames",
    "ExrRender",
    "Placement",
    "ResolveClip",
    "ResolveError",
    "VeraCancelled",
    "current_clip",
    "default_work_dir",
    "describe_item",
    "exr_frames",
    "fetch_results",
    "follow_job",
    "get_resolve",
    "place_results",
    "run_vera_edit",
    "send_clip",
]

BIN_NAME = "Vera"
RESULT_PREFIX = "vera_edit."  # the engine's output file names: vera_edit.####.exr

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
    if os.path.basename(file_path).startswith(RESULT_PREFIX):
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


def current_clip(resolve: Any = None, track: int | None = None) -> ResolveClip:
    """The clip to edit: ``Timeline.GetCurrentVideoItem()`` (the top track's item under the playhead), or
    with ``track=N`` the item of video track N under the playhead."""
    ctx = _context(resolve)
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
    """The EXR file of every frame to send, in order, with the frame numbers the engine should see."""

    paths: list[str]
    frames: list[int]
    rendered: bool


class ExrRender:
    """One render of a clip's timeline range to an EXR sequence through Resolve's render queue.

    :meth:`start`, then :meth:`poll` until it returns ``True`` (a UI calls it from a timer), then
    :meth:`files`; :meth:`stop` cancels. The EXR format and codec are chosen from what this Resolve offers
    (:func:`~vera_plugin.hosts.resolve.timeline.choose_exr_codec`); every other video track is disabled during the
    render so the frames are the clip's own, and re-enabled afterwards.
    """

    def __init__(self, project: Any, clip: ResolveClip, target_dir: str | os.PathLike[str]) -> None:
        self.project = project
        self.clip = clip
        self.target_dir = Path(target_dir)
        self.job_id = ""
        self.codec = ""
        self.fraction = 0.0
        self._disabled: list[int] = []
        self._done = False

    def start(self) -> None:
        """Choose format and codec, isolate the track, queue the job and start rendering."""
        project, clip = self.project, self.clip
        try:
            fmt = choose_exr_format(project.GetRenderFormats() or {})
            description, codec = choose_exr_codec(project.GetRenderCodecs(fmt) or {})
        except ValueError as exc:
            raise ResolveError(f"cannot render {clip.describe()} to EXR: {exc}") from None
        if not project.SetCurrentRenderFormatAndCodec(fmt, codec):
            raise ResolveError(f"Resolve refused render format {fmt!r} with codec {description!r} ({codec})")
        self.codec = description
        project.SetCurrentRenderMode(1)  # single clip: one sequence for the range
        self.target_dir.mkdir(parents=True, exist_ok=True)
        name = f"vera_src_{uuid.uuid4().hex[:8]}"
        settings = render_settings(clip.range.record_start, clip.range.record_end, self.target_dir, name,
                                   clip.resolution)  # fmt: skip
        if not project.SetRenderSettings(settings):
            raise ResolveError(f"Resolve refused the render settings {settings}; check the Deliver page")
        self._isolate()
        try:
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
        timeline = self.clip.timeline
        for track in range(1, int(timeline.GetTrackCount("video") or 0) + 1):
            if (
                track != self.clip.track_index
                and timeline.GetIsTrackEnabled("video", track)
                and timeline.SetTrackEnable("video", track, False)
            ):
                self._disabled.append(track)

    def _cleanup(self) -> None:
        for track in self._disabled:
            self.clip.timeline.SetTrackEnable("video", track, True)
        self._disabled = []
        if self.job_id:
            self.project.DeleteRenderJob(self.job_id)

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

    def stop(self) -> None:
        """Cancel the render and undo the set-up."""
        self.project.StopRendering()
        self._cleanup()

    def files(self) -> list[str]:
        """The rendered frames in order (after :meth:`poll` returned ``True``); removes the queue job."""
        self._cleanup()
        files = [str(p) for p in numbered_files(self.target_dir, "exr")]
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
) -> ExrFrames:
    """The clip's frames as EXRs: its own files for an EXR sequence, else a blocking :class:`ExrRender`."""
    progress = progress or _noop
    if clip.reads_files_directly:
        assert clip.sequence is not None
        frames = clip.frames
        paths = [clip.sequence.path(f) for f in frames]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ResolveError(
                f"{len(missing)} frames of {clip.describe()} are missing on disk, first {missing[0]}"
            )
        return ExrFrames(paths, frames, rendered=False)
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


def send_clip(client: EngineClient, clip: ResolveClip, frames: ExrFrames, options: Mapping[str, Any]) -> str:
    """Submit the frames with ``options`` (``prompt`` plus JobHeader fields from the schema); the job id."""
    opts = {k: v for k, v in options.items() if v is not None}
    prompt = str(opts.pop("prompt", "") or "")
    if not prompt.strip():
        raise ResolveError("the prompt is empty; describe the edit, e.g. 'add a paper boat drifting left'")
    opts.setdefault("name", clip.name)
    return client.submit_files(frames.paths, frames.frames, prompt=prompt, **opts)


def follow_job(
    client: EngineClient,
    job_id: str,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> pb.JobStatus:
    """Watch ``job_id`` to the end with progress; cancels it on the engine when ``cancel`` is set."""
    progress = progress or _noop
    final: pb.JobStatus | None = None
    for status in client.watch(job_id):
        final = status
        if status.state == pb.JOB_STATE_QUEUED:
            progress(0.0, f"Queued on the engine ({status.queue_position} ahead)")
        elif status.state == pb.JOB_STATE_RUNNING:
            steps = f" step {status.step}/{status.total_steps}" if status.total_steps else ""
            progress(status.progress, f"Engine: {status.stage_detail or 'running'}{steps}")
        # A UI may also call client.cancel(job_id) itself: the watch then ends CANCELLED (below).
        if _cancelled(cancel):
            client.cancel(job_id, ended_ok=True)
            raise VeraCancelled(f"cancelled job {job_id} on the engine")
    if final is None:
        raise EngineError("UNAVAILABLE", f"job {job_id}: the engine sent no status", client.address)
    if final.state == pb.JOB_STATE_CANCELLED:
        raise VeraCancelled(f"job {job_id} was cancelled on the engine")
    if final.state != pb.JOB_STATE_SUCCEEDED:
        raise ResolveError(
            f"the engine's job {job_id} {state_name(final.state)}: {final.error or 'no reason given'}"
        )
    return final


def fetch_results(
    client: EngineClient, job_id: str, out_dir: str | os.PathLike[str], progress: ProgressFn | None = None
) -> list[Path]:
    """Download a finished job's EXRs into ``out_dir``."""
    progress = progress or _noop
    return client.fetch(
        job_id, out_dir, progress=lambda i, n, name: progress(i / max(n, 1), f"Fetched {name} ({i}/{n})")
    )


# ---------------------------------------------------------------------------------------------------------
# Results on the timeline


@dataclass(frozen=True)
class Placement:
    """Where the results went: the media pool clip, the timeline item, its track and record frame."""

    media_pool_item: Any
    timeline_item: Any
    track_index: int
    record_frame: int
    frames: int
    matte_attached: bool
    sequence: SequencePath


def _vera_bin(media_pool: Any, name: str) -> Any:
    root = media_pool.GetRootFolder()
    for folder in root.GetSubFolderList() or []:
        if folder.GetName() == name:
            return folder
    folder = media_pool.AddSubFolder(root, name)
    if not folder:
        raise ResolveError(f"Resolve did not create the media pool bin {name!r}; is the project read-only?")
    return folder


def place_results(
    clip: ResolveClip,
    files: list[Path] | list[str],
    resolve: Any = None,
    bin_name: str = BIN_NAME,
    track_name: str = "Vera",
    mattes: list[Path] | None = None,
) -> Placement:
    """Import ``files`` (one EXR per frame of ``clip``) into the bin ``bin_name`` and place them on a new
    video track above ``clip`` at its record frame; ``mattes`` (from
    :func:`~vera_plugin.hosts.resolve.matte.write_mattes`) are attached to the imported clip as its clip matte."""
    ctx = _context(resolve)
    sequence = sequence_from_files([str(f) for f in files])
    count = sequence.last - sequence.first + 1
    if [sequence.first, sequence.last] != [clip.frames[0], clip.frames[-1]]:
        raise ResolveError(
            f"results {sequence.pattern} hold frames {sequence.first}-{sequence.last}, but {clip.describe()} "
            f"was sent as {clip.frames[0]}-{clip.frames[-1]}; fetch the job again"
        )
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

    before = int(clip.timeline.GetTrackCount("video") or 0)
    if not clip.timeline.AddTrack("video") or int(clip.timeline.GetTrackCount("video") or 0) != before + 1:
        raise ResolveError(f"Resolve did not add a video track to {clip.timeline_name!r}; is it locked?")
    track = before + 1  # AddTrack appends on top: above the source, whatever track it is on
    clip.timeline.SetTrackName("video", track, track_name)

    # startFrame/endFrame count from the media pool item's first frame (0), whatever its frame numbers.
    info = append_clip_info(media, 0, count, track, clip.range.record_start)
    placed = media_pool.AppendToTimeline([info])
    if not placed:
        # Builds that read endFrame inclusively refuse a range one past the media's end: ask again so.
        info["endFrame"] -= 1
        placed = media_pool.AppendToTimeline([info])
    item = placed[0] if placed else None
    if not item:
        raise ResolveError(
            f"Resolve did not place {sequence.pattern} on V{track} at {frame_to_timecode(clip.range.record_start, clip.fps)}"
        )
    if (int(item.GetStart()), int(item.GetDuration())) != (clip.range.record_start, count):
        raise ResolveError(
            f"Resolve placed the results at frame {item.GetStart()} for {item.GetDuration()} frames; expected "
            f"{clip.range.record_start} for {count} (move the clip on V{track} to line it up)"
        )
    storage = ctx.resolve.GetMediaStorage()
    matte = bool(mattes and storage and storage.AddClipMattesToMediaPool(media, [str(m) for m in mattes]))
    return Placement(media, item, track, clip.range.record_start, count, matte, sequence)


# ---------------------------------------------------------------------------------------------------------
# The whole thing


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
) -> Placement:
    """Current clip -> EXRs -> engine -> results on a new track, blocking, with progress 0..1 overall."""
    progress = progress or _noop
    work = Path(work_dir or default_work_dir())
    clip = clip or current_clip(resolve, track)
    progress(0.0, f"Clip: {clip.describe()}")
    frames = exr_frames(clip, work, resolve, progress=lambda f, m: progress(0.2 * f, m), cancel=cancel)
    progress(0.2, f"Uploading {len(frames.paths)} frames to {client.address}")
    job_id = send_clip(client, clip, frames, options)
    follow_job(client, job_id, lambda f, m: progress(0.25 + 0.65 * f, m), cancel)
    files = fetch_results(client, job_id, work / "results" / job_id, lambda f, m: progress(0.9 + 0.07 * f, m))
    progress(0.97, "Writing the clip mattes")
    mattes = write_mattes(files, work / "results" / job_id / "matte")
    placed = place_results(clip, files, resolve, mattes=mattes)
    progress(1.0, f"Placed {placed.frames} frames on V{placed.track_index} (job {job_id})")
    return placed
