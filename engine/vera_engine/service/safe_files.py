"""Opening files a client named, and bounding what decoding them may cost: the engine's file-system trust boundary.

A frame sent by path (``ENCODING_PATH``) is checked at Submit and read again when the job runs, possibly minutes
later and on another thread or node. Between the two, whoever can write under an ``--allow-root`` folder can swap
a folder for a symlink to outside the root, or the file for a FIFO (which blocks OpenImageIO's ``open()`` while it
holds the GIL: every thread of the engine stops). So a recorded path is never opened by name:

* :func:`open_regular` walks the path one component at a time with ``O_NOFOLLOW`` (``openat``), so no symlink is
  followed anywhere, opens the file ``O_NONBLOCK`` (a FIFO cannot block) and requires a regular file by
  ``fstat`` of what was opened;
* :func:`open_recorded` also compares the opened file's device, inode, size and modification time with what
  Submit recorded, so a file replaced in place is refused too;
* OpenImageIO gets the open file (:func:`fd_path`: ``/proc/self/fd/N``, a link to the opened file itself that
  cannot be redirected), never the name.

:class:`DecodeBudget` bounds the memory of EXR decodes in flight across every upload and job of the process: a
small file may declare a huge image (a decompression bomb), so the header is checked and the decode's memory
reserved before any pixel is decoded.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "DECODE",
    "DecodeBudget",
    "FileIdentity",
    "UnsafeFile",
    "fd_path",
    "open_recorded",
    "open_regular",
    "read_recorded",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# O_PATH: a folder on the way needs only search permission, as with an ordinary open by name.
_WALK = getattr(os, "O_PATH", os.O_RDONLY) | _DIRECTORY | _NOFOLLOW | _CLOEXEC


class UnsafeFile(ValueError):
    """The file cannot be opened safely: a symlink on the way, not a regular file, or not the file Submit checked.

    The message says which, without the engine's own paths; callers prefix the frame ("plate frame 1004.path").
    """


@dataclass(frozen=True)
class FileIdentity:
    """What identifies the file Submit checked: device and inode, and its size and modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        """The identity of an ``fstat`` result."""
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def as_entry(self) -> dict[str, int]:
        """The manifest fields that record it."""
        return {"device": self.device, "inode": self.inode, "size": self.size, "mtime_ns": self.mtime_ns}


def supported() -> bool:
    """Whether this platform can open without following links (``openat`` with ``O_NOFOLLOW``)."""
    return bool(_NOFOLLOW and _DIRECTORY) and os.open in os.supports_dir_fd


