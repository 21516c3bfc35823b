"""Plate I/O: EXR sequences through OpenImageIO, movies through PyAV, and Vera's layered EXR output.

Arrays are ``(F, H, W, C)`` float32 throughout. A plate keeps its data window (overscan included) by default so
that what comes back is the plate's own pixels at their own size; ``window="display"`` crops or pads to the
display window instead. The layered output follows ARCHITECTURE.md: ``R,G,B,A`` composite,
``edit.R/G/B/A`` premultiplied edit layer, ``matte.A``; metadata under ``vera/``; written atomically.
"""

from __future__ import annotations

import glob
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import OpenImageIO as oiio

__all__ = [
    "COLOUR_COMPRESSIONS",
    "LOSSLESS_COMPRESSIONS",
    "HeaderLimits",
    "Plate",
    "PlateError",
    "Window",
    "check_header",
    "find_frames",
    "frame_path",
    "read_exr",
    "read_mask",
    "read_movie",
    "read_plate",
    "read_windows",
    "write_exr",
    "write_layered_exr",
    "write_sequence",
]

# Lossless for every channel type. pxr24 is lossless for half only, so it is handled separately.
LOSSLESS_COMPRESSIONS = ("zip", "zips", "piz", "rle", "none")
# Also allowed for the colour layers: DWA compresses only channels named R, G, B (and Y, RY, BY) lossily and
# keeps channels named A (``A``, ``edit.A``, ``matte.A``) lossless, so the matte never loses anything.
COLOUR_COMPRESSIONS = (*LOSSLESS_COMPRESSIONS, "pxr24", "dwaa", "dwab")
# Lossy on every half channel, alpha included: refused because the matte must stay lossless.
_LOSSY_FOR_MATTE = ("b44", "b44a")

_PIXEL_TYPES = {"half": "half", "float": "float", "float32": "float", "float16": "half"}


class PlateError(ValueError):
    """A plate cannot be read or written as asked; the message names the file, frame and what was expected."""


class Window(NamedTuple):
    """An image window in pixels (OpenEXR's data or display window): origin and size."""

    x: int
    y: int
    width: int
    height: int


@dataclass
class Plate:
    """A plate in memory: ``pixels`` (F, H, W, C) float32 with C = 3 (RGB) or 4 (RGBA), plus where it came from.

    ``frames`` are the plate's frame numbers (for output naming); ``pixel_type`` is the stored type of the
    first frame ("half", "float", "uint8", ...); ``colourspace`` is declared for movies, ``None`` for EXRs
    (the caller declares the working space). ``data_window``/``display_window`` describe ``pixels``' placement.
    """

    pixels: np.ndarray
    frames: list[int]
    channels: tuple[str, ...]
    pixel_type: str
    data_window: Window
    display_window: Window
    source: str
    colourspace: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def has_alpha(self) -> bool:
        """Whether the plate carries an alpha channel."""
        return len(self.channels) == 4


# --------------------------------------------------------------------------------------------------------
# Sequence patterns
# --------------------------------------------------------------------------------------------------------
_PRINTF = re.compile(r"%(0?)(\d*)d")
_HASHES = re.compile(r"#+")
_ATS = re.compile(r"@+")


def _frame_token(pattern: str) -> tuple[int, int, int]:
    """(start, end, padding) of the single frame token in ``pattern``'s file name."""
    name_start = len(os.path.dirname(pattern))
    name = pattern[name_start:]
    hits = [
        (m.start() + name_start, m.end() + name_start, int(m.group(2) or 1)) for m in _PRINTF.finditer(name)
    ]
    hits += [(m.start() + name_start, m.end() + name_start, len(m.group(0))) for m in _HASHES.finditer(name)]
    hits += [(m.start() + name_start, m.end() + name_start, len(m.group(0))) for m in _ATS.finditer(name)]
    if len(hits) != 1:
        raise PlateError(
            f"sequence pattern {pattern!r} must contain exactly one frame token (e.g. 'plate.####.exr' or "
            f"'plate.%04d.exr'); found {len(hits)}"
        )
    return hits[0]


