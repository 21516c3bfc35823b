"""Decoding spooled frames: plates through :mod:`vera_engine.imaging.exr`, single-channel masks through OpenImageIO.

Frames must be OpenEXR files (OpenImageIO would read other formats too). Error messages leave the file's path
out: callers name the frame, and a spooled frame's path is the engine's business, not the client's.

Every read checks the header against the published limits first and reserves the decode's memory in the
process's :data:`~vera_engine.service.safe_files.DECODE` budget, so a small file declaring a huge image (a
decompression bomb) is refused, and concurrent uploads cannot decode more at once than the budget allows.
``path`` may be :func:`~vera_engine.service.safe_files.fd_path` of a file opened safely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.imaging import exr
from vera_engine.service import safe_files
from vera_engine.service.limits import MAX_SIDE, MIN_SIDE


class ImageReadError(ValueError):
    """The file is not a readable frame (missing, truncated, corrupt, not OpenEXR, wrong channels)."""


def _without_path(message: str, path: Path) -> str:
    """``message`` without ``path``, on one line (OpenImageIO repeats its errors on several)."""
    lines = message.replace(f"{path}: ", "").replace(str(path), "the file").splitlines()
    return "; ".join(dict.fromkeys(line.strip() for line in lines if line.strip()))


def _open_exr(path: Path) -> Any:
    """An OpenImageIO ImageInput on ``path``, refused unless the file is an OpenEXR image."""
    import OpenImageIO as oiio

    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        error = _without_path(oiio.geterror(), path)
        raise ImageReadError(f"not a readable image ({error}); expected an OpenEXR file")
    if inp.format_name() != "openexr":
        kind = inp.format_name()
        inp.close()
        raise ImageReadError(f"is a {kind} image; frames must be OpenEXR files")
    try:
        exr.check_header(inp.spec(), min_side=MIN_SIDE, max_side=MAX_SIDE)
    except exr.PlateError as exc:
        inp.close()
        raise ImageReadError(str(exc)) from None
    return inp


def _reserve(width: int, height: int, channels: int) -> Any:
    """The decode's share of the process's decode budget (ImageReadError if it exceeds the whole budget)."""
    try:
        return safe_files.DECODE.reserve(safe_files.decode_cost(width, height, channels))
    except safe_files.DecodeBudget.OverBudget as exc:
        raise ImageReadError(str(exc)) from None


def read_plate_exr(path: Path) -> np.ndarray:
    """One plate frame's RGB(A) data window as float32 (H, W, 3 or 4)."""
    inp = _open_exr(path)
    try:
        spec = inp.spec()
        channels = exr.read_channel_count(spec, path)
    except exr.PlateError as exc:
        raise ImageReadError(_without_path(str(exc), path)) from None
    finally:
        inp.close()
    with _reserve(spec.width, spec.height, channels):
        try:
            pixels, _channels, _spec = exr.read_exr(path)
        except exr.PlateError as exc:
            raise ImageReadError(_without_path(str(exc), path)) from None
        return pixels


def read_mask_exr(path: Path) -> np.ndarray:
    """One mask frame as float32 (H, W, 1): the file's only channel, or its ``A`` channel."""
    inp = _open_exr(path)
    try:
        spec = inp.spec()
        names = list(spec.channelnames)
        if len(names) == 1:
            index = 0
        elif "A" in names:
            index = names.index("A")
        else:
            shown = ", ".join(names[:8]) + (f" ... ({len(names)} channels)" if len(names) > 8 else "")
            raise ImageReadError(f"mask has channels {shown}; expected a single channel or an 'A' channel")
        with _reserve(spec.width, spec.height, 1):
            pixels = inp.read_image(0, 0, index, index + 1, "float")
            if pixels is None or inp.has_error:
                error = _without_path(inp.geterror(), path)
                raise ImageReadError(f"could not read the pixels, the file is truncated or corrupt ({error})")
            return np.asarray(pixels, np.float32).reshape(spec.height, spec.width, 1)
    finally:
        inp.close()


def read_windows(path: Path) -> tuple[exr.Window, exr.Window]:
    """(data window, display window) from an EXR's header."""
    inp = _open_exr(path)
    try:
        spec = inp.spec()
        return (
            exr.Window(spec.x, spec.y, spec.width, spec.height),
            exr.Window(spec.full_x, spec.full_y, spec.full_width, spec.full_height),
        )
    finally:
        inp.close()
