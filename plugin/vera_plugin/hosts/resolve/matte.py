"""Matte files for Resolve's clip mattes: the ``matte.A`` channel of Vera's layered EXRs as plain grey EXRs.

Resolve takes a clip matte from a file's image, not from a named layer of a multi-layer EXR, so each result's
matte is written out as its own EXR (R = G = B = A = matte, half float, ZIP, same data and display windows).
The host side has no OpenImageIO, so this reads and writes the few OpenEXR forms involved itself: single-part
scanline files, compression NONE, RLE, ZIPS or ZIP (the engine writes ZIP unless asked otherwise). It needs
numpy (optional on the host: without it, or for other compressions, :func:`write_mattes` returns ``None`` and
the results are placed without a clip matte).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

from vera_plugin.hosts.imagefiles import (
    COMPRESSIONS,
    LINES_PER_CHUNK,
    MAGIC,
    SAMPLE_BYTES,
    ExrError,
    ExrHeader,
    read_header,
    unrle,
)

__all__ = ["MatteError", "read_channel", "write_grey_exr", "write_mattes"]

# The header parser and RLE decoder are shared with the pure-Python image helpers.
MatteError = ExrError  # the file is not an EXR this module can read (or is damaged); the message says why
_COMPRESSION = COMPRESSIONS
_LINES = LINES_PER_CHUNK
_SIZES = SAMPLE_BYTES


def _unpredict(raw: bytes, np: Any) -> bytes:
    # OpenEXR's ZIP/RLE predictor undone: t[0] = d[0], t[i] = t[i-1] + d[i] - 128 (mod 256, uint8 wraps) ...
    deltas = np.frombuffer(raw, np.uint8)
    steps = deltas - np.uint8(128)
    steps[0] = deltas[0]
    summed = np.cumsum(steps, dtype=np.uint8)
    # ... then the byte interleave: the first half holds the even bytes, the second half the odd ones.
    out = np.empty_like(summed)
    half = (len(summed) + 1) // 2
    out[0::2], out[1::2] = summed[:half], summed[half:]
    return out.tobytes()


def _predict(raw: bytes, np: Any) -> bytes:
    # The inverse of _unpredict, for writing.
    data = np.frombuffer(raw, np.uint8)
    shuffled = np.concatenate([data[0::2], data[1::2]])
    deltas = shuffled.copy()
    deltas[1:] = shuffled[1:] - shuffled[:-1] + np.uint8(128)
    return deltas.tobytes()


def read_channel(path: str | os.PathLike[str], channel: str) -> tuple[Any, ExrHeader]:
    """``channel`` of a scanline EXR as a float32 (height, width) array of its data window, and the header."""
    import numpy as np

    path = os.fspath(path)
    data = Path(path).read_bytes()
    header = read_header(data, path)
    try:
        return _read_channel(data, header, path, channel, np), header
    except (struct.error, zlib.error, IndexError, ValueError) as exc:
        if isinstance(exc, MatteError):
            raise
        # A truncated download or a damaged file: no matte, said plainly, rather than a zlib traceback.
        raise MatteError(f"{path}: damaged EXR data ({type(exc).__name__}: {exc})") from None


def _read_channel(data: bytes, header: ExrHeader, path: str, channel: str, np: Any) -> Any:
    if header.compression not in _COMPRESSION:
        raise MatteError(f"{path}: compression {header.compression} is not none/rle/zips/zip")
    names = [c for c, _ in header.channels]
    if channel not in names:
        raise MatteError(f"{path}: no channel {channel!r}; it has {names}")
    x0, y0, x1, y1 = header.data_window
    width, height = x1 - x0 + 1, y1 - y0 + 1
    lines = _LINES[header.compression]
    chunks = (height + lines - 1) // lines
    offsets = struct.unpack_from(f"<{chunks}Q", data, header.header_end)
    ptype = dict(header.channels)[channel]
    dtype = {0: np.uint32, 1: np.float16, 2: np.float32}[ptype]
    before = sum(_SIZES[t] * width for c, t in header.channels if c < channel)
    row_bytes = sum(_SIZES[t] * width for _, t in header.channels)
    out = np.empty((height, width), np.float32)
    for offset in offsets:
        y, size = struct.unpack_from("<ii", data, offset)
        rows = min(lines, y1 - y + 1)
        raw_size = rows * row_bytes
        block = data[offset + 8 : offset + 8 + size]
        if size < raw_size:  # stored raw when compression would not have helped
            block = zlib.decompress(block) if header.compression in (2, 3) else unrle(block, raw_size)
            block = _unpredict(block, np)
        for r in range(rows):
            start = r * row_bytes + before
            row = np.frombuffer(block, dtype, width, start).astype(np.float32)
            out[y - y0 + r] = row
    return out


def write_grey_exr(
    path: str | os.PathLike[str],
    values: Any,
    data_window: tuple[int, int, int, int],
    display_window: tuple[int, int, int, int],
) -> Path:
    """Write ``values`` (height, width) as a half-float ZIP EXR with A = B = G = R = values, atomically."""
    import numpy as np

    values = np.asarray(values, np.float16)
    height, width = values.shape
    x0, y0, x1, y1 = data_window
    if (x1 - x0 + 1, y1 - y0 + 1) != (width, height):
        raise MatteError(f"{path}: data window {data_window} does not match {width}x{height} values")

    def attr(name: str, kind: str, value: bytes) -> bytes:
        return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value

    chlist = b"".join(c.encode() + b"\0" + struct.pack("<iB3xii", 1, 0, 1, 1) for c in "ABGR") + b"\0"
    header = b"".join([
        struct.pack("<ii", MAGIC, 2),
        attr("channels", "chlist", chlist),
        attr("compression", "compression", bytes([3])),
        attr("dataWindow", "box2i", struct.pack("<iiii", *data_window)),
        attr("displayWindow", "box2i", struct.pack("<iiii", *display_window)),
        attr("lineOrder", "lineOrder", bytes([0])),
        attr("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        attr("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
        attr("screenWindowWidth", "float", struct.pack("<f", 1.0)),
        b"\0",
    ])  # fmt: skip
    chunks = []
    for y in range(0, height, 16):
        rows = values[y : y + 16]
        raw = b"".join(np.repeat(row[None], 4, 0).astype("<f2").tobytes() for row in rows)
        packed = zlib.compress(_predict(raw, np), 6)
        body = packed if len(packed) < len(raw) else raw
        chunks.append(struct.pack("<ii", y0 + y, len(body)) + body)
    table_end = len(header) + 8 * len(chunks)
    offsets, pos = [], table_end
    for chunk in chunks:
        offsets.append(pos)
        pos += len(chunk)
    target = Path(path)
    part = target.with_name(target.name + ".part")
    part.write_bytes(header + struct.pack(f"<{len(offsets)}Q", *offsets) + b"".join(chunks))
    os.replace(part, target)
    return target


def write_mattes(
    files: list[str] | list[Path], out_dir: str | os.PathLike[str], channel: str = "matte.A"
) -> list[Path] | None:
    """One grey matte EXR per result file, same names, in ``out_dir``; ``None`` without numpy or for
    results in a compression this module does not read."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        try:
            values, header = read_channel(f, channel)
        except MatteError:
            return None
        written.append(write_grey_exr(out / Path(f).name, values, header.data_window, header.display_window))
    return written
