"""Timeline arithmetic for the DaVinci Resolve adapter: timecodes, frame ranges, sequence paths, render choices.

Plain functions and small dataclasses with no Resolve import, so they run (and are tested) anywhere. The
conventions they encode, all from the Resolve scripting README or checked against it:

- Timeline positions (``TimelineItem.GetStart()``, ``Timeline.GetStartFrame()``) are absolute frame numbers:
  a timeline starting at ``01:00:00:00`` at 24 fps starts at frame 86400, and ``GetCurrentTimecode()`` is the
  playhead in that same clock.
- ``TimelineItem.GetEnd()`` is exclusive: ``GetEnd() - GetStart() == GetDuration()``.
- ``MediaPool.AppendToTimeline`` clip infos address the media in its own frame numbers, those of
  ``GetClipProperty("Start")``/``"End"`` (1001... for an EXR sequence, 86400... for frames Resolve rendered),
  ``recordFrame`` is in the timeline clock and ``trackIndex`` 1-based. Builds differ on whether ``endFrame`` is
  inclusive: the adapter places, reads the placed item back and places again the other way when it must.
- An image sequence's ``GetClipProperty("File Path")`` reads ``/shots/plate.[1001-1100].exr``.
- ``Project.GetRenderFormats()`` maps a format's display name -> its file extension; ``GetRenderCodecs`` and
  ``SetCurrentRenderFormatAndCodec`` take that extension (``"exr"``). Formats and codecs vary by version and
  licence, so they are queried, never assumed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ClipRange",
    "SequencePath",
    "append_clip_info",
    "choose_exr_codec",
    "choose_exr_format",
    "frame_to_timecode",
    "import_clip_info",
    "item_at_frame",
    "numbered_files",
    "parse_frame_rate",
    "parse_resolution",
    "parse_sequence_path",
    "render_settings",
    "sequence_from_files",
    "timecode_to_frame",
]


# ---------------------------------------------------------------------------------------------------------
# Frame rates and timecode


def parse_frame_rate(value: str | float | int) -> tuple[float, bool]:
    """``"23.976"`` -> ``(23.976, False)``; ``"29.97 DF"`` -> ``(29.97, True)``: a rate setting and its drop flag."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate, drop = float(value), False
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(DF|NDF)?\s*", str(value), re.IGNORECASE)
        if not match:
            raise ValueError(
                f"frame rate {value!r} is not a number like '24', '23.976' or '29.97 DF'; "
                "check the timeline's 'timelineFrameRate' setting"
            )
        rate, drop = float(match.group(1)), (match.group(2) or "").upper() == "DF"
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"frame rate {value!r} must be a positive number of frames per second")
    return rate, drop


def _drop_frames(fps: float) -> tuple[int, int]:
    nominal = round(fps)
    if nominal not in (30, 60) or abs(fps - nominal * 1000 / 1001) > 0.01:
        raise ValueError(
            f"drop-frame timecode exists only at 29.97 and 59.94 fps, not {fps:g}; "
            "use a non-drop timecode (':' before the frames)"
        )
    return nominal, nominal // 15  # frames dropped per minute: 2 at 29.97, 4 at 59.94


