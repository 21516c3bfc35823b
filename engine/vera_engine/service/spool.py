"""The spool: uploads streamed to disk as they arrive, then committed atomically as a job's inputs.

Layout under the spool root::

    jobs.sqlite                     job state (see store.py)
    incoming/<upload>/              an upload in progress; removed on failure, disconnect or start-up
    jobs/<job id>/inputs/           the committed inputs: manifest.json + one file per frame
    jobs/<job id>/out/              results, vera_edit.####.exr, written atomically by the job runner

Memory stays bounded whatever the plate size: chunks go straight to the frame's file; raw frames are
validated chunk by chunk, EXR frames decoded (once, to validate them) a few at a time. Error messages name the
frame ("plate frame 1004"), never the spool's own files.

The spool is the engine user's alone: folders 0700, frame files and manifests 0600, whatever the umask (a plate
is often confidential). Frames sent by path are opened through :mod:`~vera_engine.service.safe_files` at Submit
and again when the job runs: no symlink followed, never a FIFO or device, and the same device and inode as
Submit checked.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.imaging import exr
from vera_engine.imaging.exr import Window
from vera_engine.service import safe_files

# Both moved to errors.py; importable from here still, for code written before.
from vera_engine.service.errors import InputError
from vera_engine.service.errors import SpoolInUse as SpoolInUse
from vera_engine.service.limits import (
    MAX_FRAME_BYTES,
    MAX_HALF_VALUE,
    MAX_PATH_CHARS,
    MAX_SIDE,
    MIN_SIDE,
    quote,
)
from vera_proto.vera.v1 import engine_pb2 as pb

MANIFEST = "manifest.json"
PATH_QUOTE_CHARS = 160  # a path's prefix in error messages: longer than other values', paths are long

_RAW_DTYPES: dict[int, np.dtype] = {
    pb.SAMPLE_TYPE_FLOAT32: np.dtype("<f4"),
    pb.SAMPLE_TYPE_FLOAT16: np.dtype("<f2"),
}
_LAYER_NAMES = {pb.LAYER_PLATE: "plate", pb.LAYER_MASK: "mask"}


def _frame_field(layer: int, frame: int) -> str:
    return f"{_LAYER_NAMES.get(layer, 'layer?')} frame {frame}"


def is_under(path: Path, roots: Sequence[Path]) -> bool:
    """True if ``path`` (resolved, symlinks followed) lies inside one of ``roots``."""
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def _first_bad(values: np.ndarray) -> int:
    """Index of the first non-finite sample of a flat array (assumes there is one)."""
    return int(np.flatnonzero(~np.isfinite(values))[0])


def _bad_sample_message(index: int, width: int, channels: int) -> str:
    pixel = index // channels
    return (
        f"contains NaN or infinite samples (the first at pixel x={pixel % width}, y={pixel // width}, "
        f"channel {index % channels}); fix or clamp the plate before sending"
    )


def check_shape(field: str, shape: tuple[int, ...], layer: int) -> None:
    """Validate a frame's (H, W, C) against the size limits and the layer's channel count."""
    if len(shape) != 3:
        raise InputError(field, f"expected an image of shape (height, width, channels), got {shape}")
    h, w, c = shape
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise InputError(
            field, f"size {w}x{h} is out of range; width and height must be {MIN_SIDE}..{MAX_SIDE} pixels"
        )
    if layer == pb.LAYER_PLATE and c not in (3, 4):
        raise InputError(field, f"has {c} channels; a plate frame needs 3 (RGB) or 4 (RGBA)")
    if layer == pb.LAYER_MASK and c != 1:
        raise InputError(
            field, f"has {c} channels; a mask frame needs exactly 1 (or an 'A' channel in an EXR)"
        )


def check_values(
    field: str,
    values: np.ndarray,
    layer: int,
    width: int,
    channels: int,
    start: int = 0,
    max_abs: float | None = None,
) -> None:
    """Refuse NaN/Inf anywhere, plate samples beyond ``max_abs`` (if given) and mask values outside [0, 1].

    ``values`` is flat, ``start`` its offset in the frame.
    """
    if not np.isfinite(values).all():
        raise InputError(field, _bad_sample_message(start + _first_bad(values), width, channels))
    # Two reductions and no temporary for the usual in-range frame; the offending sample is only looked for when
    # there is one (an upload holds a few frames in memory at once, not copies of them).
    if (
        max_abs is not None
        and layer == pb.LAYER_PLATE
        and values.size
        and (values.max() > max_abs or values.min() < -max_abs)
    ):
        beyond = np.abs(values) > max_abs
        if beyond.any():
            index = int(np.flatnonzero(beyond)[0])
            pixel = (start + index) // channels
            raise InputError(
                field,
                f"sample {float(values[index]):g} (pixel x={pixel % width}, y={pixel // width}, channel "
                f"{(start + index) % channels}) is beyond +-{max_abs:g}, the range of bit_depth 'half' results; "
                "ask for bit_depth 'float' or scale the plate",
            )
    if layer == pb.LAYER_MASK and values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise InputError(
            field, f"mask values range {float(values.min()):g}..{float(values.max()):g}; expected 0..1"
        )


def check_pixels(field: str, pixels: np.ndarray, layer: int, max_abs: float | None = None) -> np.ndarray:
    """Validate a decoded frame (H, W, C) and return it as float32 (mask: (H, W))."""
    check_shape(field, pixels.shape, layer)
    check_values(field, pixels.reshape(-1), layer, pixels.shape[1], pixels.shape[2], max_abs=max_abs)
    out = np.asarray(pixels, dtype=np.float32)
    return out[..., 0] if layer == pb.LAYER_MASK else out


def _private_file(path: Path) -> Any:
    """A new file for writing that only the engine's user can read (0600 whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o600), "wb")


