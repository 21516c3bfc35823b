"""Small image files without numpy or OpenImageIO, for hosts whose Python has neither.

- :func:`write_png`: an 8-bit RGB PNG (the engine's live previews, shown in Nuke through a Read).
- :func:`read_header`, :func:`read_pixel`: the header and one pixel of a single-part scanline OpenEXR (none, RLE,
  ZIPS or ZIP compression: what the engine and Resolve's lossless EXR codecs write), in pure Python.
- :func:`write_constant_exr`: an uncompressed scanline EXR whose every pixel holds the given channel values (the
  self-tests' generated plates and results).

OpenEXR layout as in the OpenEXR file-layout document ("Technical Introduction", "OpenEXR File Layout"): magic
and version, attributes until a null byte, a line-offset table, then chunks of ``y, size, data``; channels are
stored in alphabetical order, each row channel by channel; ZIP/RLE data is byte-interleaved and delta-predicted.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ExrError", "ExrHeader", "read_header", "read_pixel", "write_constant_exr", "write_png"]

MAGIC = 20000630
COMPRESSIONS = {0: "none", 1: "rle", 2: "zips", 3: "zip"}
LINES_PER_CHUNK = {0: 1, 1: 1, 2: 1, 3: 16}
SAMPLE_BYTES = {0: 4, 1: 2, 2: 4}  # UINT, HALF, FLOAT
_SAMPLE_FORMAT = {0: "<I", 1: "<e", 2: "<f"}


class ExrError(ValueError):
    """The file is not an EXR this module reads (or is damaged); the message names the file and why."""


@dataclass(frozen=True)
class ExrHeader:
    """What the readers need from an EXR header."""

    channels: list[tuple[str, int]]  # (name, pixel type 0 uint / 1 half / 2 float), in file order (sorted)
    compression: int
    data_window: tuple[int, int, int, int]  # x min, y min, x max, y max (inclusive)
    display_window: tuple[int, int, int, int]
    header_end: int  # offset of the line-offset table

    @property
    def width(self) -> int:
        """Data window width."""
        return self.data_window[2] - self.data_window[0] + 1

    @property
    def height(self) -> int:
        """Data window height."""
        return self.data_window[3] - self.data_window[1] + 1


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("latin-1"), end + 1


def read_header(data: bytes, path: str = "") -> ExrHeader:
    """The header of EXR file bytes ``data`` (``path`` names the file in errors)."""
    try:
        magic, version = struct.unpack_from("<ii", data, 0)
        if magic != MAGIC:
            raise ExrError(f"{path}: not an OpenEXR file")
        if version & (0x200 | 0x800 | 0x1000):
            raise ExrError(f"{path}: tiled, deep or multi-part EXR; expected a scanline image")
        pos, attrs = 8, {}
        while data[pos] != 0:
            name, pos = _cstring(data, pos)
            _kind, pos = _cstring(data, pos)
            (size,) = struct.unpack_from("<i", data, pos)
            attrs[name] = data[pos + 4 : pos + 4 + size]
            pos += 4 + size
        channels, cpos, chlist = [], 0, attrs["channels"]
        while chlist[cpos] != 0:
            cname, cpos = _cstring(chlist, cpos)
            ptype, _linear, xs, ys = struct.unpack_from("<iB3xii", chlist, cpos)
            if (xs, ys) != (1, 1):
                raise ExrError(f"{path}: channel {cname} is subsampled; expected full resolution")
            channels.append((cname, ptype))
            cpos += 16
        return ExrHeader(
            channels,
            attrs["compression"][0],
            struct.unpack("<iiii", attrs["dataWindow"]),
            struct.unpack("<iiii", attrs["displayWindow"]),
            pos + 1,
        )
    except (struct.error, IndexError, KeyError, ValueError) as exc:
        if isinstance(exc, ExrError):
            raise
        raise ExrError(f"{path}: damaged EXR header ({type(exc).__name__}: {exc})") from None


def unrle(data: bytes, size: int) -> bytes:
    """OpenEXR's RLE: a signed count byte, then that many literal bytes (negative) or one byte repeated."""
    out, pos = bytearray(), 0
    while pos < len(data) and len(out) < size:
        count = struct.unpack_from("<b", data, pos)[0]
        pos += 1
        if count < 0:
            out += data[pos : pos + -count]
            pos += -count
        else:
            out += data[pos : pos + 1] * (count + 1)
            pos += 1
    return bytes(out)


