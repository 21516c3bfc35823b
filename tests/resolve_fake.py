"""A fake of the DaVinci Resolve scripting object model, for testing ``vera_plugin.hosts.resolve`` (test-only).

It implements the documented calls the adapter uses, with the signatures and return conventions of the
scripting README (``Developer/Scripting/README.txt`` shipped with Resolve; the v19/v20 text is mirrored in
many public repositories): Resolve, ProjectManager, Project (render queue), MediaStorage, MediaPool, Folder,
MediaPoolItem, Timeline, TimelineItem. Failures are reported the way Resolve reports them, with ``False``,
``None``, ``""`` or ``[]`` instead of exceptions, so the adapter's checks are exercised.

Modelled quirks, each with where it is documented:

1. ``TimelineItem.GetEnd()`` is exclusive: ``GetEnd() - GetStart() == GetDuration()`` (README lists
   ``GetStart``/``GetEnd``/``GetDuration`` as positions and length; the exclusive end is what scripts that
   place clips end to end rely on, e.g. "GetEnd() is exclusive ... the next recordFrame is exactly GetEnd()").
2. ``MediaPool.AppendToTimeline`` clip infos: ``endFrame`` is exclusive (placed duration = ``endFrame -
   startFrame``, "verified live: startFrame 0, endFrame 105 gives a 105-frame clip"); some older builds
   treated it as inclusive, which ``end_frame_inclusive=True`` reproduces so the adapter's self-check is
   tested. ``startFrame``/``endFrame`` are offsets into the media pool item; ``recordFrame`` is in the
   timeline clock; ``trackIndex`` is 1-based; ``mediaType`` 1 = video only.
3. ``Timeline.GetCurrentVideoItem()`` returns the item of the *topmost* video track under the playhead,
   whatever track the user selected (README: "Returns the current video timeline item"; it is the item the
   Color page shows, i.e. the top one). Scripts that want another track must find the item themselves.
4. Timeline positions are absolute: a timeline starting at 01:00:00:00 at 24 fps has ``GetStartFrame()``
   86400, and ``GetCurrentTimecode()`` is the playhead in that clock (README: GetStartFrame, GetStartTimecode,
   GetCurrentTimecode).
5. An image sequence's ``GetClipProperty("File Path")`` is ``/dir/name.[1001-1003].exr`` (the form Resolve
   shows and pipeline integrations such as OpenPype's ``get_reformated_path`` parse); ``ImportMedia`` takes
   ``[{"FilePath": "name.%04d.exr", "StartIndex": 1001, "EndIndex": 1003}]`` (README example) and returns
   ``[]`` if the files are not there.
6. ``GetRenderFormats()`` maps format -> extension, ``GetRenderCodecs(format)`` codec description -> codec
   name; ``AddRenderJob()`` snapshots the current settings and returns a job id string (``""`` when no
   target folder is set); rendering is asynchronous: ``IsRenderingInProgress()`` stays ``True`` while frames
   are written, ``GetRenderJobStatus(id)`` returns ``{"JobStatus": "Rendering"|"Complete"|"Cancelled",
   "CompletionPercentage": n}``; ``MarkIn``/``MarkOut`` are inclusive timeline frames. Single-clip mode
   renders what the timeline shows (the top enabled track), so the adapter must isolate the source track.
   The output file naming (``<CustomName>_<8-digit frame>.exr``) is this fake's choice; the adapter does not
   rely on it (it orders the files by their frame number).
7. ``MediaStorage.AddClipMattesToMediaPool(item, [paths], stereoEye)`` returns ``True`` if the mattes were
   added (README); ``MediaPool.GetClipMatteList(item)`` lists their paths.

Pixels: a "rendered" or imported frame of media ``m`` at media frame ``f`` is an RGB image with R = media
id, G = :func:`frame_code` (f), B = 0.25, so the frames an engine received can be told apart exactly (even as
half floats, and after compositing).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.imaging.exr import write_exr
from vera_plugin.hosts.resolve.timeline import frame_to_timecode, parse_sequence_path, timecode_to_frame

FAKE_SIZE = (24, 16)  # width, height of every fake frame (the engine takes 16 px and up)


def frame_code(media_frame: int) -> float:
    """The green value of a fake frame: 16 frames apart before it repeats, 0.5 between neighbours."""
    return (media_frame % 16) / 2


def media_pixels(media_id: int, media_frame: int, size: tuple[int, int] = FAKE_SIZE) -> np.ndarray:
    """The fake content of one media frame (see the module docstring)."""
    width, height = size
    rgb = np.empty((height, width, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = media_id, frame_code(media_frame), 0.25
    return rgb


class FakeMediaPoolItem:
    """A clip in the media pool: an EXR sequence on disk, or a movie whose frames the render queue invents."""

    _ids = 0

    def __init__(
        self, name: str, file_path: str, frames: int, fps: float, first_frame: int = 0, size=FAKE_SIZE
    ) -> None:
        FakeMediaPoolItem._ids += 1
        self.media_id = FakeMediaPoolItem._ids
        self.name = name
        self.file_path = file_path
        self.frames = frames
        self.fps = fps
        self.first_frame = first_frame  # number of the first file of a sequence (0 for movies)
        self.size = size
        self.mattes: list[str] = []

    def GetName(self) -> str:
        return self.name

    def GetMediaId(self) -> str:
        return f"media-{self.media_id}"

    def GetUniqueId(self) -> str:
        return f"mpi-{self.media_id}"

    def GetClipProperty(self, name: str | None = None) -> Any:
        props = {
            "Clip Name": self.name,
            "File Path": self.file_path,
            "File Name": os.path.basename(self.file_path),
            "Start": "0",
            "End": str(self.frames - 1),
            "Frames": str(self.frames),
            "FPS": f"{self.fps:g}",
            "Resolution": f"{self.size[0]}x{self.size[1]}",
            "Start TC": frame_to_timecode(self.first_frame, self.fps),
            "Type": "Video",
        }
        if not name:
            return props
        return props.get(name, "")  # README: an invalid key returns a trivial result

    def media_frame(self, offset: int) -> int:
        """The media frame number at ``offset`` frames from the clip's first frame."""
        return self.first_frame + offset