def _decode_opened(
    fd: int, layer: int, field: str, max_abs: float | None, sent_path: str | None = None
) -> tuple[int, int, int]:
    """:func:`_decode_and_check` of a frame opened by :func:`safe_files.open_regular`; closes ``fd``."""
    try:
        return _decode_and_check(Path(safe_files.fd_path(fd)), layer, field, max_abs, sent_path)
    finally:
        os.close(fd)


FRAME_LIMITS = exr.HeaderLimits(MIN_SIDE, MAX_SIDE)
"""What an engine refuses from a frame's header before decoding it (a small file may declare a huge image)."""


def _reserve_decode(width: int, height: int, channels: int) -> AbstractContextManager[None]:
    """The decode's share of the process's decode budget (``--decode-memory``), shared by uploads and jobs."""
    try:
        return safe_files.DECODE.reserve(safe_files.decode_cost(width, height, channels))
    except safe_files.DecodeBudget.OverBudget as exc:
        raise exr.PlateError(str(exc)) from None


def _without_path(message: str, path: Path) -> str:
    """``message`` without ``path``, on one line (OpenImageIO repeats its errors on several): callers name the
    frame, and where the engine keeps a frame is its own business, not the client's."""
    lines = message.replace(f"{path}: ", "").replace(str(path), "the file").splitlines()
    return "; ".join(dict.fromkeys(line.strip() for line in lines if line.strip()))


def read_frame(path: Path, layer: int) -> np.ndarray:
    """One spooled or path frame through `imaging/exr.py`, opened once: OpenEXR only, its header within
    :data:`FRAME_LIMITS`, its decode inside the process's budget. A plate frame is (H, W, 3 or 4), a mask frame
    (H, W, 1), float32. Raises `exr.PlateError` with the path left out. ``path`` may be
    :func:`safe_files.fd_path` of a file opened safely."""
    try:
        if layer == pb.LAYER_MASK:
            return exr.read_mask(path, limits=FRAME_LIMITS, reserve=_reserve_decode)
        return exr.read_exr(path, limits=FRAME_LIMITS, reserve=_reserve_decode)[0]
    except exr.PlateError as exc:
        raise exr.PlateError(_without_path(str(exc), path)) from None


def _decode_and_check(
    path: Path, layer: int, field: str, max_abs: float | None, sent_path: str | None = None
) -> tuple[int, int, int]:
    """Decode one EXR frame and validate it; returns its (H, W, C). Runs on the upload's decode threads.

    ``sent_path``: the frame came by path (shown as the client sent it): a file that is no EXR is the path's fault.
    """
    try:
        pixels = read_frame(path, layer)
    except exr.PlateError as exc:
        if sent_path is not None:
            raise InputError(f"{field}.path", f"{sent_path} is not a usable OpenEXR frame: {exc}") from None
        raise InputError(field, f"not a usable OpenEXR frame: {exc}") from None
    check_pixels(field, pixels, layer, max_abs)
    return pixels.shape  # type: ignore[return-value]