def timecode_to_frame(timecode: str, fps: float, drop_frame: bool | None = None) -> int:
    """``"01:00:00:00"`` at 24 fps -> 86400. ``drop_frame=None`` reads it from the separator (``;`` = drop)."""
    match = re.fullmatch(r"\s*(\d{1,3}):(\d{2}):(\d{2})([:;.,])(\d{2,3})\s*", str(timecode))
    if not match:
        raise ValueError(f"timecode {timecode!r} is not HH:MM:SS:FF (or HH:MM:SS;FF for drop frame)")
    hours, minutes, seconds, sep, frames = match.groups()
    h, m, s, f = int(hours), int(minutes), int(seconds), int(frames)
    drop = sep in ";.," if drop_frame is None else drop_frame
    nominal = round(fps)
    if m > 59 or s > 59 or f >= nominal:
        raise ValueError(f"timecode {timecode!r} is out of range at {fps:g} fps (frames must be < {nominal})")
    total = ((h * 60 + m) * 60 + s) * nominal + f
    if not drop:
        return total
    nominal, dropped = _drop_frames(fps)
    if m % 10 and s == 0 and f < dropped:
        raise ValueError(f"timecode {timecode!r} does not exist in drop-frame timecode (frames 0-{dropped - 1} "
                         f"of minute {m} are skipped)")  # fmt: skip
    minutes_total = h * 60 + m
    return total - dropped * (minutes_total - minutes_total // 10)


def frame_to_timecode(frame: int, fps: float, drop_frame: bool = False) -> str:
    """The inverse of :func:`timecode_to_frame`: 86400 at 24 fps -> ``"01:00:00:00"``."""
    if frame < 0:
        raise ValueError(f"frame {frame} is negative; timecodes start at 00:00:00:00")
    nominal = round(fps)
    sep = ":"
    if drop_frame:
        nominal, dropped = _drop_frames(fps)
        per_minute = nominal * 60 - dropped
        per_ten = per_minute * 10 + dropped
        tens, rest = divmod(frame, per_ten)
        frame += dropped * 9 * tens + (dropped * ((rest - dropped) // per_minute) if rest > dropped else 0)
        sep = ";"
    f = frame % nominal
    s = frame // nominal % 60
    m = frame // (nominal * 60) % 60
    h = frame // (nominal * 3600)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{f:02d}"


# ---------------------------------------------------------------------------------------------------------
# Media paths


@dataclass(frozen=True)
class SequencePath:
    """An image sequence as Resolve shows it: ``/s/plate.[1001-1100].exr`` -> ``/s/plate.%04d.exr``, 1001..1100."""

    pattern: str
    first: int
    last: int

    @property
    def extension(self) -> str:
        """Lower-case extension without the dot (``"exr"``)."""
        return os.path.splitext(self.pattern)[1].lstrip(".").lower()

    def path(self, frame: int) -> str:
        """The file holding ``frame``."""
        if not self.first <= frame <= self.last:
            raise ValueError(
                f"frame {frame} is outside the sequence {self.pattern} ({self.first}-{self.last}); "
                "the timeline item reaches past its media"
            )
        return self.pattern % frame


def parse_sequence_path(file_path: str) -> SequencePath | None:
    """Resolve's ``File Path`` clip property -> :class:`SequencePath`, or ``None`` for a single file/movie."""
    head, name = os.path.split(file_path)
    match = re.fullmatch(r"(.*)\[(\d+)-(\d+)\](.*)", name)
    if not match:
        return None
    prefix, first, last, suffix = match.groups()
    if int(last) < int(first):
        raise ValueError(f"sequence path {file_path!r}: range ends before it starts")
    pattern = os.path.join(head, prefix.replace("%", "%%") + f"%0{len(first)}d" + suffix.replace("%", "%%"))
    return SequencePath(pattern, int(first), int(last))


def sequence_from_files(files: Sequence[str | os.PathLike[str]]) -> SequencePath:
    """One printf pattern (``vera_edit.%04d.exr``) for numbered files of one sequence, e.g. fetched results."""
    if not files:
        raise ValueError("no files: expected at least one numbered file such as vera_edit.1001.exr")
    parsed: list[tuple[str, str, str, str]] = []
    for f in files:
        head, name = os.path.split(os.fspath(f))
        match = re.fullmatch(r"(.*?)(\d+)(\.[^.\d]+)", name)
        if not match:
            raise ValueError(f"{f}: no frame number before the extension (expected e.g. vera_edit.1001.exr)")
        prefix, digits, suffix = match.groups()
        parsed.append((head, prefix, digits, suffix))
    heads = {(h, p, s) for h, p, _, s in parsed}
    if len(heads) != 1:
        raise ValueError(f"files {[os.fspath(f) for f in files][:3]}... belong to more than one sequence")
    head, prefix, suffix = heads.pop()
    pad = min(len(d) for _, _, d, _ in parsed)
    frames = sorted(int(d) for _, _, d, _ in parsed)
    for _, _, digits, _ in parsed:
        if digits != f"{int(digits):0{pad}d}":
            raise ValueError(f"{prefix}{digits}{suffix}: frame numbers are padded inconsistently")
    if frames != list(range(frames[0], frames[-1] + 1)):
        raise ValueError(
            f"{prefix}####{suffix}: frames {frames[0]}-{frames[-1]} have gaps; expected every frame"
        )
    pattern = os.path.join(head, prefix.replace("%", "%%") + f"%0{pad}d" + suffix.replace("%", "%%"))
    return SequencePath(pattern, frames[0], frames[-1])


def numbered_files(directory: str | os.PathLike[str], extension: str, recursive: bool = False) -> list[Path]:
    """Files ``*.<extension>`` in ``directory`` (and its sub-folders with ``recursive``: Deliver presets can nest
    a render's files) ordered by the last number in their names, whatever number the first one has."""
    ext = "." + extension.lower().lstrip(".")
    found = []
    for path in Path(directory).rglob("*") if recursive else Path(directory).iterdir():
        if path.is_file() and path.suffix.lower() == ext:
            numbers = re.findall(r"\d+", path.stem)
            if numbers:
                found.append((int(numbers[-1]), str(path), path))
    return [p for _, _, p in sorted(found)]


def parse_resolution(text: str) -> tuple[int, int] | None:
    """``"1920x1080"`` (the ``Resolution`` clip property) -> ``(1920, 1080)``; ``None`` if not of that form."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---------------------------------------------------------------------------------------------------------
# Timeline items


@dataclass(frozen=True)
class ClipRange:
    """Where a timeline item sits and which of its media frames it shows (100% speed).

    ``record_start``/``record_end`` are timeline frames, ``record_end`` exclusive like ``GetEnd()``;
    ``left_offset`` is ``GetLeftOffset()``: media frames trimmed off the head of the media pool item.
    """

    record_start: int
    record_end: int
    left_offset: int

    def __post_init__(self) -> None:
        if self.record_end <= self.record_start:
            raise ValueError(
                f"timeline item ends (frame {self.record_end}, exclusive) at or before it starts "
                f"({self.record_start}); expected GetEnd() > GetStart()"
            )
        if self.left_offset < 0:
            raise ValueError(f"left offset {self.left_offset} is negative; expected GetLeftOffset() >= 0")

    @property
    def duration(self) -> int:
        """Frames on the timeline."""
        return self.record_end - self.record_start

    @property
    def record_frames(self) -> list[int]:
        """Every timeline frame the item covers."""
        return list(range(self.record_start, self.record_end))

    def source_frames(self, first_media_frame: int) -> list[int]:
        """The media frame numbers shown, when the media's first frame is numbered ``first_media_frame``."""
        start = first_media_frame + self.left_offset
        return list(range(start, start + self.duration))


def item_at_frame(spans: Iterable[tuple[int, int]], frame: int) -> int | None:
    """Index of the ``(start, end_exclusive)`` span that contains ``frame``, or ``None``."""
    for i, (start, end) in enumerate(spans):
        if start <= frame < end:
            return i
    return None


def append_clip_info(
    media_pool_item: Any,
    first_frame: int,
    count: int,
    track_index: int,
    record_frame: int,
    end_inclusive: bool = False,
) -> dict[str, Any]:
    """An ``AppendToTimeline`` clip info placing ``count`` frames of the item from its media frame
    ``first_frame`` (the media's own numbering), video only; ``endFrame`` exclusive unless ``end_inclusive``."""
    if count <= 0:
        raise ValueError(f"count={count}: expected at least one frame to place")
    if track_index < 1:
        raise ValueError(f"track_index={track_index}: Resolve's track indices start at 1")
    return {
        "mediaPoolItem": media_pool_item,
        "startFrame": int(first_frame),
        "endFrame": int(first_frame + count - (1 if end_inclusive else 0)),
        "mediaType": 1,
        "trackIndex": int(track_index),
        "recordFrame": int(record_frame),
    }


def import_clip_info(sequence: SequencePath) -> dict[str, Any]:
    """An ``ImportMedia`` clip info importing ``sequence`` as one clip (``StartIndex``/``EndIndex`` inclusive)."""
    return {"FilePath": sequence.pattern, "StartIndex": sequence.first, "EndIndex": sequence.last}


# ---------------------------------------------------------------------------------------------------------
# Rendering to EXR

# Lossy EXR compressions: a plate for a content-preserving edit must not be re-quantised on the way out.
_LOSSY = ("dwa", "b44", "lossy")
_COMPRESSION_RANK = (
    ("zip", 0),
    ("piz", 1),
    ("rle", 2),
    ("none", 3),
    ("no compression", 3),
    ("uncompressed", 3),
)


def choose_exr_format(formats: Mapping[str, str]) -> tuple[str, str]:
    """``(display name, extension)`` of the EXR render format in ``GetRenderFormats()`` (name -> extension).
    ``GetRenderCodecs`` and ``SetCurrentRenderFormatAndCodec`` take the extension."""
    for name, extension in formats.items():
        if str(extension).lower().lstrip(".") == "exr":
            return name, str(extension).lstrip(".")
    raise ValueError(
        f"this Resolve offers no EXR render format (formats: {', '.join(sorted(formats)) or 'none'}); "
        "EXR rendering needs DaVinci Resolve Studio, or use a clip that is already an EXR sequence"
    )


def choose_exr_codec(codecs: Mapping[str, str]) -> tuple[str, str]:
    """``(description, codec name)`` of the best lossless EXR codec among ``GetRenderCodecs(exr format)``.

    Half float before full float (the engine works in half; results keep the plate's depth on request),
    then ZIP, PIZ, RLE, uncompressed; lossy codecs (DWA, B44) are never chosen.
    """
    ranked = []
    for description, name in codecs.items():
        text = f"{description} {name}".lower()
        if any(word in text for word in _LOSSY):
            continue
        depth = 0 if "half" in text else 1 if "float" in text else 2
        compression = next((rank for word, rank in _COMPRESSION_RANK if word in text), 4)
        ranked.append(((depth, compression, description), description, name))
    if not ranked:
        raise ValueError(
            f"no lossless EXR codec among {sorted(codecs)}; expected e.g. 'RGB Half (ZIP)'. "
            "Check the EXR codecs on the Deliver page"
        )
    _, description, name = min(ranked)
    return description, name


def render_settings(
    record_start: int,
    record_end: int,
    target_dir: str | os.PathLike[str],
    name: str,
    resolution: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``SetRenderSettings`` for frames ``record_start..record_end-1`` of the timeline as an EXR sequence.

    ``MarkIn``/``MarkOut`` are timeline frames and both inclusive, unlike ``GetEnd()``.
    """
    if record_end <= record_start:
        raise ValueError(f"render range {record_start}-{record_end} is empty; expected end > start")
    settings: dict[str, Any] = {
        "SelectAllFrames": False,
        "MarkIn": int(record_start),
        "MarkOut": int(record_end - 1),
        "TargetDir": os.fspath(target_dir),
        "CustomName": name,
        "ExportVideo": True,
        "ExportAudio": False,
    }
    if resolution is not None:
        settings["FormatWidth"], settings["FormatHeight"] = resolution
    return settings