class FakeFolder:
    """A media pool bin."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clips: list[FakeMediaPoolItem] = []
        self.subfolders: list[FakeFolder] = []

    def GetName(self) -> str:
        return self.name

    def GetClipList(self) -> list[FakeMediaPoolItem]:
        return list(self.clips)

    def GetSubFolderList(self) -> list[FakeFolder]:
        return list(self.subfolders)

    def GetUniqueId(self) -> str:
        return f"folder-{id(self)}"


class FakeTimelineItem:
    """A clip on a timeline track (quirk 1: ``GetEnd`` exclusive)."""

    def __init__(
        self, media: FakeMediaPoolItem, track: int, start: int, duration: int, left_offset: int
    ) -> None:
        self.media, self.track = media, track
        self.start, self.duration, self.left_offset = start, duration, left_offset
        self.speed = 1.0  # a retimed clip shows media frames at this rate (Clip Attributes ▸ speed)

    def GetName(self) -> str:
        return self.media.name

    def GetStart(self, subframe_precision: bool = False) -> int:
        return self.start

    def GetEnd(self, subframe_precision: bool = False) -> int:
        return self.start + self.duration

    def GetDuration(self, subframe_precision: bool = False) -> int:
        return self.duration

    def GetLeftOffset(self, subframe_precision: bool = False) -> int:
        return self.left_offset

    def GetRightOffset(self, subframe_precision: bool = False) -> int:
        return self.media.frames - self.left_offset - self.duration

    def GetSourceStartFrame(self) -> int:
        return self.left_offset

    def GetSourceEndFrame(self) -> int:
        return self.left_offset + round(self.duration * self.speed)

    def GetMediaPoolItem(self) -> FakeMediaPoolItem:
        return self.media

    def GetTrackTypeAndIndex(self) -> list[Any]:
        return ["video", self.track]


class FakeTimeline:
    """A timeline with video tracks, a playhead and Resolve's absolute frame clock (quirks 3 and 4)."""

    def __init__(self, name: str, fps: float = 24.0, start_timecode: str = "01:00:00:00") -> None:
        self.name, self.fps = name, fps
        self.start_frame = timecode_to_frame(start_timecode, fps)
        self.tracks: list[list[FakeTimelineItem]] = [[]]  # one video track, like a new timeline
        self.track_names = ["Video 1"]
        self.enabled = [True]
        self.playhead = self.start_frame

    # -- test set-up -------------------------------------------------------------------------------------
    def add_item(self, media: FakeMediaPoolItem, track: int, start: int, duration: int, left_offset: int = 0):
        """Put ``media`` on video track ``track`` (created as needed) at timeline frame ``start``."""
        while self.GetTrackCount("video") < track:
            self.AddTrack("video")
        item = FakeTimelineItem(media, track, start, duration, left_offset)
        self.tracks[track - 1].append(item)
        return item

    def item_at(self, track: int, frame: int) -> FakeTimelineItem | None:
        """The item of ``track`` covering timeline ``frame``."""
        return next((i for i in self.tracks[track - 1] if i.start <= frame < i.start + i.duration), None)

    # -- documented API ----------------------------------------------------------------------------------
    def GetName(self) -> str:
        return self.name

    def GetStartFrame(self) -> int:
        return self.start_frame

    def GetEndFrame(self) -> int:
        ends = [i.start + i.duration for track in self.tracks for i in track]
        return max(ends, default=self.start_frame)

    def GetStartTimecode(self) -> str:
        return frame_to_timecode(self.start_frame, self.fps)

    def GetSetting(self, name: str | None = None) -> Any:
        settings = {"timelineFrameRate": f"{self.fps:g}", "timelineDropFrameTimecode": "0"}
        return settings if not name else settings.get(name, "")

    def GetTrackCount(self, track_type: str) -> int:
        return len(self.tracks) if track_type == "video" else 0

    def AddTrack(self, track_type: str, sub_track_type: Any = None) -> bool:
        if track_type != "video":
            return False
        self.tracks.append([])
        self.track_names.append(f"Video {len(self.tracks)}")
        self.enabled.append(True)
        return True

    def GetTrackName(self, track_type: str, index: int) -> str:
        return self.track_names[index - 1] if track_type == "video" and 1 <= index <= len(self.tracks) else ""

    def SetTrackName(self, track_type: str, index: int, name: str) -> bool:
        if track_type != "video" or not 1 <= index <= len(self.tracks):
            return False
        self.track_names[index - 1] = name
        return True

    def GetIsTrackEnabled(self, track_type: str, index: int) -> bool:
        return track_type == "video" and 1 <= index <= len(self.tracks) and self.enabled[index - 1]

    def SetTrackEnable(self, track_type: str, index: int, enabled: bool) -> bool:
        if track_type != "video" or not 1 <= index <= len(self.tracks):
            return False
        self.enabled[index - 1] = bool(enabled)
        return True

    def GetItemListInTrack(self, track_type: str, index: int) -> list[FakeTimelineItem] | None:
        if track_type != "video" or not 1 <= index <= len(self.tracks):
            return None
        return sorted(self.tracks[index - 1], key=lambda i: i.start)

    def GetCurrentTimecode(self) -> str:
        return frame_to_timecode(self.playhead, self.fps)

    def SetCurrentTimecode(self, timecode: str) -> bool:
        try:
            self.playhead = timecode_to_frame(timecode, self.fps)
        except ValueError:
            return False
        return True

    def GetCurrentVideoItem(self) -> FakeTimelineItem | None:
        for track in range(len(self.tracks), 0, -1):  # quirk 3: the topmost track wins
            item = self.item_at(track, self.playhead)
            if item is not None:
                return item
        return None

    def DeleteClips(self, items: list[FakeTimelineItem], ripple: bool = False) -> bool:
        for item in items:
            self.tracks[item.track - 1].remove(item)
        return True