def unpredict(raw: bytes) -> bytes:
    """Undo the ZIP/RLE predictor and byte interleave (pure Python: for a few rows, not whole images)."""
    summed = bytearray(len(raw))
    previous = 0
    for i, byte in enumerate(raw):
        previous = byte if i == 0 else (previous + byte - 128) & 0xFF
        summed[i] = previous
    half = (len(summed) + 1) // 2
    out = bytearray(len(summed))
    out[0::2], out[1::2] = summed[:half], summed[half:]
    return bytes(out)


def read_pixel(path: str | os.PathLike[str], x: int, y: int) -> dict[str, float]:
    """Every channel's value at pixel (x, y) of a scanline EXR (y down from the data window's top row)."""
    path = os.fspath(path)
    data = Path(path).read_bytes()
    header = read_header(data, path)
    if header.compression not in COMPRESSIONS:
        raise ExrError(f"{path}: compression {header.compression} is not none/rle/zips/zip")
    x0, y0, x1, y1 = header.data_window
    if not (x0 <= x0 + x <= x1 and y0 <= y0 + y <= y1):
        raise ExrError(f"{path}: pixel ({x}, {y}) is outside the {header.width}x{header.height} image")
    lines = LINES_PER_CHUNK[header.compression]
    chunk = y // lines
    row_bytes = sum(SAMPLE_BYTES[t] * header.width for _, t in header.channels)
    try:
        (offset,) = struct.unpack_from("<Q", data, header.header_end + 8 * chunk)
        first_row, size = struct.unpack_from("<ii", data, offset)
        rows = min(lines, y1 - first_row + 1)
        block = data[offset + 8 : offset + 8 + size]
        if size < rows * row_bytes:  # stored raw when compression would not have helped
            block = zlib.decompress(block) if header.compression in (2, 3) else unrle(block, rows * row_bytes)
            block = unpredict(block)
        start = (y0 + y - first_row) * row_bytes
        values = {}
        for name, ptype in header.channels:
            values[name] = float(
                struct.unpack_from(_SAMPLE_FORMAT[ptype], block, start + SAMPLE_BYTES[ptype] * x)[0]
            )
            start += SAMPLE_BYTES[ptype] * header.width
        return values
    except (struct.error, zlib.error, IndexError) as exc:
        raise ExrError(f"{path}: damaged EXR data ({type(exc).__name__}: {exc})") from None


def _attribute(name: str, kind: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value


def write_constant_exr(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    values: Mapping[str, float],
    pixel_type: str = "half",
) -> Path:
    """Write an uncompressed scanline EXR of ``width`` x ``height`` where channel ``name`` is ``values[name]``
    everywhere (``pixel_type`` ``"half"`` or ``"float"``); written atomically."""
    ptype = {"half": 1, "float": 2}[pixel_type]
    names = sorted(values)
    chlist = b"".join(n.encode() + b"\0" + struct.pack("<iB3xii", ptype, 0, 1, 1) for n in names) + b"\0"
    window = struct.pack("<iiii", 0, 0, width - 1, height - 1)
    header = b"".join([
        struct.pack("<ii", MAGIC, 2),
        _attribute("channels", "chlist", chlist),
        _attribute("compression", "compression", bytes([0])),
        _attribute("dataWindow", "box2i", window),
        _attribute("displayWindow", "box2i", window),
        _attribute("lineOrder", "lineOrder", bytes([0])),
        _attribute("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        _attribute("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
        _attribute("screenWindowWidth", "float", struct.pack("<f", 1.0)),
        b"\0",
    ])  # fmt: skip
    sample = _SAMPLE_FORMAT[ptype]
    row = b"".join(struct.pack(sample, values[n]) * width for n in names)
    chunk_size = 8 + len(row)
    table = struct.pack(f"<{height}Q", *(len(header) + 8 * height + y * chunk_size for y in range(height)))
    body = b"".join(struct.pack("<ii", y, len(row)) + row for y in range(height))
    return _atomic_write(Path(path), header + table + body)


def write_png(path: str | os.PathLike[str], width: int, height: int, rgb8: bytes) -> Path:
    """Write ``rgb8`` (``width * height * 3`` bytes, rows top first) as an 8-bit RGB PNG, atomically."""
    if len(rgb8) != width * height * 3:
        raise ValueError(
            f"{path}: {len(rgb8)} bytes for a {width}x{height} RGB image; expected {width * height * 3}"
        )

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    stride = width * 3
    scanlines = b"".join(b"\0" + rgb8[y * stride : (y + 1) * stride] for y in range(height))  # filter 0: none
    png = b"".join([
        b"\x89PNG\r\n\x1a\n",
        chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
        chunk(b"IDAT", zlib.compress(scanlines, 6)),
        chunk(b"IEND", b""),
    ])  # fmt: skip
    return _atomic_write(Path(path), png)


def _atomic_write(target: Path, data: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    os.replace(part, target)
    return target