def frame_path(pattern: str, frame: int) -> str:
    """The file name of ``frame`` in a sequence ``pattern`` (``####``/``@@@@`` = 4 digits, ``%04d``)."""
    start, end, pad = _frame_token(pattern)
    # printf's %0Nd, as Nuke, oiiotool and Resolve write sequences: the sign counts in the width (-2 -> -002).
    number = f"{frame:0{pad}d}"
    return pattern[:start] + number + pattern[end:]


def find_frames(pattern: str) -> list[int]:
    """The frame numbers of ``pattern`` that exist on disk, sorted."""
    start, end, _pad = _frame_token(pattern)
    head, tail = pattern[:start], pattern[end:]
    found = []
    for path in glob.glob(glob.escape(head) + "*" + glob.escape(tail)):
        middle = path[len(head) : len(path) - len(tail)]
        if re.fullmatch(r"-?\d+", middle):
            found.append(int(middle))
    return sorted(set(found))


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
def _spec_windows(spec: oiio.ImageSpec) -> tuple[Window, Window]:
    data = Window(spec.x, spec.y, spec.width, spec.height)
    display = Window(spec.full_x, spec.full_y, spec.full_width, spec.full_height)
    return data, display


MAX_CHANNELS = 64  # channels in one EXR part Vera reads: RGBA plus a generous set of AOVs


def check_header(
    spec: oiio.ImageSpec, *, min_side: int = 1, max_side: int, max_channels: int = MAX_CHANNELS
) -> None:
    """Refuse, before any pixel is decoded, an image whose header declares more than Vera would ever read.

    A few-megabyte EXR may declare 16384x16384 RGBA (a decompression bomb, gigabytes once decoded) or a
    million channels; the size checks that follow a decode come too late for those. Raises PlateError.
    """
    if getattr(spec, "deep", False):
        raise PlateError("is a deep image; frames must be flat (non-deep) OpenEXR images")
    width, height, channels = int(spec.width), int(spec.height), int(spec.nchannels)
    if not (min_side <= width <= max_side and min_side <= height <= max_side):
        raise PlateError(
            f"declares a data window of {width}x{height} pixels; width and height must be {min_side}..{max_side}"
        )
    if not 1 <= channels <= max_channels:
        raise PlateError(f"declares {channels} channels; at most {max_channels} are read")
    if int(spec.depth) > 1:
        raise PlateError(f"is a volume image (depth {spec.depth}); frames must be 2-D")


def _rgba_indices(names: Sequence[str], path: str) -> list[int]:
    lookup = {n: i for i, n in enumerate(names)}
    if not all(c in lookup for c in ("R", "G", "B")):
        raise PlateError(
            f"{path}: expected channels R, G, B (optionally A) in the main layer, found {list(names)}; "
            "shuffle the plate to RGB(A) before sending it"
        )
    return [lookup[c] for c in ("R", "G", "B", "A") if c in lookup]


def _to_display_window(pixels: np.ndarray, data: Window, display: Window) -> np.ndarray:
    """Crop/pad ``pixels`` (H, W, C) from the data window onto the display window; outside is zero."""
    out = np.zeros((display.height, display.width, pixels.shape[-1]), np.float32)
    # Intersection of the two windows in absolute pixel coordinates.
    x0, y0 = max(data.x, display.x), max(data.y, display.y)
    x1 = min(data.x + data.width, display.x + display.width)
    y1 = min(data.y + data.height, display.y + display.height)
    if x1 > x0 and y1 > y0:
        out[y0 - display.y : y1 - display.y, x0 - display.x : x1 - display.x] = pixels[
            y0 - data.y : y1 - data.y, x0 - data.x : x1 - data.x
        ]
    return out


class HeaderLimits(NamedTuple):
    """What a reader refuses from the header alone, before any pixel is decoded (:func:`check_header`)."""

    min_side: int
    max_side: int
    max_channels: int = MAX_CHANNELS


Reserve = Callable[[int, int, int], AbstractContextManager[object]]
"""Holds memory for a decode of (width, height, channels) to float32 for the length of a ``with`` block (the
engine's process-wide decode budget, ``service/safe_files.DECODE``); raises to refuse it."""