class FakeMediaPool:
    """The media pool: bins, import and placing clips on the current timeline (quirks 2 and 5)."""

    def __init__(self, project: FakeProject) -> None:
        self.project = project
        self.root = FakeFolder("Master")
        self.current = self.root
        self.end_frame_inclusive = False  # quirk 2 on builds that read endFrame inclusively
        self.append_calls: list[list[dict[str, Any]]] = []

    # -- test set-up -------------------------------------------------------------------------------------
    def add_exr_sequence(self, directory: Path, name: str, first: int, last: int) -> FakeMediaPoolItem:
        """Write ``name.####.exr`` frames ``first..last`` to ``directory`` and add them as one clip."""
        directory.mkdir(parents=True, exist_ok=True)
        fps = self.project.timeline.fps
        shown = f"{name}.[{first:04d}-{last:04d}].exr"  # Resolve names a sequence clip like its files
        item = FakeMediaPoolItem(shown, str(directory / shown), last - first + 1, fps, first)
        for frame in range(first, last + 1):
            write_exr(directory / f"{name}.{frame:04d}.exr", media_pixels(item.media_id, frame), "RGB")
        self.root.clips.append(item)
        return item

    def add_movie(self, path: str, frames: int) -> FakeMediaPoolItem:
        """A movie clip (its pixels exist only through the render queue)."""
        item = FakeMediaPoolItem(os.path.basename(path), path, frames, self.project.timeline.fps)
        self.root.clips.append(item)
        return item

    # -- documented API ----------------------------------------------------------------------------------
    def GetRootFolder(self) -> FakeFolder:
        return self.root

    def AddSubFolder(self, folder: FakeFolder, name: str) -> FakeFolder | None:
        if not name:
            return None
        sub = FakeFolder(name)
        folder.subfolders.append(sub)
        return sub

    def GetCurrentFolder(self) -> FakeFolder:
        return self.current

    def SetCurrentFolder(self, folder: FakeFolder) -> bool:
        if not isinstance(folder, FakeFolder):
            return False
        self.current = folder
        return True

    def ImportMedia(self, items: list[Any]) -> list[FakeMediaPoolItem]:
        created = []
        for info in items:
            if not isinstance(info, dict) or set(info) != {"FilePath", "StartIndex", "EndIndex"}:
                return []  # this fake only models the clipInfo form the adapter uses
            pattern, first, last = info["FilePath"], int(info["StartIndex"]), int(info["EndIndex"])
            paths = [pattern % f for f in range(first, last + 1)]
            if not paths or not all(os.path.isfile(p) for p in paths):
                return []
            width = len(re.search(r"%0?(\d*)d", pattern).group(1) or "0") or 1
            shown = re.sub(r"%0?\d*d", f"[{first:0{int(width)}d}-{last:0{int(width)}d}]", pattern)
            item = FakeMediaPoolItem(
                os.path.basename(shown), shown, len(paths), self.project.timeline.fps, first
            )
            self.current.clips.append(item)
            created.append(item)
        return created

    def AppendToTimeline(self, infos: list[Any]) -> list[FakeTimelineItem]:
        self.append_calls.append([dict(i) for i in infos])
        timeline = self.project.timeline
        placed = []
        for info in infos:
            media = info.get("mediaPoolItem")
            track = int(info.get("trackIndex", 1))
            start, end = int(info.get("startFrame", 0)), int(info.get("endFrame", 0))
            if self.end_frame_inclusive:
                end += 1
            record = int(info.get("recordFrame", timeline.GetEndFrame()))
            if (
                not isinstance(media, FakeMediaPoolItem)
                or info.get("mediaType", 1) != 1
                or not 1 <= track <= timeline.GetTrackCount("video")
                or not 0 <= start < end <= media.frames
            ):
                return []
            duration = end - start
            if any(timeline.item_at(track, f) for f in range(record, record + duration)):
                return []  # the track is occupied there; Resolve refuses rather than overwrite
            placed.append(timeline.add_item(media, track, record, duration, start))
        return placed

    def GetClipMatteList(self, item: FakeMediaPoolItem) -> list[str]:
        return list(item.mattes)