@dataclass
class _OpenFrame:
    layer: int
    frame: int
    field: str
    encoding: int
    total: int
    received: int
    file: Path
    handle: Any
    raw: pb.RawFormat | None
    dtype: np.dtype | None = None
    carry: bytes = b""  # raw bytes of a sample split across chunks


@dataclass
class _Pending:
    layer: int
    frame: int
    field: str
    entry: dict[str, Any]
    shape: Future[tuple[int, int, int]]
    fd: int | None = None  # a path frame's open file, closed by the decode (or by _shutdown if it never ran)


class Upload:
    """One Submit stream being written into ``incoming/<id>/``; call :meth:`commit` or :meth:`discard`.

    Raw frames are validated chunk by chunk as they stream; EXR frames are decoded and validated on a small
    thread pool while the next frames arrive, a bounded number at a time, so memory stays bounded and the
    decoding overlaps the transfer.
    """

    DECODE_THREADS = 2

    def __init__(self, directory: Path, header: pb.JobHeader, allowed_roots: Sequence[Path]) -> None:
        self.dir = directory
        self.header = header
        self.allowed_roots = list(allowed_roots)
        self.expected = set(header.frames)
        self.seen: set[tuple[int, int]] = set()
        self.done: dict[int, dict[int, dict[str, Any]]] = {pb.LAYER_PLATE: {}, pb.LAYER_MASK: {}}
        self.size: tuple[int, int] | None = None
        self.bytes_received = 0
        # Plate samples a half-float result cannot hold are refused now, not written back as infinity later.
        self.max_abs = MAX_HALF_VALUE if header.bit_depth == "half" else None
        self._open: _OpenFrame | None = None
        self._pending: deque[_Pending] = deque()
        self._pool: ThreadPoolExecutor | None = None
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)

    # -- streaming -----------------------------------------------------------------------------------------

    def add_chunk(self, chunk: pb.FrameChunk) -> None:
        """Append one FrameChunk to the spool, validating the frame as it streams or once it is complete."""
        field = _frame_field(chunk.layer, chunk.frame)
        cur = self._open
        if cur is not None and (cur.layer, cur.frame) != (chunk.layer, chunk.frame):
            raise InputError(
                cur.field, f"truncated: {cur.received} of {cur.total} bytes arrived before {field} started"
            )
        if cur is None:
            self._collect(block=False)
            self._begin(chunk, field)
            cur = self._open
            if cur is None:  # a path frame is complete in one message
                return
        if chunk.offset != cur.received:
            raise InputError(
                field, f"chunk at offset {chunk.offset}, expected {cur.received} (chunks out of order)"
            )
        if cur.received + len(chunk.data) > cur.total:
            raise InputError(field, f"more data than the declared total_size {cur.total}")
        if cur.dtype is not None:
            self._check_raw_chunk(cur, chunk.data)
        cur.handle.write(chunk.data)
        cur.received += len(chunk.data)
        self.bytes_received += len(chunk.data)
        if cur.received == cur.total:
            cur.handle.close()
            self._open = None
            self._finish_frame(cur)

    def _begin(self, chunk: pb.FrameChunk, field: str) -> None:
        if chunk.layer not in _LAYER_NAMES:
            raise InputError(
                f"frame {chunk.frame}.layer", f"{chunk.layer}; must be LAYER_PLATE or LAYER_MASK"
            )
        if chunk.frame not in self.expected:
            raise InputError(field, f"frame {chunk.frame} is not in the header's frames list")
        if chunk.layer == pb.LAYER_MASK and not self.header.has_mask:
            raise InputError(field, "a mask frame was sent but the header says has_mask=false")
        if (chunk.layer, chunk.frame) in self.seen:
            raise InputError(field, f"duplicate frame: {field} was already sent")
        if chunk.offset != 0:
            raise InputError(field, f"first chunk of a frame must have offset 0, got {chunk.offset}")
        self.seen.add((chunk.layer, chunk.frame))
        name = _LAYER_NAMES[chunk.layer]
        if chunk.encoding == pb.ENCODING_PATH:
            self._begin_path(chunk, field)
            return
        dtype = None
        if chunk.encoding == pb.ENCODING_EXR:
            suffix, raw = "exr", None
        elif chunk.encoding == pb.ENCODING_RAW:
            suffix, raw = "raw", chunk.raw
            dtype = self._check_raw(chunk, field)
        else:
            raise InputError(f"{field}.encoding", "must be ENCODING_EXR, ENCODING_RAW or ENCODING_PATH")
        if not 0 < chunk.total_size <= MAX_FRAME_BYTES:
            raise InputError(
                f"{field}.total_size",
                f"{chunk.total_size} bytes; expected 1..{MAX_FRAME_BYTES} bytes per frame",
            )
        path = self.dir / f"{name}.{chunk.frame}.{suffix}"
        self._open = _OpenFrame(
            layer=chunk.layer,
            frame=chunk.frame,
            field=field,
            encoding=chunk.encoding,
            total=chunk.total_size,
            received=0,
            file=path,
            handle=_private_file(path),  # closed when the frame completes or in discard()
            raw=raw,
            dtype=dtype,
        )

    def _check_raw(self, chunk: pb.FrameChunk, field: str) -> np.dtype:
        raw = chunk.raw
        dtype = _RAW_DTYPES.get(raw.sample_type)
        if dtype is None:
            raise InputError(f"{field}.raw.sample_type", "must be SAMPLE_TYPE_FLOAT32 or SAMPLE_TYPE_FLOAT16")
        if not (MIN_SIDE <= raw.width <= MAX_SIDE and MIN_SIDE <= raw.height <= MAX_SIDE):
            raise InputError(
                f"{field}.raw", f"size {raw.width}x{raw.height} is out of range {MIN_SIDE}..{MAX_SIDE} pixels"
            )
        want_channels = (3, 4) if chunk.layer == pb.LAYER_PLATE else (1,)
        if raw.channels not in want_channels:
            raise InputError(f"{field}.raw.channels", f"{raw.channels}; expected one of {want_channels}")
        expected = raw.width * raw.height * raw.channels * dtype.itemsize
        if chunk.total_size != expected:
            raise InputError(
                f"{field}.total_size",
                f"{chunk.total_size} bytes, but {raw.width}x{raw.height}x{raw.channels} {dtype.name} is {expected}",
            )
        return dtype

    def _check_raw_chunk(self, cur: _OpenFrame, data: bytes) -> None:
        # Samples may straddle chunk boundaries: carry the odd bytes over to the next chunk.
        assert cur.dtype is not None and cur.raw is not None
        item = cur.dtype.itemsize
        buffer = cur.carry + data if cur.carry else data
        whole = len(buffer) - len(buffer) % item
        values = np.frombuffer(buffer, dtype=cur.dtype, count=whole // item)
        start = (cur.received - len(cur.carry)) // item
        check_values(cur.field, values, cur.layer, cur.raw.width, cur.raw.channels, start, self.max_abs)
        cur.carry = bytes(buffer[whole:])

    def _begin_path(self, chunk: pb.FrameChunk, field: str) -> None:
        where, text = f"{field}.path", chunk.path
        shown = quote(text, PATH_QUOTE_CHARS)
        # Checked before any file-system call: the OS refuses these with errors (ValueError, ENAMETOOLONG) that
        # would otherwise surface as an engine failure.
        if not text:
            raise InputError(where, "is empty; send the absolute path of an OpenEXR file")
        if len(text) > MAX_PATH_CHARS:
            raise InputError(where, f"is {len(text)} characters; at most {MAX_PATH_CHARS}")
        if "\0" in text:
            raise InputError(where, f"{shown} contains a NUL character")
        if not os.path.isabs(text):
            raise InputError(where, f"{shown} is not absolute")
        if not self.allowed_roots:
            raise InputError(
                where, "path input is disabled on this engine (it has no --allow-root); send the bytes"
            )
        if chunk.data:
            raise InputError(
                f"{field}.data",
                f"a frame sent by path carries no data ({len(chunk.data)} bytes came); send either the path or "
                "the bytes (ENCODING_EXR / ENCODING_RAW)",
            )
        # The resolved path is what is checked, recorded and opened, here and when the job runs, one component
        # at a time without following links (safe_files): a folder swapped for a symlink later cannot redirect
        # the job outside the allowed roots, and a FIFO swapped in cannot block the decode.
        real = Path(os.path.realpath(text))
        if not is_under(real, self.allowed_roots):
            roots = ", ".join(str(r) for r in self.allowed_roots)
            raise InputError(where, f"{shown} is outside the allowed roots ({roots})")
        try:
            fd = safe_files.open_regular(real)
        except FileNotFoundError:
            raise InputError(where, f"{shown} does not exist") from None
        except safe_files.UnsafeFile as exc:
            raise InputError(where, f"{shown} {exc}") from None
        except OSError as exc:
            raise InputError(where, f"{shown} cannot be read: {exc.strerror or type(exc).__name__}") from None
        # The identity of what was opened (not of a name looked at before): the job must find the same file.
        identity = safe_files.FileIdentity.of(os.fstat(fd))
        entry = {"encoding": "path", "path": str(real), **identity.as_entry()}
        self._decode_later(chunk.layer, chunk.frame, field, real, entry, fd=fd, sent_path=shown)

    def _decode_later(
        self,
        layer: int,
        frame: int,
        field: str,
        path: Path,
        entry: dict[str, Any],
        fd: int | None = None,
        sent_path: str | None = None,
    ) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.DECODE_THREADS, thread_name_prefix="vera-upload")
        if fd is None:
            future = self._pool.submit(_decode_and_check, path, layer, field, self.max_abs, sent_path)
        else:
            future = self._pool.submit(_decode_opened, fd, layer, field, self.max_abs, sent_path)
        self._pending.append(_Pending(layer, frame, field, entry, future, fd))
        # Back-pressure: never more frames decoding or waiting than the pool can hold in memory at once.
        while len(self._pending) > 2 * self.DECODE_THREADS:
            self._collect_one()

    def _finish_frame(self, cur: _OpenFrame) -> None:
        if cur.encoding == pb.ENCODING_EXR:
            self._decode_later(
                cur.layer, cur.frame, cur.field, cur.file, {"encoding": "exr", "file": cur.file.name}
            )
            return
        assert cur.raw is not None and cur.dtype is not None
        entry = {
            "encoding": "raw",
            "file": cur.file.name,
            "width": cur.raw.width,
            "height": cur.raw.height,
            "channels": cur.raw.channels,
            "dtype": cur.dtype.str,
        }
        self._record(
            cur.layer, cur.frame, cur.field, (cur.raw.height, cur.raw.width, cur.raw.channels), entry
        )

    def _collect_one(self) -> None:
        pending = self._pending.popleft()
        self._record(pending.layer, pending.frame, pending.field, pending.shape.result(), pending.entry)

    def _collect(self, block: bool) -> None:
        """Record decoded frames in order; raises the first frame's InputError."""
        while self._pending and (block or self._pending[0].shape.done()):
            self._collect_one()

    def _record(
        self, layer: int, frame: int, field: str, shape: tuple[int, int, int], entry: dict[str, Any]
    ) -> None:
        h, w, c = shape
        if self.size is None:
            self.size = (w, h)
        elif self.size != (w, h):
            first = self.size
            raise InputError(
                field,
                f"is {w}x{h} but earlier frames are {first[0]}x{first[1]}; every frame must be the same size",
            )
        if layer == pb.LAYER_PLATE:
            entry["channels"] = c
        self.done[layer][frame] = entry

    # -- end of stream -------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Check that every frame arrived and validated; raises InputError naming the first bad one."""
        if self._open is not None:
            cur = self._open
            raise InputError(
                cur.field, f"truncated: the stream ended after {cur.received} of {cur.total} bytes"
            )
        self._collect(block=True)
        layers = [pb.LAYER_PLATE] + ([pb.LAYER_MASK] if self.header.has_mask else [])
        for layer in layers:
            missing = sorted(self.expected - set(self.done[layer]))
            if missing:
                shown = ", ".join(str(f) for f in missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise InputError(
                    _frame_field(layer, missing[0]),
                    f"missing frames: {shown} ({len(missing)} of {len(self.expected)} never arrived)",
                )

    def commit(self, destination: Path) -> None:
        """Write the manifest and move the upload to ``destination`` (one atomic rename)."""
        assert self.size is not None
        self._shutdown()
        manifest = {
            "frames": list(self.header.frames),
            "width": self.size[0],
            "height": self.size[1],
            "has_mask": self.header.has_mask,
            "plate": {str(k): v for k, v in self.done[pb.LAYER_PLATE].items()},
            "mask": {str(k): v for k, v in self.done[pb.LAYER_MASK].items()},
        }
        tmp = self.dir / (MANIFEST + ".tmp")
        with _private_file(tmp) as handle:
            handle.write(json.dumps(manifest, indent=1).encode())
        os.replace(tmp, self.dir / MANIFEST)
        destination.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(self.dir, destination)

    def _shutdown(self) -> None:
        if self._pool is not None:
            for pending in self._pending:
                if pending.shape.cancel() and pending.fd is not None:
                    os.close(pending.fd)  # never ran, so never closed its file
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()

    def discard(self) -> None:
        """Remove everything this upload wrote."""
        if self._open is not None:
            self._open.handle.close()
            self._open = None
        self._shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


def _changed_path_frame(layer: int, frame: int, entry: dict[str, Any], exc: Exception) -> InputError:
    """The error of a frame sent by path that is gone, replaced or changed since Submit: names the frame and path."""
    return InputError(f"{_frame_field(layer, frame)}.path", f"{entry['path']} {exc}")


class SpooledInputs:
    """Read access to a committed job's inputs, for job runners."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
        self.frames: list[int] = list(self.manifest["frames"])
        self.width: int = self.manifest["width"]
        self.height: int = self.manifest["height"]
        self.has_mask: bool = self.manifest["has_mask"]

    def _read(self, layer: int, frame: int) -> np.ndarray:
        name = _LAYER_NAMES[layer]
        entry = self.manifest[name][str(frame)]
        field = _frame_field(layer, frame)
        if entry["encoding"] == "raw":
            shape = (entry["height"], entry["width"], entry["channels"])
            pixels = np.fromfile(self.dir / entry["file"], dtype=np.dtype(entry["dtype"])).reshape(shape)
        else:
            with self.exr_file(layer, frame) as path:
                try:
                    pixels = read_frame(path, layer)
                except exr.PlateError as exc:
                    raise InputError(field, f"changed since it was submitted: {exc}") from None
        return check_pixels(field, pixels, layer)

    @contextmanager
    def exr_file(self, layer: int, frame: int) -> Iterator[Path]:
        """The one place an EXR frame's file is found: the spool's copy, or a frame sent by path opened safely
        (no link followed, a regular file) and checked to be the file Submit checked
        (:func:`safe_files.open_recorded`); yields a name to decode it from, valid inside the ``with`` block.

        A frame sent by path that is gone, replaced or changed fails naming the frame (``plate frame 7.path``).
        """
        entry = self.manifest[_LAYER_NAMES[layer]][str(frame)]
        if entry["encoding"] != "path":
            yield self.dir / entry["file"]
            return
        with ExitStack() as stack:
            try:
                fd = stack.enter_context(safe_files.open_recorded(entry))
            except safe_files.UnsafeFile as exc:
                raise _changed_path_frame(layer, frame, entry, exc) from None
            yield Path(safe_files.fd_path(fd))

    def exr_bytes(self, layer: int, frame: int) -> bytes:
        """An EXR frame's bytes, found as :meth:`exr_file` finds it (for a worker that does not see the spool)."""
        entry = self.manifest[_LAYER_NAMES[layer]][str(frame)]
        if entry["encoding"] != "path":
            return (self.dir / entry["file"]).read_bytes()
        try:
            return safe_files.read_recorded(entry)
        except safe_files.UnsafeFile as exc:
            raise _changed_path_frame(layer, frame, entry, exc) from None

    def windows(self) -> tuple[Window, Window] | None:
        """(data window, display window) of the first plate frame if it came as an EXR, else None.

        Results carry the plate's windows, so overscan plates line up in the comp.
        """
        first = self.frames[0]
        if self.manifest["plate"][str(first)]["encoding"] == "raw":
            return None
        field = _frame_field(pb.LAYER_PLATE, first)
        with self.exr_file(pb.LAYER_PLATE, first) as path:
            try:
                return exr.read_windows(path, limits=FRAME_LIMITS)
            except exr.PlateError as exc:
                raise InputError(
                    field, f"changed since it was submitted: {_without_path(str(exc), path)}"
                ) from None

    def plate_frame(self, frame: int) -> np.ndarray:
        """One plate frame, (H, W, 3 or 4) float32 scene-linear."""
        return self._read(pb.LAYER_PLATE, frame)

    def mask_frame(self, frame: int) -> np.ndarray:
        """One mask frame, (H, W) float32."""
        return self._read(pb.LAYER_MASK, frame)

    def plate_frames(self) -> FrameSequence:
        """The plate read frame by frame on demand (a ``PlateFrames`` for ``edit_plate``): never held whole."""
        return FrameSequence(self.plate_frame, self.frames)

    def mask_frames(self) -> FrameSequence | None:
        """The mask read frame by frame on demand, or None."""
        return FrameSequence(self.mask_frame, self.frames) if self.has_mask else None

    def plate(self) -> np.ndarray:
        """The whole plate, (F, H, W, C) float32, C the smallest channel count of its frames."""
        frames = [self.plate_frame(f) for f in self.frames]
        channels = min(f.shape[-1] for f in frames)
        return np.stack([f[..., :channels] for f in frames])

    def mask(self) -> np.ndarray | None:
        """The whole mask, (F, H, W) float32, or None."""
        if not self.has_mask:
            return None
        return np.stack([self.mask_frame(f) for f in self.frames])


class FrameSequence:
    """One layer's frames, read from the spool when indexed: ``len()`` and ``[i]`` (the i-th frame number's pixels)."""

    def __init__(self, read: Callable[[int], np.ndarray], frames: Sequence[int]) -> None:
        self._read, self.frames = read, list(frames)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._read(self.frames[index])


class Spool:
    """The spool folder of one engine."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.jobs = self.root / "jobs"
        # The engine user's alone (plates are often confidential), whatever the umask.
        for folder in (self.root, self.incoming, self.jobs):
            safe_files.private_dir(folder)
        self._lock: Any = None

    def lock(self) -> None:
        """Claim the spool for this engine; :class:`SpoolInUse` if another engine holds it.

        Two engines on one spool would both "recover" and run each other's jobs. The lock is an flock, so
        the kernel releases it when the holder dies, even by ``kill -9``.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; one engine per spool is then up to the operator
            return
        handle = open(self.root / "engine.lock", "a+")  # noqa: SIM115 - held open for the engine's life
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SpoolInUse(
                f"spool {self.root} is in use by another engine (pid {holder}); give each engine its own --spool"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        """Release the spool (closing the file drops the flock)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def db_path(self) -> Path:
        """Where the job store lives."""
        return self.root / "jobs.sqlite"

    def clean_incoming(self) -> int:
        """Remove uploads a crash left half-written; returns how many."""
        leftovers = list(self.incoming.iterdir())
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return len(leftovers)

    def new_upload(self, header: pb.JobHeader, allowed_roots: Sequence[Path]) -> Upload:
        """Start receiving a Submit stream."""
        return Upload(self.incoming / uuid.uuid4().hex, header, allowed_roots)

    def job_dir(self, job_id: str) -> Path:
        """Folder of one job."""
        return self.jobs / job_id

    def inputs_dir(self, job_id: str) -> Path:
        """Committed inputs of one job."""
        return self.job_dir(job_id) / "inputs"

    def output_dir(self, job_id: str) -> Path:
        """Results of one job."""
        return self.job_dir(job_id) / "out"

    def remove_inputs(self, job_id: str) -> None:
        """Drop a finished job's inputs (its results stay for the retention period)."""
        shutil.rmtree(self.inputs_dir(job_id), ignore_errors=True)

    def remove_job(self, job_id: str) -> None:
        """Drop everything of a job."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def orphans(self, known: set[str]) -> list[str]:
        """Job folders with no row in the store (a crash between commit and insert)."""
        return [p.name for p in self.jobs.iterdir() if p.name not in known]