def _open(path: str, limits: HeaderLimits | None) -> oiio.ImageInput:
    """An ImageInput on ``path`` (PlateError naming the path if it cannot be opened). With ``limits``: an
    OpenEXR file only (OpenImageIO reads other formats too), its header checked against them."""
    if not os.path.exists(path):
        raise PlateError(f"{path}: file not found")
    inp = oiio.ImageInput.open(path)
    if inp is None:
        raise PlateError(f"{path}: not a readable image ({oiio.geterror()}); expected an OpenEXR file")
    if limits is None:
        return inp
    try:
        if inp.format_name() != "openexr":
            raise PlateError(f"{path}: is a {inp.format_name()} image; frames must be OpenEXR files")
        try:
            check_header(
                inp.spec(),
                min_side=limits.min_side,
                max_side=limits.max_side,
                max_channels=limits.max_channels,
            )
        except PlateError as exc:
            raise PlateError(f"{path}: {exc}") from None
    except BaseException:
        inp.close()
        raise
    return inp


def _read_pixels(inp: oiio.ImageInput, path: str, first: int, end: int) -> np.ndarray:
    """Channels ``first``..``end`` of the open image as (H, W, C) float32: the one place pixels are decoded."""
    spec = inp.spec()
    pixels = inp.read_image(0, 0, first, end, "float")
    if pixels is None or inp.has_error:
        raise PlateError(
            f"{path}: could not read the pixels, the file is truncated or corrupt ({inp.geterror()}); "
            "re-render or re-copy this frame"
        )
    return np.asarray(pixels, np.float32).reshape(spec.height, spec.width, end - first)


def _decode(inp: oiio.ImageInput, path: str, first: int, end: int, reserve: Reserve | None) -> np.ndarray:
    """:func:`_read_pixels` inside ``reserve``'s hold on decode memory (taken, or refused, before decoding)."""
    spec = inp.spec()
    with reserve(spec.width, spec.height, end - first) if reserve else nullcontext():
        return _read_pixels(inp, path, first, end)


def read_exr(
    path: str | os.PathLike[str], *, limits: HeaderLimits | None = None, reserve: Reserve | None = None
) -> tuple[np.ndarray, tuple[str, ...], oiio.ImageSpec]:
    """Read one EXR's RGB(A) data window as (H, W, C) float32, with its channel names and spec.

    Any compression, scanline or tiled, half or float: OpenImageIO handles the storage. The file is opened once.
    ``limits``: refuse a non-OpenEXR file or a header beyond them before decoding (the engine's frames);
    ``reserve``: hold decode memory while the pixels are read.
    """
    path = os.fspath(path)
    inp = _open(path, limits)
    try:
        spec = inp.spec()
        idx = _rgba_indices(spec.channelnames, path)
        contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
        if contiguous:
            pixels = _decode(inp, path, idx[0], idx[-1] + 1, reserve)
        else:
            pixels = _decode(inp, path, 0, spec.nchannels, reserve)[..., idx]
        channels = tuple(spec.channelnames[i] for i in idx)
        return np.ascontiguousarray(pixels), channels, spec
    finally:
        inp.close()


def read_mask(
    path: str | os.PathLike[str], *, limits: HeaderLimits | None = None, reserve: Reserve | None = None
) -> np.ndarray:
    """One mask frame as (H, W, 1) float32: the file's only channel, or its ``A`` channel (opened once)."""
    path = os.fspath(path)
    inp = _open(path, limits)
    try:
        names = list(inp.spec().channelnames)
        if len(names) == 1:
            index = 0
        elif "A" in names:
            index = names.index("A")
        else:
            shown = ", ".join(names[:8]) + (f" ... ({len(names)} channels)" if len(names) > 8 else "")
            raise PlateError(
                f"{path}: mask has channels {shown}; expected a single channel or an 'A' channel"
            )
        return _decode(inp, path, index, index + 1, reserve)
    finally:
        inp.close()


