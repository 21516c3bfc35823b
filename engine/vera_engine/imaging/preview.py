"""Previews in display space: a contact sheet PNG and an MP4, each frame laid out as
``source | edit layer over a checkerboard | matte | composite``.

Inputs are working-space arrays at any resolution; each panel is scaled down (antialiased) before the
display transform of the :class:`~vera_engine.imaging.colour.ColourConverter` (ACES SDR view on an sRGB display).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.resize import resize_frames

__all__ = ["checkerboard", "contact_sheet", "preview_frames", "write_contact_sheet", "write_preview_mp4"]

_GAP = 4  # display pixels between panels


def checkerboard(
    height: int, width: int, *, square: int = 16, light: float = 0.6, dark: float = 0.4
) -> np.ndarray:
    """A grey checkerboard (H, W, 3) in display code values, to show transparency."""
    yy, xx = np.mgrid[0:height, 0:width]
    cells = ((yy // square) + (xx // square)) % 2
    return np.repeat(np.where(cells == 0, light, dark).astype(np.float32)[..., None], 3, axis=-1)


def _panel_size(height: int, width: int, panel_height: int) -> tuple[int, int]:
    scale = min(1.0, panel_height / height)
    # Even sizes so the sheet can be encoded as 4:2:0 video.
    return max(2, round(height * scale) // 2 * 2), max(2, round(width * scale) // 2 * 2)


def preview_frames(
    source: np.ndarray,
    edit_premult: np.ndarray,
    matte: np.ndarray,
    composite: np.ndarray,
    *,
    colour: ColourConverter,
    panel_height: int = 270,
) -> np.ndarray:
    """The four panels side by side for every frame: (F, h, 4·w + gaps, 3) display values in [0, 1].

    ``source`` (F, H, W, 3|4) and ``composite`` (F, H, W, 3|4) in the working space, ``edit_premult``
    (F, H, W, 4) premultiplied, ``matte`` (F, H, W).
    """
    source, composite = np.asarray(source, np.float32), np.asarray(composite, np.float32)
    edit_premult, matte = np.asarray(edit_premult, np.float32), np.asarray(matte, np.float32)
    frames, height, width = matte.shape
    for name, arr in (("source", source), ("edit_premult", edit_premult), ("composite", composite)):
        if arr.shape[:3] != matte.shape or arr.shape[-1] < 3:
            raise ValueError(f"{name} has shape {arr.shape}; expected ({frames}, {height}, {width}, 3 or 4)")
    if edit_premult.shape[-1] != 4:
        raise ValueError(f"edit_premult has shape {edit_premult.shape}; expected RGBA (…, 4)")
    size = _panel_size(height, width, panel_height)
    small_src = colour.to_display(resize_frames(source[..., :3], size))
    small_comp = colour.to_display(resize_frames(composite[..., :3], size))
    small_edit = resize_frames(edit_premult, size)
    a = np.clip(small_edit[..., 3:], 0.0, 1.0)
    # Unpremultiply before the (non-linear) display transform, then lay the layer over the checkerboard.
    straight = np.where(a > 0, small_edit[..., :3] / np.maximum(a, 1e-6), 0.0)
    edit_disp = colour.to_display(straight) * a + checkerboard(*size) * (1.0 - a)
    matte_disp = np.repeat(np.clip(resize_frames(matte, size), 0.0, 1.0)[..., None], 3, axis=-1)
    gap = np.ones((frames, size[0], _GAP, 3), np.float32) * 0.1
    return np.concatenate(
        [small_src, gap, edit_disp, gap, matte_disp, gap, small_comp], axis=2, dtype=np.float32
    )


def contact_sheet(
    source: np.ndarray,
    edit_premult: np.ndarray,
    matte: np.ndarray,
    composite: np.ndarray,
    *,
    colour: ColourConverter,
    frames: Sequence[int] | None = None,
    panel_height: int = 270,
) -> np.ndarray:
    """A contact sheet (rows = ``frames`` indices, default first/middle/last) as (H, W, 3) display [0, 1]."""
    count = matte.shape[0]
    picks = sorted({0, count // 2, count - 1}) if frames is None else list(frames)
    bad = [f for f in picks if not 0 <= f < count]
    if bad or not picks:
        raise ValueError(f"frames={frames!r}: indices must lie in [0, {count - 1}]")
    rows = preview_frames(
        source[picks],
        edit_premult[picks],
        matte[picks],
        composite[picks],
        colour=colour,
        panel_height=panel_height,
    )
    gap = np.full((_GAP, rows.shape[2], 3), 0.1, np.float32)
    parts = [rows[0]]
    for row in rows[1:]:
        parts += [gap, row]
    return np.concatenate(parts, axis=0)


def _to_uint8(display: np.ndarray) -> np.ndarray:
    return np.round(np.clip(display, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_contact_sheet(path: str | os.PathLike[str], sheet: np.ndarray) -> Path:
    """Write a display-space (H, W, 3) sheet as an 8-bit PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        buf = oiio.ImageBuf(np.ascontiguousarray(_to_uint8(sheet)))
        if not buf.write(str(tmp), "uint8"):
            raise OSError(f"{path}: cannot write the contact sheet ({buf.geterror()})")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_preview_mp4(
    path: str | os.PathLike[str], frames: np.ndarray, *, fps: float = 24.0, crf: int = 18
) -> Path:
    """Encode display-space (F, H, W, 3) frames (e.g. :func:`preview_frames`) as an H.264 MP4, atomically."""
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames have shape {frames.shape}; expected (F, H, W, 3)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            for frame in frames:
                image = av.VideoFrame.from_ndarray(_to_uint8(frame[:height, :width]), format="rgb24")
                container.mux(stream.encode(image))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