def _components(path: str) -> list[str]:
    if not os.path.isabs(path):
        raise UnsafeFile(f"{path!r} is not absolute")
    parts = [p for p in path.split(os.sep) if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UnsafeFile("is not a normalised absolute path (it has '.' or '..' components)")
    return parts


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file at ``path``, reached without following any symlink.

    ``path`` must be absolute and normalised (a ``realpath``). Raises :class:`UnsafeFile` when a component is a
    symlink (or not a folder), when the file is not a regular file (FIFO, device, socket, folder) and
    FileNotFoundError / PermissionError as ``open`` would. Never blocks on a FIFO or a device.
    """
    if not supported():
        raise UnsafeFile("this platform cannot open files without following links; send the frames' bytes")
    parts = _components(os.fspath(path))
    folder = os.open("/", _WALK)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _WALK, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeFile(
                        "a folder on its path is a symbolic link or not a folder (links are not followed)"
                    ) from None
                raise
            os.close(folder)
            folder = nxt
        try:
            # Refuse a non-file before opening it: opening some devices has side effects.
            info = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFile("a folder on its path is a symbolic link or not a folder") from None
            raise
        _require_regular(info)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _NOCTTY | _CLOEXEC, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFile("is a symbolic link (links are not followed)") from None
            raise
    finally:
        os.close(folder)
    try:
        _require_regular(os.fstat(fd))  # what was opened, not what was looked at a moment before
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(info: os.stat_result) -> None:
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        raise UnsafeFile("is a symbolic link (links are not followed)")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise UnsafeFile(f"is not a file (it is {kind}); frames must be regular files")


def fd_path(fd: int) -> str:
    """A name for an open descriptor that libraries taking file names (OpenImageIO) can open.

    ``/proc/self/fd/N`` is a link to the opened file itself: opening it reaches that inode whatever happened to
    the name since, and no other file.
    """
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    raise UnsafeFile("this platform cannot name an open file (no /proc/self/fd or /dev/fd); send the bytes")


def identity_of(entry: Mapping[str, Any]) -> FileIdentity | None:
    """The identity Submit recorded in a manifest entry (None for manifests from before it was recorded)."""
    if "inode" not in entry:
        return None
    return FileIdentity(int(entry["device"]), int(entry["inode"]), int(entry["size"]), int(entry["mtime_ns"]))


@contextmanager
def open_recorded(entry: Mapping[str, Any]) -> Iterator[int]:
    """The frame a manifest entry recorded at Submit, opened safely and checked to be the same file.

    Raises :class:`UnsafeFile` for a link or non-file on the way, a file replaced (other device or inode) or
    changed (size, modification time) since Submit.
    """
    try:
        fd = open_regular(entry["path"])
    except FileNotFoundError:
        raise UnsafeFile("cannot be read any more (it does not exist)") from None
    except PermissionError:
        raise UnsafeFile("cannot be read any more (permission denied)") from None
    try:
        now = FileIdentity.of(os.fstat(fd))
        recorded = identity_of(entry)
        if recorded is not None and (now.device, now.inode) != (recorded.device, recorded.inode):
            raise UnsafeFile(
                "changed after it was submitted (replaced by another file: other device or inode); "
                "submit the job again"
            )
        if "size" in entry and (now.size, now.mtime_ns) != (entry["size"], entry["mtime_ns"]):
            raise UnsafeFile(
                "changed after it was submitted (size or modification time); submit the job again"
            )
        yield fd
    finally:
        os.close(fd)


def read_recorded(entry: Mapping[str, Any]) -> bytes:
    """All bytes of the frame a manifest entry recorded (see :func:`open_recorded`)."""
    with open_recorded(entry) as fd, os.fdopen(os.dup(fd), "rb") as handle:
        return handle.read()


# ---------------------------------------------------------------------------------------------------------
# Decode memory


class DecodeBudget:
    """Bytes of decoded pixels that may be in flight at once in this process, shared by every upload and job.

    :meth:`reserve` blocks until the bytes are free; a single decode larger than the whole budget is refused
    (:class:`OverBudget`) rather than waited for forever.
    """

    class OverBudget(ValueError):
        """One decode needs more than the whole budget."""

    def __init__(self, limit_bytes: int) -> None:
        self._cond = threading.Condition()
        self.limit = int(limit_bytes)
        self.in_use = 0
        self.peak = 0

    def set_limit(self, limit_bytes: int) -> None:
        """Change the budget (the engine's ``--decode-memory``)."""
        with self._cond:
            self.limit = int(limit_bytes)
            self._cond.notify_all()

    def reserve(self, nbytes: int) -> AbstractContextManager[None]:
        """Hold ``nbytes`` of the budget for the duration of a decode (a ``with`` block).

        Raises :class:`OverBudget` at once when ``nbytes`` exceed the whole budget.
        """
        nbytes = max(0, int(nbytes))
        if nbytes > self.limit:
            raise self.OverBudget(
                f"decoding it needs {_gib(nbytes)} of memory, more than this engine's decode budget of "
                f"{_gib(self.limit)} (vera-engine serve --decode-memory); send a smaller image or fewer channels"
            )
        return self._hold(nbytes)

    @contextmanager
    def _hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            # A budget lowered meanwhile still admits a decode alone, rather than never.
            self._cond.wait_for(lambda: self.in_use + nbytes <= self.limit or self.in_use == 0)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


def _gib(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"


# OpenImageIO's float read holds the converted pixels and a native copy: twice the float32 bytes at the peak
# (measured: 3072x3072 RGBA half, 144 MiB of float32, grew the process by 288 MiB).
DECODE_BYTES_PER_SAMPLE = 8
DEFAULT_DECODE_BUDGET = 8 * 1024**3  # one 16384x16384 RGBA frame (the largest the limits allow) at a time


def decode_budget_bytes(gib: float | None) -> int:
    """The decode budget for ``--decode-memory GIB``; None: 8 GiB, or a quarter of the machine's memory if less."""
    if gib is not None:
        if not gib > 0:
            raise ValueError(f"--decode-memory {gib:g}: expected a positive number of GiB")
        return int(gib * 1024**3)
    try:
        quarter = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError):  # not POSIX
        return DEFAULT_DECODE_BUDGET
    return max(1024**3, min(DEFAULT_DECODE_BUDGET, quarter))


DECODE = DecodeBudget(decode_budget_bytes(None))
"""The process's decode budget (``vera-engine serve --decode-memory`` sets it)."""


def decode_cost(width: int, height: int, channels: int) -> int:
    """Peak bytes a decode of ``width`` x ``height`` x ``channels`` to float32 takes."""
    return int(width) * int(height) * int(channels) * DECODE_BYTES_PER_SAMPLE


def private_dir(path: Path) -> Path:
    """``path`` created if missing and made readable by the engine's user only (0700), whatever the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def rendezvous_file() -> str:
    """Where the ranks of a job over several devices of one machine meet: a ``file://`` store in a new folder
    only the engine's user can enter (0700).

    torch's TCP store listens on every interface whatever address it is given; a file store opens no port at
    all. Every group is on one machine (local workers, or a Ray placement group packed on one node).
    """
    folder = tempfile.mkdtemp(prefix="vera-rendezvous-")  # created 0700
    return Path(folder, "store").as_uri()


RESULT_NAME = re.compile(r"vera_edit(?:_take[1-9][0-9]*)?\.-?[0-9]+\.exr")
"""The names of a job's result files (runner.result_stem + frame number), and nothing else."""


def check_result_names(names: Iterable[str]) -> list[str]:
    """``names`` if each is a Vera result file name; ValueError naming the first that is not.

    A worker (a Ray actor on another node) reports the names of the results it wrote; the front door stores and
    serves them, so a name like ``../../etc/passwd`` must never get that far.
    """
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not RESULT_NAME.fullmatch(name):
            raise ValueError(
                f"a worker reported the result {str(name)[:80]!r}, which is not a Vera result name "
                "(vera_edit[_take<k>].<frame>.exr); the job's results are not trusted"
            )
    return names


def open_result(out_dir: Path, name: str) -> BinaryIO:
    """One result of a job, opened for reading: only a Vera result name, only inside ``out_dir``, no link followed."""
    check_result_names([name])
    path = out_dir / name
    if path.parent != out_dir:  # cannot happen for a result name; kept as the invariant Fetch relies on
        raise ValueError(f"result {name!r} is not inside the job's output folder")
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    try:
        _require_regular(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
