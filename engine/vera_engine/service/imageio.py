"""Decoding spooled frames: plates through :mod:`vera_engine.imaging.exr`, single-channel masks through OpenImageIO."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vera_engine.imaging import exr


class ImageReadError(ValueError):
    """The file is not a readable frame (missing, truncated, corrupt, wrong channels)."""


def read_plate_exr(path: Path) -> np.ndarray:
    """One plate frame's RGB(A) data window as float32 (H, W, 3 or 4)."""
    try:
        pixels, _channels, _spec = exr.read_exr(path)
    except exr.PlateError as exc:
        raise ImageReadError(str(exc)) from None
    return pixels


def read_mask_exr(path: Path) -> np.ndarray:
    """One mask frame as float32 (H, W, 1): the file's only channel, or its ``A`` channel."""
    import OpenImageIO as oiio

    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        raise ImageReadError(f"{path}: not a readable image ({oiio.geterror()}); expected an OpenEXR file")
    try:
        spec = inp.spec()
        names = list(spec.channelnames)
        if len(names) == 1:
            index = 0
        elif "A" in names:
            index = names.index("A")
        else:
            raise ImageReadError(
                f"{path}: mask has channels {names}; expected a single channel or an 'A' channel"
            )
        pixels = inp.read_image(0, 0, index, index + 1, "float")
        if pixels is None or inp.has_error:
            raise ImageReadError(
                f"{path}: could not read the pixels, the file is truncated or corrupt ({inp.geterror()})"
            )
        return np.asarray(pixels, np.float32).reshape(spec.height, spec.width, 1)
    finally:
        inp.close()


def read_windows(path: Path) -> tuple[exr.Window, exr.Window]:
    """(data window, display window) from an EXR's header."""
    import OpenImageIO as oiio

    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        raise ImageReadError(f"{path}: not a readable image ({oiio.geterror()})")
    try:
        spec = inp.spec()
        return (
            exr.Window(spec.x, spec.y, spec.width, spec.height),
            exr.Window(spec.full_x, spec.full_y, spec.full_width, spec.full_height),
        )
    finally:
        inp.close()