class FakeMediaStorage:
    """Media storage: only the clip matte call the adapter uses (quirk 7)."""

    def AddClipMattesToMediaPool(self, item: Any, paths: list[str], stereo_eye: str = "") -> bool:
        if not isinstance(item, FakeMediaPoolItem) or not paths or not all(os.path.isfile(p) for p in paths):
            return False
        item.mattes.extend(paths)
        return True


class FakeProject:
    """A project: its media pool, one current timeline and the render queue (quirk 6)."""

    RENDER_FORMATS = {"QuickTime": "mov", "MP4": "mp4", "OpenEXR": "exr", "DPX": "dpx"}
    EXR_CODECS = {
        "RGB Half (DWAA)": "RGBHalfDWAA",
        "RGB Float (No compression)": "RGBFloat",
        "RGB Half (PIZ)": "RGBHalfPIZ",
        "RGB Half (ZIP)": "RGBHalfZIP",
    }

    def __init__(self, timeline: FakeTimeline) -> None:
        self.timeline = timeline
        self.media_pool = FakeMediaPool(self)
        self.settings: dict[str, Any] = {}
        self.format_codec = {"format": "QuickTime", "codec": "H264"}
        self.render_mode = 0
        self.jobs: dict[str, dict[str, Any]] = {}
        self.rendering: list[str] = []
        self.render_calls: list[str] = []
        self.formats = dict(self.RENDER_FORMATS)

    def GetName(self) -> str:
        return "Vera test project"

    def GetMediaPool(self) -> FakeMediaPool:
        return self.media_pool

    def GetCurrentTimeline(self) -> FakeTimeline:
        return self.timeline

    def GetSetting(self, name: str | None = None) -> Any:
        return self.timeline.GetSetting(name)

    def GetRenderFormats(self) -> dict[str, str]:
        return dict(self.formats)

    def GetRenderCodecs(self, render_format: str) -> dict[str, str]:
        if render_format == "OpenEXR" and render_format in self.formats:
            return dict(self.EXR_CODECS)
        return {"H.264": "H264"} if render_format in self.formats else {}

    def SetCurrentRenderFormatAndCodec(self, render_format: str, codec: str) -> bool:
        if codec not in self.GetRenderCodecs(render_format).values():
            return False
        self.format_codec = {"format": render_format, "codec": codec}
        return True

    def GetCurrentRenderFormatAndCodec(self) -> dict[str, str]:
        return dict(self.format_codec)

    def SetCurrentRenderMode(self, mode: int) -> bool:
        if mode not in (0, 1):
            return False
        self.render_mode = mode
        return True

    def GetCurrentRenderMode(self) -> int:
        return self.render_mode

    def SetRenderSettings(self, settings: dict[str, Any]) -> bool:
        known = {"SelectAllFrames", "MarkIn", "MarkOut", "TargetDir", "CustomName", "ExportVideo",
                 "ExportAudio", "FormatWidth", "FormatHeight", "FrameRate", "ColorSpaceTag", "GammaTag"}  # fmt: skip
        if not set(settings) <= known:
            return False
        self.settings.update(settings)
        return True

    def AddRenderJob(self) -> str:
        if not self.settings.get("TargetDir"):
            return ""
        job_id = f"job-{len(self.jobs) + 1}"
        start, end = int(self.settings["MarkIn"]), int(self.settings["MarkOut"])
        self.jobs[job_id] = {
            "settings": dict(self.settings),
            **self.format_codec,
            "mode": self.render_mode,
            "frames": list(range(start, end + 1)),  # quirk 6: MarkOut inclusive
            "done": 0,
            "status": "Ready",
        }
        return job_id

    def DeleteRenderJob(self, job_id: str) -> bool:
        if job_id not in self.jobs or job_id in self.rendering:
            return False
        del self.jobs[job_id]
        return True

    def GetRenderJobList(self) -> list[dict[str, Any]]:
        return [{"JobId": k, "TargetDir": v["settings"]["TargetDir"]} for k, v in self.jobs.items()]

    def StartRendering(self, *args: Any, isInteractiveMode: bool = False) -> bool:
        ids = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        if not ids or not all(i in self.jobs for i in ids):
            return False
        for i in ids:
            self.jobs[i]["status"] = "Rendering"
        self.rendering = ids
        self.render_calls.extend(ids)
        return True

    def _advance(self) -> None:
        # One frame per query: rendering takes "time", so progress and cancellation can be observed.
        if not self.rendering:
            return
        job = self.jobs[self.rendering[0]]
        frame = job["frames"][job["done"]]
        self._render_frame(job, frame)
        job["done"] += 1
        if job["done"] == len(job["frames"]):
            job["status"] = "Complete"
            self.rendering.pop(0)

    def _render_frame(self, job: dict[str, Any], frame: int) -> None:
        timeline = self.timeline
        # Single-clip mode renders what the viewer shows: the topmost enabled track with an item.
        item = next(
            (
                timeline.item_at(t, frame)
                for t in range(timeline.GetTrackCount("video"), 0, -1)
                if timeline.enabled[t - 1] and timeline.item_at(t, frame) is not None
            ),
            None,
        )
        settings = job["settings"]
        size = (
            int(settings.get("FormatWidth", FAKE_SIZE[0])),
            int(settings.get("FormatHeight", FAKE_SIZE[1])),
        )
        if item is None:
            pixels = np.zeros((size[1], size[0], 3), np.float32)
        else:
            offset = item.left_offset + int((frame - item.start) * item.speed)
            pixels = media_pixels(item.media.media_id, item.media.media_frame(offset), size)
        ext = self.formats[job["format"]]
        out = Path(settings["TargetDir"]) / f"{settings['CustomName']}_{frame:08d}.{ext}"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_exr(out, pixels, "RGB", pixel_type="half" if "Half" in job["codec"] else "float")

    def IsRenderingInProgress(self) -> bool:
        self._advance()
        return bool(self.rendering)

    def GetRenderJobStatus(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            return {}
        return {
            "JobStatus": job["status"],
            "CompletionPercentage": int(100 * job["done"] / len(job["frames"])),
        }

    def StopRendering(self) -> None:
        for job_id in self.rendering:
            self.jobs[job_id]["status"] = "Cancelled"
        self.rendering = []


class FakeProjectManager:
    """The project manager: one open project."""

    def __init__(self, project: FakeProject) -> None:
        self.project = project

    def GetCurrentProject(self) -> FakeProject:
        return self.project


class FakeResolve:
    """``resolve``: the scripting entry point (``bmd.scriptapp("Resolve")`` in a real Resolve)."""

    def __init__(self, fps: float = 24.0, start_timecode: str = "01:00:00:00") -> None:
        self.project = FakeProject(FakeTimeline("Edit 1", fps, start_timecode))
        self.manager = FakeProjectManager(self.project)
        self.storage = FakeMediaStorage()

    @property
    def timeline(self) -> FakeTimeline:
        """The current timeline (test shortcut)."""
        return self.project.timeline

    @property
    def media_pool(self) -> FakeMediaPool:
        """The media pool (test shortcut)."""
        return self.project.media_pool

    def GetProjectManager(self) -> FakeProjectManager:
        return self.manager

    def GetMediaStorage(self) -> FakeMediaStorage:
        return self.storage

    def GetProductName(self) -> str:
        return "DaVinci Resolve Studio"

    def GetVersionString(self) -> str:
        return "19.1.0.0"


def parse_shown_path(item: FakeMediaPoolItem) -> tuple[str, int, int]:
    """``(pattern, first, last)`` of an imported sequence clip (test helper)."""
    seq = parse_sequence_path(item.file_path)
    assert seq is not None, item.file_path
    return seq.pattern, seq.first, seq.last


# ---------------------------------------------------------------------------------------------------------
# Fusion's UIManager (``fusion.UIManager``) and ``bmd.UIDispatcher``, as the Vera Edit window uses them:
# widgets are made by calling ``ui.<Kind>({props}, [children])``, a window by ``dispatcher.AddWindow({props},
# layout)``; ``window.GetItems()`` maps IDs to widgets; handlers are assigned as ``window.On.<ID>.<Event>``
# (or ``On[ID]``); ``ui.Timer({"ID", "Interval"})`` fires ``dispatcher.On[ID].Timeout``. A test plays the
# user by setting widget properties and calling the handlers; ``RunLoop`` returns at once.


class FakeWidget:
    """A UIManager widget: its properties are plain attributes (``Text``, ``PlainText``, ``Value`` ...)."""

    def __init__(self, kind: str, props: dict[str, Any] | None, children: list[Any] | None) -> None:
        self.kind, self.children = kind, list(children or [])
        self.Text, self.PlainText, self.Checked, self.Value = "", "", False, 0
        self.Enabled, self.CurrentIndex, self.ID = True, 0, ""
        self.items: list[str] = []
        for key, value in (props or {}).items():
            setattr(self, key, value)

    @property
    def CurrentText(self) -> str:
        return self.items[self.CurrentIndex] if 0 <= self.CurrentIndex < len(self.items) else ""

    def AddItem(self, text: str) -> None:
        self.items.append(str(text))

    def AddItems(self, texts: list[str]) -> None:
        self.items.extend(str(t) for t in texts)

    def Clear(self) -> None:
        self.items, self.CurrentIndex = [], 0

    def walk(self):
        """This widget and everything inside it."""
        yield self
        for child in self.children:
            yield from child.walk()


class _Handlers:
    """``On.<ID>``: event name -> handler, assigned as attributes."""


class FakeOn:
    """``window.On`` / ``dispatcher.On``."""

    def __init__(self) -> None:
        self._ids: dict[str, _Handlers] = {}

    def __getattr__(self, name: str) -> _Handlers:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._ids.setdefault(name, _Handlers())

    def __getitem__(self, name: str) -> _Handlers:
        return self._ids.setdefault(name, _Handlers())


class FakeTimer:
    """``ui.Timer``."""

    def __init__(self, props: dict[str, Any]) -> None:
        self.ID, self.Interval, self.active = props.get("ID", ""), props.get("Interval", 0), False

    def Start(self) -> None:
        self.active = True

    def Stop(self) -> None:
        self.active = False


class FakeUI:
    """``fusion.UIManager``: any ``ui.<Kind>(...)`` makes a widget of that kind."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def Timer(self, props: dict[str, Any]) -> FakeTimer:
        timer = FakeTimer(props)
        self.timers.append(timer)
        return timer

    def __getattr__(self, kind: str):
        if kind.startswith("_"):
            raise AttributeError(kind)

        def make(*args: Any) -> FakeWidget:
            props = next((a for a in args if isinstance(a, dict)), None)
            children = next((a for a in args if isinstance(a, list)), None)
            return FakeWidget(kind, props, children)

        return make


class FakeWindow:
    """A window made by ``dispatcher.AddWindow``."""

    def __init__(self, props: dict[str, Any], layout: FakeWidget) -> None:
        self.props, self.layout, self.On, self.shown = props, layout, FakeOn(), False

    def GetItems(self) -> dict[str, FakeWidget]:
        return {w.ID: w for w in self.layout.walk() if w.ID}

    def Show(self) -> None:
        self.shown = True

    def Hide(self) -> None:
        self.shown = False


class FakeDispatcher:
    """``bmd.UIDispatcher(ui)``."""

    def __init__(self, ui: FakeUI) -> None:
        self.ui, self.On, self.windows, self.loops, self.exited = ui, FakeOn(), [], 0, False

    def AddWindow(self, props: dict[str, Any], layout: FakeWidget) -> FakeWindow:
        window = FakeWindow(props, layout)
        self.windows.append(window)
        return window

    def RunLoop(self) -> None:
        self.loops += 1

    def ExitLoop(self) -> None:
        self.exited = True


class FakeFusion:
    """``fusion`` (``resolve.Fusion()``): only its UIManager."""

    def __init__(self) -> None:
        self.UIManager = FakeUI()


class FakeBmd:
    """``bmd``: only ``UIDispatcher``."""

    def __init__(self) -> None:
        self.dispatchers: list[FakeDispatcher] = []

    def UIDispatcher(self, ui: FakeUI) -> FakeDispatcher:
        dispatcher = FakeDispatcher(ui)
        self.dispatchers.append(dispatcher)
        return dispatcher