def read_windows(
    path: str | os.PathLike[str], *, limits: HeaderLimits | None = None
) -> tuple[Window, Window]:
    """(data window, display window) from an EXR's header (no pixels decoded)."""
    path = os.fspath(path)
    inp = _open(path, limits)
    try:
        return _spec_windows(inp.spec())
    finally:
        inp.close()


LAYER_CHANNELS: dict[str, tuple[str, ...]] = {
    "composite": ("R", "G", "B", "A"),
    "edit": ("edit.R", "edit.G", "edit.B", "edit.A"),
    "matte": ("matte.A",),
}
"""The channels of one layered result file (ARCHITECTURE.md), by layer."""


def read_layers(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a layered result EXR: ``composite`` (H, W, 4), ``edit`` (H, W, 4, premultiplied), ``matte`` (H, W)."""
    path = os.fspath(path)
    inp = oiio.ImageInput.open(path)
    if inp is None:
        raise PlateError(f"{path}: not a readable image ({oiio.geterror()}); expected a Vera result EXR")
    try:
        spec = inp.spec()
        names = list(spec.channelnames)
        missing = [c for layer in LAYER_CHANNELS.values() for c in layer if c not in names]
        if missing:
            raise PlateError(
                f"{path}: channels {missing} missing; a Vera result has {names and LAYER_CHANNELS}"
            )
        pixels = inp.read_image(0, 0, 0, spec.nchannels, "float")
        if pixels is None or inp.has_error:
            raise PlateError(
                f"{path}: could not read the pixels, the file is truncated or corrupt ({inp.geterror()})"
            )
        pixels = np.asarray(pixels, np.float32).reshape(spec.height, spec.width, spec.nchannels)
    finally:
        inp.close()
    layers = {name: pixels[..., [names.index(c) for c in chans]] for name, chans in LAYER_CHANNELS.items()}
    layers["matte"] = layers["matte"][..., 0]
    return layers


def read_plate(
    pattern: str,
    frames: Iterable[int],
    *,
    window: Literal["data", "display"] = "data",
    threads: int = 0,
) -> Plate:
    """Read frames ``frames`` of the EXR sequence ``pattern`` (``plate.####.exr`` or ``plate.%04d.exr``).

    Every frame must exist, share the first frame's channels and windows, and be readable; otherwise a
    :class:`PlateError` names the frame and file. ``window="data"`` keeps the data window (overscan kept,
    nothing invented); ``"display"`` crops/pads to the display window with zeros outside the data.
    ``threads``: frames decoded in parallel (0 = one per CPU core).
    """
    frame_list = [int(f) for f in frames]
    if not frame_list:
        raise PlateError(f"{pattern}: the frame range is empty; pass at least one frame number")
    if window not in ("data", "display"):
        raise PlateError(f"window={window!r} is not one of 'data', 'display'")
    paths = [frame_path(pattern, f) for f in frame_list]
    missing = [f for f, p in zip(frame_list, paths, strict=True) if not os.path.exists(p)]
    if missing:
        existing = find_frames(pattern)
        have = f"{existing[0]}-{existing[-1]} ({len(existing)} files)" if existing else "none"
        raise PlateError(
            f"{pattern}: missing frame(s) {_compact(missing)} (e.g. {frame_path(pattern, missing[0])}); "
            f"frames on disk: {have}. Render the missing frames or choose a range that exists"
        )

    first_pixels, channels, first_spec = read_exr(paths[0])
    data0, display0 = _spec_windows(first_spec)
    out = np.empty((len(frame_list), data0.height, data0.width, len(channels)), np.float32)
    out[0] = first_pixels

    def load(i: int) -> None:
        pixels, chans, spec = read_exr(paths[i])
        data, display = _spec_windows(spec)
        if (data, display) != (data0, display0):
            raise PlateError(
                f"{paths[i]}: frame {frame_list[i]} has data window {tuple(data)} and display window "
                f"{tuple(display)}, but frame {frame_list[0]} has {tuple(data0)} and {tuple(display0)}; "
                "every frame of a plate must have the same size"
            )
        if chans != channels:
            raise PlateError(
                f"{paths[i]}: frame {frame_list[i]} has channels {list(chans)} but frame {frame_list[0]} "
                f"has {list(channels)}; every frame of a plate must have the same channels"
            )
        out[i] = pixels

    workers = threads or os.cpu_count() or 1
    if workers > 1 and len(frame_list) > 2:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(load, range(1, len(frame_list))))  # list() re-raises the first error
    else:
        for i in range(1, len(frame_list)):
            load(i)

    pixel_type = str(first_spec.format)
    metadata = {a.name: a.value for a in first_spec.extra_attribs}
    data_window = data0
    if window == "display" and data0 != display0:
        out = np.stack([_to_display_window(frame, data0, display0) for frame in out])
        data_window = display0
    return Plate(
        pixels=out,
        frames=frame_list,
        channels=channels,
        pixel_type=pixel_type,
        data_window=data_window,
        display_window=display0,
        source=pattern,
        metadata=metadata,
    )


def _compact(frames: Sequence[int]) -> str:
    shown = ", ".join(str(f) for f in frames[:8])
    return shown + (f" and {len(frames) - 8} more" if len(frames) > 8 else "")


def read_movie(
    path: str | os.PathLike[str],
    *,
    colourspace: str,
    frames: Iterable[int] | None = None,
) -> Plate:
    """Decode a movie (mov/mp4/...) with PyAV as a display-referred RGB plate in the declared ``colourspace``.

    ``frames`` are 0-based frame indices (default: all). The pixels are the decoded code values in [0, 1];
    convert them to the working space with :class:`vera_engine.imaging.colour.ColourConverter` and ``colourspace``.
    """
    import av

    path = os.fspath(path)
    if not colourspace:
        raise PlateError(
            f"{path}: a movie is display-referred; declare its colour space (e.g. 'sRGB - Texture' or "
            "'Gamma 2.4 Rec.709 - Texture')"
        )
    if not os.path.exists(path):
        raise PlateError(f"{path}: file not found")
    wanted = None if frames is None else sorted({int(f) for f in frames})
    if wanted is not None and (not wanted or wanted[0] < 0):
        raise PlateError(f"{path}: frame indices must be a non-empty set of numbers >= 0, got {frames!r}")
    decoded: list[np.ndarray] = []
    numbers: list[int] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise PlateError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fmt = stream.codec_context.format
            bits = max((c.bits for c in fmt.components), default=8) if fmt is not None else 8
            for index, frame in enumerate(container.decode(stream)):
                if wanted is not None and index > wanted[-1]:
                    break
                if wanted is None or index in wanted:
                    # 16-bit RGB keeps 10/12-bit sources' precision.
                    rgb = frame.to_ndarray(format="rgb48le").astype(np.float32) / 65535.0
                    decoded.append(rgb)
                    numbers.append(index)
    except av.error.FFmpegError as exc:
        raise PlateError(f"{path}: not a readable movie ({exc}); expected a mov/mp4 PyAV can decode") from exc
    if not decoded:
        raise PlateError(f"{path}: no video frames decoded")
    if wanted is not None and numbers != wanted:
        lost = sorted(set(wanted) - set(numbers))
        raise PlateError(
            f"{path}: frame(s) {_compact(lost)} not in the movie, which has {index + 1} frames (0-based indices)"
        )
    pixels = np.stack(decoded)
    height, width = pixels.shape[1:3]
    win = Window(0, 0, width, height)
    return Plate(
        pixels=pixels,
        frames=numbers,
        channels=("R", "G", "B"),
        pixel_type="uint8" if bits <= 8 else "uint16",
        data_window=win,
        display_window=win,
        source=path,
        colourspace=colourspace,
    )


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def _pixel_type(pixel_type: str) -> str:
    if pixel_type not in _PIXEL_TYPES:
        raise PlateError(f"pixel_type={pixel_type!r} is not one of 'half', 'float'")
    return _PIXEL_TYPES[pixel_type]


def _check_compression(compression: str, pixel_type: str) -> str:
    name, _, level = compression.lower().partition(":")
    if name in _LOSSY_FOR_MATTE:
        raise PlateError(
            f"compression={compression!r} is lossy on alpha channels, and the matte must stay lossless; "
            f"use one of {', '.join(COLOUR_COMPRESSIONS)}"
        )
    if name not in COLOUR_COMPRESSIONS:
        raise PlateError(f"compression={compression!r} is not one of {', '.join(COLOUR_COMPRESSIONS)}")
    if name == "pxr24" and pixel_type == "float":
        raise PlateError(
            "compression='pxr24' rounds float32 channels (the matte included) to 24 bits; use 'zip' or 'piz' "
            "for float output, or pxr24 with half"
        )
    if level and name not in ("dwaa", "dwab", "zip", "zips"):
        raise PlateError(f"compression={compression!r}: only dwaa/dwab/zip take a ':level'")
    if level:
        try:
            float(level)
        except ValueError:
            raise PlateError(f"compression={compression!r}: the level after ':' must be a number") from None
    return compression.lower()


def _set_metadata(spec: oiio.ImageSpec, metadata: Mapping[str, object] | None, prefix: str) -> None:
    for key, value in (metadata or {}).items():
        name = key if key.startswith(prefix) else prefix + key
        if isinstance(value, bool):
            spec.attribute(name, int(value))
        elif isinstance(value, (int, float, str)):
            if isinstance(value, int) and not -(2**31) <= value < 2**31:
                value = str(value)  # EXR ints are 32-bit; seeds can be larger
            spec.attribute(name, value)
        elif value is None:
            continue
        else:
            spec.attribute(name, json.dumps(value, sort_keys=True, default=str))


HALF_MAX = 65504.0  # the largest finite half float


def _fit_pixel_type(pixels: np.ndarray, fmt: str) -> np.ndarray:
    """For half output, finite values beyond +-65504 held at +-65504: a half cannot hold them and would store
    infinity. Infinities and NaNs the caller passes stay what they are."""
    if fmt != "half" or not pixels.size or (pixels.max() <= HALF_MAX and pixels.min() >= -HALF_MAX):
        return (
            pixels  # the common case costs two reductions (a NaN fails both tests and takes the exact path)
        )
    overflow = np.isfinite(pixels) & (np.abs(pixels) > HALF_MAX)
    return np.where(overflow, np.copysign(np.float32(HALF_MAX), pixels), pixels).astype(np.float32)


def write_exr(
    path: str | os.PathLike[str],
    pixels: np.ndarray,
    channels: Sequence[str],
    *,
    pixel_type: str = "half",
    compression: str = "zip",
    metadata: Mapping[str, object] | None = None,
    metadata_prefix: str = "vera/",
    chromaticities: Sequence[float] | None = None,
    data_window: Window | None = None,
    display_window: Window | None = None,
) -> Path:
    """Write ``pixels`` (H, W, C) as one EXR with ``channels``, atomically (temporary file, then rename).

    ``pixel_type`` "half" (default) or "float"; ``compression`` one of :data:`COLOUR_COMPRESSIONS`
    (``"dwaa:45"`` sets a DWA level); ``metadata`` keys are written under ``metadata_prefix``;
    ``chromaticities`` (8 floats: R, G, B, white xy) becomes the standard attribute. Half output holds finite
    values beyond the half range at +-65504 instead of writing them as infinity.
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[-1] != len(channels):
        raise PlateError(
            f"{path}: pixels have shape {pixels.shape}, expected (H, W, {len(channels)}) for channels "
            f"{list(channels)}"
        )
    fmt = _pixel_type(pixel_type)
    height, width = pixels.shape[:2]
    data_window = data_window or Window(0, 0, width, height)
    if (data_window.width, data_window.height) != (width, height):
        raise PlateError(f"{path}: data window {tuple(data_window)} does not match pixels {width}x{height}")
    display_window = display_window or data_window
    spec = oiio.ImageSpec(width, height, len(channels), fmt)
    spec.channelnames = tuple(channels)
    spec.x, spec.y = data_window.x, data_window.y
    spec.full_x, spec.full_y = display_window.x, display_window.y
    spec.full_width, spec.full_height = display_window.width, display_window.height
    spec.alpha_channel = list(channels).index("A") if "A" in channels else -1
    spec.attribute("compression", _check_compression(compression, fmt))
    if chromaticities is not None:
        spec.attribute("chromaticities", oiio.TypeDesc("float[8]"), tuple(float(c) for c in chromaticities))
    _set_metadata(spec, metadata, metadata_prefix)

    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so the rename is atomic; ".exr" suffix so OpenImageIO picks the EXR writer.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.exr")
    out = oiio.ImageOutput.create("exr")
    if out is None:
        raise PlateError(f"{path}: OpenImageIO has no EXR writer ({oiio.geterror()})")
    try:
        if not out.open(str(tmp), spec):
            raise PlateError(
                f"{path}: cannot open for writing ({out.geterror()}); check the folder's permissions"
            )
        if pixels.dtype != np.float16:  # half pixels come converted (and held in range) by the caller
            pixels = _fit_pixel_type(np.ascontiguousarray(pixels, np.float32), fmt)
        ok = out.write_image(np.ascontiguousarray(pixels))
        ok = out.close() and ok
        if not ok:
            raise PlateError(
                f"{path}: write failed ({out.geterror()}); check free disk space and permissions"
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_layered_exr(
    path: str | os.PathLike[str],
    composite: np.ndarray,
    edit: np.ndarray,
    matte: np.ndarray,
    *,
    pixel_type: str = "half",
    compression: str = "zip",
    metadata: Mapping[str, object] | None = None,
    chromaticities: Sequence[float] | None = None,
    data_window: Window | None = None,
    display_window: Window | None = None,
) -> Path:
    """Write one frame of Vera's layered output: ``R,G,B,A`` composite, ``edit.R/G/B/A``, ``matte.A``.

    ``composite`` (H, W, 4), ``edit`` (H, W, 4) premultiplied, ``matte`` (H, W). The matte is always stored
    losslessly (see :data:`COLOUR_COMPRESSIONS`); metadata goes under ``vera/``.
    """
    composite, edit, matte = np.asarray(composite), np.asarray(edit), np.asarray(matte)
    if composite.ndim != 3 or composite.shape[-1] != 4:
        raise PlateError(f"{path}: composite has shape {composite.shape}, expected (H, W, 4)")
    if edit.shape != composite.shape:
        raise PlateError(
            f"{path}: edit has shape {edit.shape}, expected {composite.shape} like the composite"
        )
    if matte.shape != composite.shape[:2]:
        raise PlateError(f"{path}: matte has shape {matte.shape}, expected {composite.shape[:2]}")
    fmt = _pixel_type(pixel_type)
    # Assembled in the stored type: a 4K frame's nine float32 channels are 318 MB, converted by the writer after;
    # nine halves are 159 MB, converted here layer by layer (and written about 1.6x faster).
    pixels = np.empty((*matte.shape, 9), np.float16 if fmt == "half" else np.float32)
    for start, layer in ((0, composite), (4, edit), (8, matte[..., None])):
        pixels[..., start : start + layer.shape[-1]] = _fit_pixel_type(np.asarray(layer, np.float32), fmt)
    channels = ("R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A")
    return write_exr(
        path,
        pixels,
        channels,
        pixel_type=pixel_type,
        compression=compression,
        metadata=metadata,
        chromaticities=chromaticities,
        data_window=data_window,
        display_window=display_window,
    )


def write_sequence(
    pattern: str,
    pixels: np.ndarray,
    frames: Sequence[int],
    channels: Sequence[str] = ("R", "G", "B", "A"),
    *,
    threads: int = 0,
    **kwargs: object,
) -> list[Path]:
    """Write (F, H, W, C) ``pixels`` as the frames ``frames`` of ``pattern``; ``kwargs`` go to :func:`write_exr`."""
    if len(frames) != len(pixels):
        raise PlateError(f"{pattern}: {len(pixels)} images but {len(frames)} frame numbers")

    def one(i: int) -> Path:
        return write_exr(frame_path(pattern, frames[i]), pixels[i], channels, **kwargs)  # type: ignore[arg-type]

    workers = threads or os.cpu_count() or 1
    if workers > 1 and len(frames) > 2:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(len(frames))))
    return [one(i) for i in range(len(frames))]
